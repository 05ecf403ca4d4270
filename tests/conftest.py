"""Fixtures, and the rules every test runs under.

- Tests that start processes (a program, torchrun, spawned ranks) or compile are marked `slow`; the rest, the
  quick unit tests, run alone with `python -m pytest -m "not slow"`. A quick test that starts a process fails.
- Every test runs offline and, in the programs it starts, without a GPU (helpers.QUIET_ENV); tests/test_gpu.py
  is the exception, and is skipped where there is no CUDA.
Helpers shared by test modules are in helpers.py.
"""

import multiprocessing.process
import os
import signal
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import QUIET_ENV, core_task_specs
from helpers import free_port as _free_port

from pretrain import tokenizer
from pretrain.core_bundle import write_bundle
from pretrain.shards import write_shard

# A suite started in the background (nohup, `cmd &` in a script) inherits SIGINT ignored, and so would every program
# a test starts: the Ctrl-C tests would send signals nobody hears. Python's own handler here is reset to the default in
# the programs the tests start.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# No test reaches the network (Hugging Face Hub, W&B), in this process or the ones it starts.
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE", "WANDB_SILENT"):
    os.environ.setdefault(_key, QUIET_ENV[_key])


@pytest.fixture(scope="session", autouse=True)
def matplotlib_font_cache():
    """matplotlib builds its font cache at its first import on a machine (running fc-list): built here, once,
    before any quick test, which may not start processes."""
    try:
        import matplotlib.font_manager  # noqa: F401
    except ImportError:
        pass


@pytest.fixture(autouse=True)
def quick_tests_start_no_process(request, monkeypatch):
    """A test not marked slow may not start a process: starting one is what makes a test slow."""
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts a process: mark it @pytest.mark.slow")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's in-process work (pytestmark = pytest.mark.usefixtures(...)): its models
    are tiny, and on a busy 2-core machine two threads wait on each other for tens of seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def keep_matmul_precision():
    """train_gpt2.main sets the process-wide float32 matmul precision; later tests in this process compare at
    float32 tolerance."""
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """A few small train/val shards of real text (Python's own sources), enough for short training runs."""
    out = tmp_path_factory.mktemp("tiny_shards")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [(stdlib / name).read_text(encoding="utf-8") for name in ("argparse.py", "json/decoder.py", "textwrap.py")]
    tokens = np.array([t for doc in docs for t in [tokenizer.EOT_ID] + tokenizer.encode(doc)], dtype=np.uint16)
    write_shard(out / "tiny_val_000000.bin", tokens[:8192])
    write_shard(out / "tiny_train_000000.bin", tokens[8192:40000])
    write_shard(out / "tiny_train_000001.bin", tokens[40000:])
    return out


@pytest.fixture
def free_port() -> int:
    """A TCP port on localhost that nothing listens on now, for a process group's rendezvous."""
    return _free_port()


@pytest.fixture(scope="session")
def core_bundle(tmp_path_factory) -> Path:
    """A small CORE eval bundle in the real one's layout (core_task_specs)."""
    return write_bundle(tmp_path_factory.mktemp("core_bundle") / "eval_bundle", core_task_specs())
