"""Helpers the tests share: running a program with a time limit, the tiny training run's arguments, reading a run's
metrics, saving a model as a run's checkpoint, and a function on two gloo ranks. Fixtures are in conftest.py."""

import contextlib
import dataclasses
import datetime
import os
import random
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import GPT
from pretrain.checkpoint import checkpoint_path, save_checkpoint
from pretrain.config import Config, to_dict
from pretrain.fileio import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
# What every program a test starts runs with: one thread (tests often run several processes on 2 cores), no GPU
# (the CPU path is what the suite checks, also on a machine with one; tests/test_gpu.py checks the GPU), no network.
QUIET_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
GLOO_TIMEOUT = datetime.timedelta(seconds=60)  # a rank waiting for a dead one fails the test instead of hanging


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


def torchrun(*args: str) -> list[str]:
    """run_script's arguments for torchrun (python -m torch.distributed.run) with these arguments."""
    return ["-m", "torch.distributed.run", *args]


def worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of this rank, found through /proc (parent pid and environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if parent == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under torchrun {launcher_pid}")


# ---- the tiny training run --------------------------------------------------------------------------------------

# A tiny GPT-2 on the tiny_shards fixture: seconds per training run, float32, no compile, no samples.
TINY_MODEL = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=64", "--model.block_size=32"]


def tiny_run(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """The config arguments of a tiny run on data_dir into out_dir; `extra` overrides or adds keys."""
    return ["--config", "configs/demo.toml", f"--data.dir={data_dir}", "--data.demo=false",
            f"--train.out_dir={out_dir}", *TINY_MODEL, "--data.seq_len=32", "--data.micro_batch_size=4",
            "--data.total_batch_tokens=256", "--train.device=cpu", "--train.dtype=float32", "--train.compile=false",
            "--train.sample_interval=0", "--optim.warmup_steps=2", "--optim.lr=1e-3", "--optim.min_lr=1e-4", *extra]


def train_args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """run_script's arguments for train_gpt2.py on the tiny run."""
    return ["train_gpt2.py", *tiny_run(data_dir, out_dir, *extra)]


def read_metrics(out_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    return read_jsonl(Path(out_dir) / "metrics.jsonl")


def save_model_checkpoint(run_dir: Path, model, step: int, cfg: Config | None = None) -> Path:
    """`model` saved in run_dir as this codebase's checkpoint of `step`, with what load_model reads (weights, step,
    config: cfg's, with cfg.model replaced by the model's own)."""
    config = to_dict(cfg or Config())
    config["model"] = dataclasses.asdict(model.config)
    return save_checkpoint(checkpoint_path(run_dir, step), {"model": model.state_dict(), "step": step,
                                                          "config": config})


# ---- several ranks ----------------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on localhost that nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world_size: int, port: int, fn, args: tuple, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=GLOO_TIMEOUT)
    try:
        results[rank] = ("returned", fn(rank, *args))
    except BaseException:
        results[rank] = ("raised", traceback.format_exc())
    finally:
        dist.destroy_process_group()


def on_gloo_ranks(fn, *args, world_size: int = 2) -> list:
    """fn(rank, *args) in world_size spawned processes joined in one gloo group on localhost; each rank's return
    value, in rank order. fn must be a module-level function (the processes import it by name)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gloo_rank, args=(world_size, free_port(), fn, args, results), nprocs=world_size)
        outcomes = [results[rank] for rank in range(world_size)]
    for rank, (how, value) in enumerate(outcomes):
        assert how == "returned", f"rank {rank} raised:\n{value}"
    return [value for _, value in outcomes]


# ---- models and data for evaluations -----------------------------------------------------------------------------

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
