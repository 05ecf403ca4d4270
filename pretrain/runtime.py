"""The runtime choices every program makes: device, dtype, autocast, torch.compile and seeding.

`resolve` turns the user's settings ("auto" or explicit) into this machine's choices, so every program agrees on
what "auto" means and none repeats the device/dtype boilerplate.
"""

import contextlib
import platform
import random
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from pretrain.errors import UserError

DEVICES = ("cpu", "cuda", "mps")
DTYPES = ("auto", "bfloat16", "float32")  # the autocast dtype; float32 means no autocast
COMPILE_SETTINGS = ("auto", "true", "false")
COMPILE_BACKENDS = ("inductor", "aot_eager")


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
    """What this device does on a square matmul in `dtype`, best of `repeats` (the machine may be busy)."""
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


# A bfloat16 matmul must beat float32 by this much to be chosen from a measurement: a near tie is noise, and float32
# is never the catastrophic choice (bfloat16 without hardware support runs tens of times slower).
BFLOAT16_MARGIN = 1.5


def cpu_bfloat16_support() -> tuple[bool | None, str]:
    """Whether this CPU has bfloat16 matmul instructions, from what torch reports, and why: True with AMX or
    AVX512-BF16; False on an x86 CPU without AVX512 (bfloat16 is emulated there, ~50x slower than float32); None where
    the features cannot tell (AVX512 without BF16, where oneDNN's emulation may or may not pay; other CPUs)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return True, "this CPU has AMX bfloat16 instructions"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return True, "this CPU has AVX512-BF16 instructions"
    if capability in ("AVX2", "DEFAULT", "NO AVX") and platform.machine().lower() in ("x86_64", "amd64"):
        return False, f"this CPU has no bfloat16 instructions ({capability})"
    return None, f"this CPU's features ({capability}, {platform.machine()}) do not say whether bfloat16 is fast"


def measure_bfloat16_speedup(rounds: int = 5, shape: tuple[int, int, int] = (1024, 768, 3072)) -> float:
    """float32 time / bfloat16 time of a matmul shaped like a model's (tokens x n_embd @ n_embd x 4 n_embd), the
    median over rounds that alternate the two dtypes, so a load that comes and goes hits both alike."""
    m, k, n = shape
    operands = {dtype: (torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype))
                for dtype in (torch.float32, torch.bfloat16)}
    ratios = []
    for _ in range(rounds):
        seconds = {}
        for dtype, (a, b) in operands.items():
            a @ b  # warm: the first call of a round may page in code or memory
            start = time.perf_counter()
            a @ b
            seconds[dtype] = time.perf_counter() - start
        ratios.append(seconds[torch.float32] / seconds[torch.bfloat16])
    return statistics.median(ratios)


def auto_cpu_dtype() -> tuple[torch.dtype, str]:
    """The CPU's autocast dtype for dtype=auto and the reason: from the CPU's features where they tell, else from a
    measurement with a clear margin (BFLOAT16_MARGIN); float32 when in doubt."""
    supported, reason = cpu_bfloat16_support()
    if supported is not None:
        return (torch.bfloat16 if supported else torch.float32), reason
    speedup = measure_bfloat16_speedup()
    if speedup >= BFLOAT16_MARGIN:
        return torch.bfloat16, f"{reason}; measured {speedup:.1f}x float32's matmul speed"
    return torch.float32, f"{reason}; measured {speedup:.2f}x float32's matmul speed, under the {BFLOAT16_MARGIN}x " \
                          "margin"


def pick_dtype(name: str, device: torch.device, agree=lambda choice: choice) -> tuple[torch.dtype, str]:
    """The autocast dtype and why. auto: bfloat16 on CUDA GPUs that have it, and on CPUs that have bfloat16
    instructions (auto_cpu_dtype); float32 elsewhere. `agree` makes every rank take rank 0's choice, which on a CPU
    may come from a local measurement (distributed.from_master). name is one of DTYPES."""
    if name != "auto":
        return getattr(torch, name), "as set"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU has bfloat16"
        return torch.float32, "auto: this GPU has no bfloat16"
    if device.type == "cpu":
        dtype_name, reason = agree(_named(auto_cpu_dtype()))
        return getattr(torch, dtype_name), f"auto: {reason}"
    return torch.float32, f"auto: float32 on {device.type}"


def _named(choice: tuple[torch.dtype, str]) -> tuple[str, str]:
    """A dtype choice in plain values, to send between ranks."""
    return str(choice[0]).removeprefix("torch."), choice[1]


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
    dtype_reason: str = "as set"  # why this dtype (logged with it: "auto" must say what it decided from)
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: the graphs without code generation)

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

    def maybe_compile(self, module_or_fn, **options):
        """module_or_fn compiled with this runtime's backend when compiling is on, else as it is."""
        if not self.compile:
            return module_or_fn
        return torch.compile(module_or_fn, backend=self.compile_backend, **options)

    def describe(self) -> str:
        compiled = f"compiled ({self.compile_backend})" if self.compile else "not compiled"
        return f"{self.device}, {str(self.dtype).removeprefix('torch.')}, {compiled}"


def add_arguments(parser) -> None:
    """--device, --dtype and --compile for an evaluation program's argparse parser, with training's choices."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="auto, bfloat16 or float32 (default: auto, as training)")
    parser.add_argument("--compile", default="auto", choices=COMPILE_SETTINGS,
                        help="torch.compile: auto (on for CUDA), true or false")


def resolve(device: str | torch.device = "auto", dtype: str = "auto", compile: str | bool = "auto",
            local_rank: int = 0, agree=lambda choice: choice, compile_backend: str = "inductor") -> Runtime:
    """Turn the user's settings (auto or explicit) into this machine's device, dtype and compile choice; `agree`
    gives every rank rank 0's dtype choice (distributed.from_master). Also turns on TF32 matmuls (Ampere and newer
    GPUs; no effect elsewhere)."""
    torch_device = device if isinstance(device, torch.device) else pick_device(device, local_rank)
    torch.set_float32_matmul_precision("high")
    dtype, reason = pick_dtype(dtype, torch_device, agree)
    return Runtime(torch_device, dtype, pick_compile(compile, torch_device), reason, compile_backend)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices), so runs with the same seed match."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
