"""pretrain.runtime: what "auto" means for device, dtype and compile, and the errors for choices a machine lacks."""

import random

import numpy as np
import pytest
import torch

from pretrain import runtime
from pretrain.config import ConfigError, load_config
from pretrain.runtime import RuntimeChoiceError


def test_auto_device_is_the_cpu_here_and_explicit_cpu_is_kept():
    assert runtime.pick_device("auto") == torch.device("cpu")  # these machines have no GPU
    assert runtime.pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name, message", [("tpu9", "not a device"), ("xla", "not supported"),
                                           ("cuda", "no CUDA GPU"), ("cuda:1", "no CUDA GPU")])
def test_devices_this_machine_lacks_are_one_clear_error(name, message):
    with pytest.raises(RuntimeChoiceError, match=message):
        runtime.pick_device(name)


def test_explicit_dtypes_are_kept_and_unknown_ones_refused():
    cpu = torch.device("cpu")
    assert runtime.pick_dtype("float32", cpu) == torch.float32
    assert runtime.pick_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="train.dtype: expected one of auto, bfloat16, float32, got 'fp8'"):
        load_config(["--train.dtype=fp8"])


def test_auto_dtype_on_cpu_follows_the_measurement_and_the_ranks_agreement(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_prefers_bfloat16", lambda: True)
    assert runtime.pick_dtype("auto", cpu) == torch.bfloat16
    # rank 0's decision wins over this rank's own measurement
    assert runtime.pick_dtype("auto", cpu, decide=lambda flag: False) == torch.float32
    monkeypatch.setattr(runtime, "cpu_prefers_bfloat16", lambda: False)
    assert runtime.pick_dtype("auto", cpu) == torch.float32


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
