"""Checkpoints: atomic, safe to load, clear errors for damaged files, one loader for every script."""

import pickle

import pytest
import torch

from model import GPT, GPTConfig
from pretrain.checkpoint import (
    CheckpointError,
    checkpoint_path,
    find_latest,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    save_checkpoint,
)
from pretrain.config import Config, to_dict


def tiny_state(step: int = 7) -> dict:
    cfg = Config(model=GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    torch.manual_seed(step)
    return {"model": GPT(cfg.model).state_dict(), "step": step, "config": to_dict(cfg)}


def test_round_trip_and_load_model(tmp_path):
    state = tiny_state()
    path = save_checkpoint(checkpoint_path(tmp_path, 7), state)
    assert path.name == "ckpt_000007.pt" and [p.name for p in tmp_path.iterdir()] == ["ckpt_000007.pt"]
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    model, meta = load_model(tmp_path)  # a run directory means its newest checkpoint
    assert meta["step"] == 7 and not model.training
    assert torch.equal(model.transformer.wte.weight, state["model"]["transformer.wte.weight"])


def test_find_latest_takes_the_highest_step_and_ignores_temporary_files(tmp_path):
    assert find_latest(tmp_path) is None
    for step in (5, 12, 9):
        save_checkpoint(checkpoint_path(tmp_path, step), tiny_state(step))
    (tmp_path / ".ckpt_000099.pt.tmp.123").write_bytes(b"partial")
    assert find_latest(tmp_path).name == "ckpt_000012.pt"
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_000009.pt", "ckpt_000012.pt"]
    prune_checkpoints(tmp_path, keep=0)  # 0 keeps everything
    assert len(list(tmp_path.glob("ckpt_*"))) == 2


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt_000001.pt", tiny_state())
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"ckpt_000001.pt is truncated or corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "ckpt_000002.pt")


class Payload:
    def __reduce__(self):
        return (print, ("this checkpoint ran code",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    assert "ran code" not in capsys.readouterr().out
    path.write_bytes(pickle.dumps({"model": 1}))  # not even a torch zip file
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)


def test_failed_save_leaves_the_previous_file(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt_000001.pt", tiny_state(1))
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, {"model": lambda: None})  # torch.save cannot pickle a lambda
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt_000001.pt"]
