"""Process-group setup and the few collectives the training loop needs.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) every process joins one group: NCCL on CUDA,
gloo on CPU. Run plainly, the same code sees a world of one and every collective is a no-op.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.errors import UserError


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def local_rank() -> int:
    """This process's GPU index on its node (0 when not launched by torchrun)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def setup(device: torch.device) -> DistInfo:
    """Join the torchrun process group if launched by torchrun (device: this process's, see runtime.pick_device)."""
    if "RANK" not in os.environ:
        return DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")
    return DistInfo(rank=rank, local_rank=local_rank(), world_size=world_size, device=device)


def is_master() -> bool:
    """Rank 0 of the process group, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks in place (SUM then divide: gloo has no AVG)."""
    all_reduce_sum(tensor)
    if dist.is_initialized():
        tensor /= dist.get_world_size()
    return tensor


def _flag_tensor(flag: bool) -> torch.Tensor:
    """A one-element tensor for a collective over a flag, on the device the backend needs."""
    tensor = torch.tensor([float(flag)])
    return tensor.cuda() if dist.get_backend() == "nccl" else tensor


def master_decides(flag: bool) -> bool:
    """Rank 0's flag on every rank: for choices made from local measurements, which may differ between ranks."""
    if not dist.is_initialized():
        return flag
    tensor = _flag_tensor(flag)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def first_error(message: str | None) -> str | None:
    """Every rank's error message (None: no error) reaches every rank; returns the lowest failing rank's.
    A collective, so it also waits for every rank like a barrier."""
    failure = _first_failure(message)
    return None if failure is None else failure[1]


def _first_failure(message: str | None) -> tuple[int, str] | None:
    """(rank, message) of the lowest rank whose message is not None, on every rank; None when none failed."""
    if not dist.is_initialized():
        return None if message is None else (0, message)
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return next(((rank, m) for rank, m in enumerate(messages) if m is not None), None)


def on_every_rank(fn, *args, **kwargs):
    """fn(*args, **kwargs) on this rank, then every rank learns whether any failed: a UserError on one rank (a shard
    missing on one node, say) is raised on every rank, so the job stops together with one line from rank 0, and no
    rank waits in a later collective for one that has stopped. fn must run no collective of its own."""
    failure = None
    try:
        result = fn(*args, **kwargs)
    except UserError as e:
        failure = e
    first = _first_failure(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if first is not None:
        rank, message = first
        raise UserError(f"rank {rank} (of {dist.get_world_size()}): {message}")
    return result


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (counts that each rank made on its share)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _reduce_flag(flag: bool, op) -> bool:
    if not dist.is_initialized():
        return flag
    tensor = _flag_tensor(flag)
    dist.all_reduce(tensor, op=op)
    return bool(tensor.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when the flag is set on at least one (one all-reduce of a single number)."""
    return _reduce_flag(flag, dist.ReduceOp.MAX)


def all_ranks_agree(flag: bool) -> bool:
    """True on every rank when every rank's flag is True: for an optional job that all ranks must run together."""
    return _reduce_flag(flag, dist.ReduceOp.MIN)


def gather_to_master(obj) -> list | None:
    """Every rank's obj, in rank order, on rank 0 (None elsewhere). For small values: it pickles them."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered if dist.get_rank() == 0 else None


def from_master(obj):
    """Rank 0's obj on every rank (small picklable values)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
