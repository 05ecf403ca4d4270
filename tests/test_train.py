"""train_gpt2.py end to end: one process, torchrun with 2 ranks, and 2 torchrun "nodes" on localhost.

Distributed runs are checked against a single process with the same data and seed: with twice the gradient
accumulation it sees the same tokens per step, so it must end with the same parameters.
"""

import json
import uuid
from pathlib import Path

import pytest
import torch
from helpers import read_metrics, run_script, started, torchrun, train_args

from pretrain.checkpoint import load_checkpoint, load_model
from pretrain.config import OptimConfig
from pretrain.optim import lr_at

pytestmark = pytest.mark.slow  # every test here starts processes

metrics = read_metrics


def final_params(out_dir: Path, steps: int) -> dict[str, torch.Tensor]:
    return load_checkpoint(out_dir / f"ckpt_{steps:06d}.pt")["model"]


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_steps(out: Path, reference: Path) -> None:
    """A distributed run took the same steps as the single process: every step's loss (the mean over micro-steps
    and ranks) and gradient norm (AdamW would hide a gradient scaled by the world size), and the final weights."""
    steps, reference_steps = metrics(out), metrics(reference)
    assert [r["step"] for r in steps] == [r["step"] for r in reference_steps] == [0, 1, 2]
    for record, expected in zip(steps, reference_steps):
        assert record["loss"] == pytest.approx(expected["loss"], abs=1e-5)
        assert record["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
    assert max_param_diff(final_params(out, 3), final_params(reference, 3)) <= 1e-5


@pytest.fixture(scope="module")
def single_run(tiny_shards, tmp_path_factory) -> Path:
    """The reference: one process, 2 accumulation steps of 4 x 32 tokens."""
    out = tmp_path_factory.mktemp("single")
    result = run_script(*train_args(tiny_shards, out, "--train.max_steps=3", "--train.eval_interval=0"))
    assert "2 accumulation steps" in result.stdout
    return out


def test_training_runs_logs_and_loss_falls(tiny_shards, tmp_path):
    out = tmp_path / "run"
    result = run_script(*train_args(tiny_shards, out, "--train.max_steps=25", "--train.eval_interval=10",
                                    "--train.val_steps=2", "--train.sample_interval=20", "--train.sample_tokens=4",
                                    "--optim.lr=3e-3", "--train.checkpoint_interval=10", "--train.keep_checkpoints=2"))
    records = metrics(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(25))
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "ms", "tokens_per_s", "mfu"} <= r.keys()
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"]
        # the schedule the config asks for: warmup 2 steps to 3e-3, cosine to 1e-4 at step 25
        assert r["lr"] == pytest.approx(lr_at(r["step"], OptimConfig(lr=3e-3, min_lr=1e-4, warmup_steps=2), 25),
                                        rel=1e-9)
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert first > 10 and last < first - 1, (first, last)
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 10, 20, 25] and val[-1]["val_loss"] < val[0]["val_loss"] - 1
    assert "--- sample 1 of 2, after 20 steps ---\nclass Parser:\n    def __init__(self" in result.stdout
    assert "| MFU " in result.stdout and "tok/s" in result.stdout
    # The final checkpoint loads back into the model that was trained, through the shared loading code.
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_000020.pt", "ckpt_000025.pt"]  # 10 pruned
    model, meta = load_model(out)
    assert meta["step"] == 25 and model.config.n_layer == 2
    assert json.loads((out / "train_config.json").read_text())["train"]["max_steps"] == 25


def test_two_ranks_match_one_process_with_twice_the_accumulation(tiny_shards, single_run, tmp_path):
    out = tmp_path / "ddp"
    result = run_script(*torchrun("--standalone", "--nproc_per_node=2",
                                  *train_args(tiny_shards, out, "--train.max_steps=3", "--train.eval_interval=0")))
    assert "2 ranks x 1 accumulation steps" in result.stdout
    assert_same_steps(out, single_run)


def test_two_torchrun_nodes_train_together(tiny_shards, single_run, tmp_path, free_port):
    out = tmp_path / "multinode"
    port, run_id = free_port, uuid.uuid4().hex[:8]
    node_args = torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                         f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
                         *train_args(tiny_shards, out, "--train.max_steps=3", "--train.eval_interval=0"))
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    with started(*node_args, log=logs[0]) as node0, started(*node_args, log=logs[1]) as node1:
        codes = [node0.wait(timeout=300), node1.wait(timeout=300)]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(outputs)
    assert any("2 ranks x 1 accumulation steps" in o for o in outputs)
    assert_same_steps(out, single_run)


def test_bad_config_key_and_bad_shard_stop_with_a_message(tiny_shards, tmp_path):
    bad = run_script("train_gpt2.py", "--model.n_layers=3", check=False)
    assert bad.returncode == 2 and "unknown config key 'model.n_layers'" in bad.stderr
    assert "Traceback" not in bad.stderr

    data = tmp_path / "data"
    data.mkdir()
    for shard in tiny_shards.iterdir():
        (data / shard.name).write_bytes(shard.read_bytes())
    train_shard = data / "tiny_train_000001.bin"
    train_shard.write_bytes(train_shard.read_bytes()[:-100])  # truncated
    bad = run_script(*train_args(data, tmp_path / "out", "--train.max_steps=1"), check=False)
    assert bad.returncode == 2 and "tiny_train_000001.bin" in bad.stderr and "truncated" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_demo_config_builds_its_corpus_when_missing(tmp_path):
    """The README's first command on a fresh machine: no shards yet, no network; the demo corpus is built."""
    data_dir = tmp_path / "demo"
    result = run_script("train_gpt2.py", "--config", "configs/demo.toml", f"--data.dir={data_dir}",
                        f"--train.out_dir={tmp_path / 'run'}", "--train.max_steps=2", "--train.eval_interval=1",
                        "--train.val_steps=1", "--train.sample_interval=0")
    assert "building the demo corpus" in result.stdout
    assert (data_dir / "manifest.json").is_file() and list(data_dir.glob("demo_train_*.bin"))
    assert [r["step"] for r in metrics(tmp_path / "run") if "loss" in r] == [0, 1]


def test_diverging_run_stops_and_says_why(tiny_shards, tmp_path):
    result = run_script(*train_args(tiny_shards, tmp_path, "--train.max_steps=6", "--train.eval_interval=0",
                                    "--optim.lr=1e6", "--optim.grad_clip=0", "--optim.warmup_steps=1"), check=False)
    assert result.returncode == 2 and "training diverged" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("ckpt_*.pt"))  # a diverged model is not saved as if it were the result


# -- compiled and bfloat16 training, end to end on CPU -----------------------------------------------------------

COMPILED = ["--train.compile=true", "--train.compile_backend=aot_eager"]  # torch.compile's graphs, run eagerly


@pytest.fixture(scope="module")
def compiled_single_run(tiny_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compiled_single")
    result = run_script(*train_args(tiny_shards, out, "--train.max_steps=3", "--train.eval_interval=0", *COMPILED))
    assert "compiled (aot_eager)" in result.stdout
    return out


def test_compiled_training_on_two_ranks_matches_one_compiled_process_and_resumes_exactly(
        tiny_shards, compiled_single_run, single_run, tmp_path):
    two_ranks = torchrun("--standalone", "--nproc_per_node=2")
    run_script(*two_ranks, *train_args(tiny_shards, tmp_path / "ddp", "--train.max_steps=3",
                                       "--train.eval_interval=0", *COMPILED))
    assert_same_steps(tmp_path / "ddp", compiled_single_run)
    assert_same_steps(compiled_single_run, single_run)  # and compiling changed nothing but the speed
    # 2 steps, then resumed to 3: the same steps as the uninterrupted compiled run
    run_script(*two_ranks, *train_args(tiny_shards, tmp_path / "resumed", "--train.max_steps=2",
                                       "--train.eval_interval=0", *COMPILED))
    resumed = run_script(*two_ranks, *train_args(tiny_shards, tmp_path / "resumed", "--train.max_steps=3",
                                                 "--train.eval_interval=0", *COMPILED))
    assert "resuming from" in resumed.stdout
    assert_same_steps(tmp_path / "resumed", compiled_single_run)


def test_fsdp_compiled_and_checkpointed_matches_ddp(tiny_shards, tmp_path):
    two_ranks = torchrun("--standalone", "--nproc_per_node=2")
    common = ["--train.max_steps=3", "--train.eval_interval=0"]
    run_script(*two_ranks, *train_args(tiny_shards, tmp_path / "ddp", *common))
    for name, extra in (("fsdp_compiled", COMPILED), ("fsdp_checkpointed", ["--train.activation_checkpointing=true"])):
        run_script(*two_ranks, *train_args(tiny_shards, tmp_path / name, *common, "--train.parallel=fsdp", *extra))
        ddp, fsdp = metrics(tmp_path / "ddp"), metrics(tmp_path / name)
        assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in ddp], abs=1e-5), name
        # the norm sums squares in another order (per shard, then across ranks): float32 rounding
        assert [r["grad_norm"] for r in fsdp] == pytest.approx([r["grad_norm"] for r in ddp], rel=1e-4), name
        assert max_param_diff(final_params(tmp_path / name, 3), final_params(tmp_path / "ddp", 3)) <= 1e-5, name


def test_bfloat16_training_on_two_ranks_matches_one_process(tiny_shards, tmp_path):
    """Each rank computes its micro-batch in bfloat16 exactly as the single process computes the same micro-step
    (same kernels, same shapes); what differs is the float32 sum of the two gradients (all-reduced, or accumulated),
    so the float32 test's tolerances hold here too."""
    bf16 = ["--train.max_steps=3", "--train.eval_interval=0", "--train.dtype=bfloat16"]
    run_script(*train_args(tiny_shards, tmp_path / "single", *bf16))
    result = run_script(*torchrun("--standalone", "--nproc_per_node=2",
                                  *train_args(tiny_shards, tmp_path / "ddp", *bf16)))
    assert "precision: bfloat16 (as set)" in result.stdout
    assert_same_steps(tmp_path / "ddp", tmp_path / "single")
