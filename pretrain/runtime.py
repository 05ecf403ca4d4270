"""The runtime choices every program makes: device, dtype, autocast, torch.compile and seeding.

`resolve` turns the user's settings ("auto" or explicit) into this machine's choices, so every program agrees on
what "auto" means and none repeats the device/dtype boilerplate.
"""

import contextlib
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from pretrain.errors import UserError

DEVICES = ("cpu", "cuda", "mps")
DTYPES = ("auto", "bfloat16", "float32")  # the autocast dtype; float32 means no autocast
COMPILE_SETTINGS = ("auto", "true", "false")


class RuntimeChoiceError(UserError):
    """A device, dtype or compile setting this machine cannot honour; the message says which and why."""


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: CUDA (this process's local GPU), then Apple MPS, then CPU. An explicit device must exist here."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise RuntimeChoiceError(f"device {preference!r} is not a device: use auto, cpu, cuda, cuda:N or mps") \
            from None
    if device.type not in DEVICES:
        raise RuntimeChoiceError(f"device {preference!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeChoiceError(f"device {preference!r} was asked for, but this machine has no CUDA GPU "
                                     "(or this torch build has no CUDA): use device auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise RuntimeChoiceError(f"device {device} does not exist: this machine has "
                                     f"{torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeChoiceError("device 'mps' was asked for, but Apple's MPS backend is not available here")
    return device


def measure_matmul_tflops(dtype: torch.dtype, size: int = 1024, repeats: int = 5,
                          device: torch.device | str = "cpu") -> float:
    """What this device does on a square matmul in `dtype`, best of `repeats` (the machine may be busy): the
    measured peak for MFU, and the test of whether bfloat16 helps on a CPU (with AMX or AVX512-BF16 it is several
    times faster than float32; without, far slower)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b  # warm up
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def cpu_prefers_bfloat16() -> bool:
    """True when a quick matmul shows bfloat16 beats float32 on this CPU (~80 ms to find out)."""
    return measure_matmul_tflops(torch.bfloat16, 256, 2) > measure_matmul_tflops(torch.float32, 256, 2)


def pick_dtype(name: str, device: torch.device, decide=lambda flag: flag) -> torch.dtype:
    """The autocast dtype. auto: bfloat16 on CUDA GPUs that have it, and on CPUs where it is measured faster than
    float32 (CPUs without bf16 instructions run it ~100x slower); float32 elsewhere. `decide` lets ranks agree on
    a choice that comes from a local measurement (distributed.master_decides). name is one of DTYPES."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if decide(cpu_prefers_bfloat16()) else torch.float32
    return torch.float32


def pick_compile(setting: str | bool, device: torch.device) -> bool:
    """auto: compile on CUDA, where it pays; on CPU compiling takes a minute and, at small widths, gains little.
    setting is one of COMPILE_SETTINGS, or a bool."""
    if isinstance(setting, bool):
        return setting
    return device.type == "cuda" if setting == "auto" else setting == "true"


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast
    compile: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's autocast context (a no-op in float32). Backward and the optimizer run outside it."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Host batches onto the device. On CUDA through pinned memory without waiting, so the copy overlaps the
        GPU's work and the host goes on to read the next batch (an unpinned copy would block)."""
        if self.device.type != "cuda":
            return [t.to(self.device) for t in tensors]
        return [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]

    def maybe_compile(self, model: torch.nn.Module) -> torch.nn.Module:
        return torch.compile(model) if self.compile else model

    def describe(self) -> str:
        return f"{self.device}, {str(self.dtype).removeprefix('torch.')}, compile {self.compile}"


def resolve(device: str | torch.device = "auto", dtype: str = "auto", compile: str | bool = "auto",
            local_rank: int = 0, decide=lambda flag: flag) -> Runtime:
    """Turn the user's settings (auto or explicit) into this machine's device, dtype and compile choice.
    Also turns on TF32 matmuls (Ampere and newer GPUs; no effect elsewhere)."""
    torch_device = device if isinstance(device, torch.device) else pick_device(device, local_rank)
    torch.set_float32_matmul_precision("high")
    return Runtime(torch_device, pick_dtype(dtype, torch_device, decide), pick_compile(compile, torch_device))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices), so runs with the same seed match."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
