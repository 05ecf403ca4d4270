"""Checkpoints: atomic, safe to load, clear errors for damaged files, one loader for every script."""

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from model import GPT, GPTConfig
from pretrain.checkpoint import (
    CheckpointError,
    checkpoint_path,
    find_latest,
    load_checkpoint,
    load_model,
    restore_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pretrain.config import Config, OptimConfig, to_dict
from pretrain.loader import ShardLoader
from pretrain.optim import build_optimizer


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


MODEL = to_dict(Config(model=GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)))["model"]


# -- RNG states and restoring a training state ------------------------------------------------------------

def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.rand(5)
    state = rng_state(torch.device("cpu"))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    save_checkpoint(tmp_path / "rng.pt", {"model": {}, "config": {}, "rng": state})
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"], torch.device("cpu"))
    assert random.random() == expected[0]
    assert np.random.rand() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


def test_restoring_a_loader_of_other_data_names_what_changed(tmp_path, tiny_shards):
    model = GPT(GPTConfig(**MODEL))
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1, lr=1e-3), "cpu")
    loader = ShardLoader(tiny_shards, "train", batch_size=2, seq_len=8, seed=1)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "train_loader": loader.state_dict(),
             "rng": [rng_state(torch.device("cpu"))]}
    reseeded = ShardLoader(tiny_shards, "train", batch_size=2, seq_len=8, seed=2)
    with pytest.raises(CheckpointError, match="cannot resume from ckpt_000004.pt: train loader state does not match: "
                                              "seed changed from 1 to 2"):
        restore_training_state(state, Path("ckpt_000004.pt"), model, optimizer, reseeded, 0, torch.device("cpu"))


def test_restored_optimizer_takes_this_runs_hyperparameters(tiny_shards):
    model = GPT(GPTConfig(**MODEL))
    old = build_optimizer(model, OptimConfig(weight_decay=0.1, lr=1e-3, beta1=0.9, beta2=0.95), "cpu")
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    old.step()
    loader = ShardLoader(tiny_shards, "train", batch_size=2, seq_len=8)
    state = {"model": model.state_dict(), "optimizer": old.state_dict(), "train_loader": loader.state_dict(),
             "rng": [rng_state(torch.device("cpu"))]}
    new = build_optimizer(model, OptimConfig(weight_decay=0.0, lr=1e-3, beta1=0.8, beta2=0.99), "cpu")
    restore_training_state(state, Path("ckpt.pt"), model, new, loader, 0, torch.device("cpu"))
    assert new.param_groups[0]["weight_decay"] == 0.0
    assert new.param_groups[0]["betas"] == (0.8, 0.99)
    first = next(iter(new.state.values()))
    assert torch.equal(first["exp_avg"], next(iter(old.state.values()))["exp_avg"])
