"""distributed.py's collectives in a real 2-process gloo group."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain import distributed


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # Each rank measured something different; all must act on rank 0's result.
        results[rank] = (distributed.master_decides(rank == 1),
                         distributed.all_reduce_mean(torch.tensor([float(rank), 4.0])).tolist())
    finally:
        dist.destroy_process_group()


def test_master_decides_and_mean_across_two_ranks(free_port):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(free_port, results), nprocs=2)
        assert dict(results) == {0: (False, [0.5, 4.0]), 1: (False, [0.5, 4.0])}


def test_single_process_collectives_are_no_ops():
    assert distributed.master_decides(True) is True
    assert distributed.all_reduce_mean(torch.tensor([3.0])).item() == 3.0
