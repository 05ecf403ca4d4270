"""distributed.py's collectives in a real 2-process gloo group."""

import pytest
import torch
from helpers import on_gloo_ranks

from pretrain import distributed


def _decide_and_average(rank: int) -> tuple[bool, list[float]]:
    # Each rank measured something different; all must act on rank 0's result.
    return distributed.master_decides(rank == 1), distributed.all_reduce_mean(torch.tensor([float(rank), 4.0])).tolist()


@pytest.mark.slow
def test_master_decides_and_mean_across_two_ranks():
    assert on_gloo_ranks(_decide_and_average) == [(False, [0.5, 4.0]), (False, [0.5, 4.0])]


def test_single_process_collectives_are_no_ops():
    assert distributed.master_decides(True) is True
    assert distributed.all_reduce_mean(torch.tensor([3.0])).item() == 3.0
