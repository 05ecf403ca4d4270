"""pretrain.runtime: what "auto" means for device, dtype and compile, and the errors for choices a machine lacks."""

import random
import re

import numpy as np
import pytest
import torch

from pretrain import runtime
from pretrain.config import ConfigError, load_config
from pretrain.runtime import RuntimeChoiceError


def test_auto_device_is_a_gpu_where_there_is_one_and_explicit_cpu_is_kept():
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert runtime.pick_device("auto") == expected
    assert runtime.pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name, message", [("tpu9", "not a device"), ("xla", "not supported"),
                                           ("cuda", "no CUDA GPU"), ("cuda:1", "no CUDA GPU")])
def test_devices_this_machine_lacks_are_one_clear_error(name, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, also where tests run on a GPU
    with pytest.raises(RuntimeChoiceError, match=message):
        runtime.pick_device(name)


def test_explicit_dtypes_are_kept_and_unknown_ones_refused():
    cpu = torch.device("cpu")
    assert runtime.pick_dtype("float32", cpu) == (torch.float32, "as set")
    assert runtime.pick_dtype("bfloat16", cpu) == (torch.bfloat16, "as set")
    with pytest.raises(ConfigError, match="train.dtype: expected one of auto, bfloat16, float32, got 'fp8'"):
        load_config(["--train.dtype=fp8"])


def cpu_features(monkeypatch, capability: str, amx: bool = False, avx512_bf16: bool = False,
                 machine: str = "x86_64", speedup: float | None = None) -> None:
    """Make this CPU look like another to pick_dtype; speedup is what a bfloat16 measurement would find (None: a
    measurement fails the test, for CPUs whose features must decide alone)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(runtime.platform, "machine", lambda: machine)

    def measured(*args, **kwargs):
        assert speedup is not None, "the CPU's features should have decided without a measurement"
        return speedup
    monkeypatch.setattr(runtime, "measure_bfloat16_speedup", measured)


@pytest.mark.parametrize("features, dtype, reason", [
    (dict(capability="AVX512", amx=True), torch.bfloat16, "AMX bfloat16 instructions"),
    (dict(capability="AVX512", avx512_bf16=True), torch.bfloat16, "AVX512-BF16 instructions"),
    (dict(capability="AVX2"), torch.float32, r"no bfloat16 instructions \(AVX2\)"),
    (dict(capability="AVX512", speedup=3.0), torch.bfloat16, "do not say .* measured 3.0x"),
    (dict(capability="AVX512", speedup=1.3), torch.float32, "measured 1.30x .* under the 1.5x margin"),
    (dict(capability="SVE256", machine="aarch64", speedup=0.02), torch.float32, "measured 0.02x"),
])
def test_auto_dtype_on_cpu_follows_the_cpus_features_then_a_measurement_with_a_margin(monkeypatch, features, dtype,
                                                                                        reason):
    cpu_features(monkeypatch, **features)
    chosen, why = runtime.pick_dtype("auto", torch.device("cpu"))
    assert chosen == dtype
    assert re.search(reason, why), why
    assert why.startswith("auto: ")


def test_every_rank_takes_rank_0s_dtype_choice(monkeypatch):
    cpu_features(monkeypatch, "AVX512", speedup=3.0)  # this rank would pick bfloat16 ...
    rank_0s = ("float32", "rank 0 measured 1.1x")  # ... but rank 0 measured otherwise
    chosen, why = runtime.pick_dtype("auto", torch.device("cpu"), agree=lambda mine: rank_0s)
    assert (chosen, why) == (torch.float32, "auto: rank 0 measured 1.1x")


def test_the_speedup_measurement_alternates_the_dtypes_and_takes_the_median(monkeypatch):
    """Rounds alternate float32 and bfloat16, so a load that comes and goes hits both; one slow round does not
    decide (a median, not a best-of-two)."""
    clock = iter([0.0, 1.0, 0.0, 0.5,   # round 1: float32 1 s, bfloat16 0.5 s: 2x
                  0.0, 1.0, 0.0, 10.0,  # round 2: bfloat16 slowed by a burst of load: 0.1x
                  0.0, 1.0, 0.0, 0.4])  # round 3: 2.5x
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: next(clock))
    assert runtime.measure_bfloat16_speedup(rounds=3, shape=(8, 8, 8)) == pytest.approx(2.0)


def test_compile_auto_is_off_on_cpu_and_explicit_settings_win():
    cpu = torch.device("cpu")
    assert runtime.pick_compile("auto", cpu) is False
    assert runtime.pick_compile("true", cpu) is True
    assert runtime.pick_compile(False, cpu) is False
    with pytest.raises(ConfigError, match="train.compile: expected one of auto, true, false, got 'maybe'"):
        load_config(["--train.compile=maybe"])


def test_autocast_is_a_no_op_in_float32_and_casts_matmuls_in_bfloat16():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    fp32 = runtime.Runtime(torch.device("cpu"), torch.float32, compile=False)
    with fp32.autocast():
        assert (a @ b).dtype == torch.float32
    bf16 = runtime.Runtime(torch.device("cpu"), torch.bfloat16, compile=False)
    with bf16.autocast():
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32  # only inside the context


def test_seed_everything_repeats_python_numpy_and_torch():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    runtime.seed_everything(7)
    first = draw()
    runtime.seed_everything(7)
    assert draw() == first
    runtime.seed_everything(8)
    assert draw() != first
