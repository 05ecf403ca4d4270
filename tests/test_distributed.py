"""distributed.py's collectives in a real 2-process gloo group."""

import pytest
import torch
from helpers import on_gloo_ranks

from pretrain import distributed
from pretrain.errors import UserError


def _decide_and_average(rank: int) -> tuple[bool, list[float]]:
    # Each rank measured something different; all must act on rank 0's result.
    return distributed.master_decides(rank == 1), distributed.all_reduce_mean(torch.tensor([float(rank), 4.0])).tolist()


@pytest.mark.slow
def test_master_decides_and_mean_across_two_ranks():
    assert on_gloo_ranks(_decide_and_average) == [(False, [0.5, 4.0]), (False, [0.5, 4.0])]


def test_single_process_collectives_are_no_ops():
    assert distributed.master_decides(True) is True
    assert distributed.all_reduce_mean(torch.tensor([3.0])).item() == 3.0


def _fails_on_rank_1(rank: int) -> str:
    def read_local_shards() -> str:
        if rank == 1:
            raise UserError("data directory /node2/shards does not exist")
        return "read"
    try:
        distributed.on_every_rank(read_local_shards)
    except UserError as e:
        return str(e)
    return "no error"


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank_and_rank_0_names_it():
    """A shard missing on one node only: that rank raises its error, and so does every other rank (rank 0 with the
    failing rank's message, which errors.run prints once), instead of waiting for it in the next collective."""
    rank_0, rank_1 = on_gloo_ranks(_fails_on_rank_1)
    assert rank_0 == "rank 1 (of 2): data directory /node2/shards does not exist"
    assert rank_1 == "data directory /node2/shards does not exist"
