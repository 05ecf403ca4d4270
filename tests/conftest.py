"""Shared test helpers and fixtures: the repository root, running a program with a time limit, reading a run's
metrics, small shards of real text, a small CORE eval bundle and a tiny model with confident predictions. Tests
import the helpers with `from conftest import ...`."""

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from model import GPT
from pretrain import tokenizer
from pretrain.core_bundle import write_bundle
from pretrain.shards import write_shard

ROOT = Path(__file__).resolve().parent.parent
# One thread per process: tests often run several processes on a 2-core machine.
QUIET_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_script(*args, timeout: float = 300, check: bool = True, env: dict | None = None,
               cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `python ARGS...` (or `python -m torch.distributed.run ...` when args start with "-m") from the repository
    root and return its output. A run past `timeout` seconds is killed with all its children and fails the test."""
    cmd = [sys.executable, *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **QUIET_ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past {timeout} s and was killed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check:
        assert result.returncode == 0, f"{cmd} failed:\n{stdout[-5000:]}\n{stderr[-5000:]}"
    return result


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a process started with start_new_session=True and every process it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def started(*args, log: Path, env: dict | None = None):
    """Start `python ARGS...` in the background with its output in the file `log` (a file, never a pipe: reading
    a live child's pipe can block forever); yield the Popen. On leaving, it and its children are killed."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **QUIET_ENV, **(env or {})}, start_new_session=True)
    try:
        yield proc
    finally:
        kill_group(proc)
        proc.wait()


# A tiny GPT-2 on the tiny_shards fixture: seconds per training run, float32, no compile, no samples.
TINY_MODEL = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=64", "--model.block_size=32"]


def train_args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """train_gpt2.py's arguments for a tiny run on data_dir into out_dir; `extra` overrides or adds keys."""
    return ["train_gpt2.py", "--config", "configs/demo.toml", f"--data.dir={data_dir}", "--data.demo=false",
            f"--train.out_dir={out_dir}", *TINY_MODEL, "--data.seq_len=32", "--data.micro_batch_size=4",
            "--data.total_batch_tokens=256", "--train.dtype=float32", "--train.compile=false",
            "--train.sample_interval=0", "--optim.warmup_steps=2", "--optim.lr=1e-3", "--optim.min_lr=1e-4", *extra]


def torchrun(*args: str) -> list[str]:
    """run_script's arguments for torchrun (python -m torch.distributed.run) with these arguments."""
    return ["-m", "torch.distributed.run", *args]


def read_metrics(out_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharp_gpt(config, seed: int = 0):
    """A random GPT whose final LayerNorm gain is raised 20x: confident, varied per-token losses, so that scoring
    rules (lowest loss, greedy predictions) pick different answers for different inputs."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(20)
    return model


CORE_WORDS = "the cat dog sat on a mat red blue big small house tree river ran fast".split()


def core_task_specs(seed: int = 0) -> list[dict]:
    """Small CORE tasks of every type for core_bundle.write_bundle, random words of one token each: choices that
    share leading words, few-shot prompts long enough to be truncated at block_size 64, and language-modeling
    continuations that repeat the context's last word (a random tied-embedding model tends to predict the token it
    reads, so some of those come out right)."""
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(CORE_WORDS) for _ in range(rng.randint(lo, hi)))

    def choices(k: int) -> list[str]:
        stem = words(1, 2) + " " if rng.random() < 0.5 else ""  # a shared first word: scored only after it
        return [stem + words(1, 4) for _ in range(k)]

    mc_zero = [{"query": words(3, 12), "choices": choices(4), "gold": rng.randrange(4)} for _ in range(12)]
    mc_fewshot = [{"query": words(4, 14), "choices": choices(3), "gold": rng.randrange(3)} for _ in range(10)]
    schema = [{"context_options": [words(2, 8), words(2, 8)], "continuation": words(1, 4), "gold": rng.randrange(2)}
              for _ in range(10)]
    lm = []
    for _ in range(12):
        context = words(2, 10)
        last = context.split()[-1]
        continuation = " ".join([last] * rng.randint(1, 2)) if rng.random() < 0.5 else words(1, 2)
        lm.append({"context": context + rng.choice(["", " ", "\n"]), "continuation": continuation})
    return [
        {"label": "mc_zero", "icl_task_type": "multiple_choice", "num_fewshot": 0, "rows": mc_zero, "baseline": 25},
        {"label": "mc_fewshot", "icl_task_type": "multiple_choice", "num_fewshot": 3, "rows": mc_fewshot,
         "baseline": 33.3, "continuation_delimiter": "\nAnswer: "},
        {"label": "schema", "icl_task_type": "schema", "num_fewshot": 2, "rows": schema, "baseline": 50},
        {"label": "lm", "icl_task_type": "language_modeling", "num_fewshot": 1, "rows": lm, "baseline": 0},
    ]


@pytest.fixture(scope="session")
def core_bundle(tmp_path_factory) -> Path:
    """A small CORE eval bundle in the real one's layout (core_task_specs)."""
    return write_bundle(tmp_path_factory.mktemp("core_bundle") / "eval_bundle", core_task_specs())
