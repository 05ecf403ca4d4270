"""The CUDA path users run (bfloat16 autocast, torch.compile with inductor), checked where there is a GPU:

    python -m pytest -q tests/test_gpu.py        # skipped without CUDA; a few minutes on one GPU

Every other test runs its programs with the GPU hidden (helpers.QUIET_ENV); these give it back.
"""

import os
import signal
import time

import pytest
import torch
from helpers import read_metrics, run_script, started, train_args
from test_hellaswag import ROWS, sharp_model

from pretrain.checkpoint import load_checkpoint
from pretrain.fileio import read_jsonl
from pretrain.hellaswag import check_row, render
from pretrain.hellaswag_scoring import ending_losses, predictions
from pretrain.runtime import Runtime

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0") or "0"}


def gpu_args(data, out, *extra: str) -> list[str]:
    """The tiny run on the GPU with everything on auto: cuda, bfloat16, compiled with inductor."""
    return train_args(data, out, "--train.device=auto", "--train.dtype=auto", "--train.compile=auto", *extra)


# every flag of the modern recipe (docs/modern.md), Muon's Newton-Schulz in bfloat16 as on any GPU
MODERN = ["--model.position=rope", "--model.norm=rmsnorm", "--model.qk_norm=true", "--model.activation=relu2",
          "--model.tie_head=false", "--model.zero_init_proj=true", "--model.logit_softcap=15", "--optim.name=muon",
          "--optim.schedule=wsd"]


@pytest.mark.parametrize("recipe", [[], MODERN], ids=["gpt2", "modern"])
def test_twenty_auto_steps_train_with_every_gradient_nonzero_and_float32_checkpoints(tiny_shards, tmp_path, recipe):
    result = run_script(*gpu_args(tiny_shards, tmp_path, "--train.max_steps=20", "--train.eval_interval=10",
                                  "--train.health_interval=1", "--optim.lr=3e-3", *recipe), env=GPU, timeout=900)
    assert "cuda:0, bfloat16, compiled (inductor)" in result.stdout
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1
    # inductor once compiled a gradient to zeros: every parameter's gradient must be nonzero at every step
    # (the modern model's zero head and zero projections pass no gradient back at step 0: from step 1 on)
    for record in read_jsonl(tmp_path / "health.jsonl")[1 if recipe else 0:]:
        for layer, entry in record["layers"].items():
            for name, figures in entry["params"].items():
                assert figures["grad_norm"] > 0, (record["step"], layer, name)
    state = load_checkpoint(tmp_path / "ckpt_000020.pt")
    assert {tensor.dtype for tensor in state["model"].values()} == {torch.float32}


def test_sigterm_then_resume_is_bit_identical_with_dropout(tiny_shards, tmp_path):
    """The CUDA generator's state is saved and restored: dropout masks continue as if the run had not stopped."""
    steady = ["--model.dropout=0.1", "--optim.warmup_steps=100", "--train.eval_interval=0", "--train.compile=false"]
    run_script(*gpu_args(tiny_shards, tmp_path / "ref", "--train.max_steps=30", *steady), env=GPU, timeout=600)
    out = tmp_path / "split"
    command = gpu_args(tiny_shards, out, "--train.max_steps=30", *steady)
    with started(*command, log=tmp_path / "log", env=GPU) as proc:
        while not (out / "metrics.jsonl").is_file() or len(read_metrics(out)) < 5:
            assert proc.poll() is None, (tmp_path / "log").read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 0, (tmp_path / "log").read_text()
    stopped_at = load_checkpoint(sorted(out.glob("ckpt_*.pt"))[-1])["step"]
    assert stopped_at < 30
    run_script(*command, env=GPU, timeout=600)
    ref, split = ({r["step"]: r["loss"] for r in read_metrics(d) if "loss" in r} for d in (tmp_path / "ref", out))
    assert split == ref  # bit for bit
    final, expected = (load_checkpoint(d / "ckpt_000030.pt")["model"] for d in (out, tmp_path / "ref"))
    assert all(torch.equal(final[k], v) for k, v in expected.items())


def test_hellaswag_in_bfloat16_picks_what_float32_picks_on_a_sharpened_model():
    model = sharp_model().cuda()
    examples = [render(check_row(row, "row"), "completion") for row in ROWS]
    picks = {}
    for dtype in (torch.float32, torch.bfloat16):
        losses = ending_losses(model, examples, Runtime(torch.device("cuda"), dtype, compile=False))
        picks[dtype] = [p.tolist() for p in predictions(losses, examples)]
    assert picks[torch.bfloat16] == picks[torch.float32]
