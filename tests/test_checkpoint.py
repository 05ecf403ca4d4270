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
    prune_checkpoints,
    restore_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pretrain.config import Config, to_dict
from pretrain.loader import ShardLoader
from pretrain.resume import plan_resume


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


# -- resume plans, RNG states, pruning (unit level; end-to-end runs are in test_resume.py) ------------------------

MODEL = to_dict(Config(model=GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)))["model"]


def resumable_state(step: int) -> dict:
    """tiny_state with the entries a resume needs (their contents do not matter to the plan)."""
    return {**tiny_state(step), "optimizer": {}, "tokens_seen": 0, "train_loader": {}, "rng": [], "world_size": 1}


def test_auto_resumes_from_the_newest_and_none_refuses_a_used_folder(tmp_path):
    assert plan_resume(tmp_path, "auto", MODEL).path is None  # nothing there: a fresh start
    for step in (4, 8):
        save_checkpoint(checkpoint_path(tmp_path, step), resumable_state(step))
    assert plan_resume(tmp_path, "auto", MODEL).path == tmp_path / "ckpt_000008.pt"
    with pytest.raises(CheckpointError, match=f"train.out_dir {tmp_path} already holds another run") as refused:
        plan_resume(tmp_path, "none", MODEL)
    assert "--train.resume=auto" in str(refused.value)
    assert "another --train.out_dir" in str(refused.value)


def test_metrics_without_a_checkpoint_are_not_overwritten_by_a_fresh_start(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 10.9}\n')
    with pytest.raises(CheckpointError, match="found no checkpoint, and train.out_dir .* holds another run"):
        plan_resume(tmp_path, "auto", MODEL)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0, "loss": 10.9}\n'


def test_corrupt_newest_falls_back_to_the_previous_and_is_kept_aside(tmp_path):
    for step in (4, 8):
        save_checkpoint(checkpoint_path(tmp_path, step), resumable_state(step))
    newest = checkpoint_path(tmp_path, 8)
    newest.write_bytes(newest.read_bytes()[:1000])
    plan = plan_resume(tmp_path, "auto", MODEL)
    assert plan.path == tmp_path / "ckpt_000004.pt"
    assert "ckpt_000008.pt is truncated or corrupt" in plan.notes[0]
    assert "fell back to the previous checkpoint" in plan.notes[0]
    assert (tmp_path / "ckpt_000008.pt.corrupt").is_file()
    assert find_latest(tmp_path) == tmp_path / "ckpt_000004.pt"


def test_a_different_model_shape_is_named(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 4), resumable_state(4))
    wider = {**MODEL, "n_embd": 32, "dropout": 0.1}  # dropout is not the model's shape: only n_embd is named
    with pytest.raises(CheckpointError, match=r"the model differs \(model.n_embd 16 -> 32\);"):
        plan_resume(tmp_path, "auto", wider)


def test_resuming_an_older_step_into_a_folder_with_newer_checkpoints_is_refused(tmp_path):
    for step in (4, 8):
        save_checkpoint(checkpoint_path(tmp_path, step), resumable_state(step))
    with pytest.raises(CheckpointError, match=r"holds later checkpoints \(ckpt_000008.pt\)"):
        plan_resume(tmp_path, str(checkpoint_path(tmp_path, 4)), MODEL)
    other = tmp_path / "branch"
    assert plan_resume(other, str(checkpoint_path(tmp_path, 4)), MODEL).path == checkpoint_path(tmp_path, 4)
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 0, "loss": 10.9}\n')
    with pytest.raises(CheckpointError, match="another folder"):
        plan_resume(other, str(checkpoint_path(tmp_path, 4)), MODEL)


def test_resume_keeps_the_metrics_before_the_resumed_step_only(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 2), resumable_state(2))
    records = ['{"step": 0, "val_loss": 11.0}', '{"step": 0, "loss": 10.9}', '{"step": 1, "loss": 10.5}',
               '{"step": 2, "val_loss": 10.1}', '{"step": 2, "loss": 10.0}', '{"step": 3, "lo']  # cut by a kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(records))
    plan_resume(tmp_path, "auto", MODEL)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == records[:3]


def test_stray_temp_files_are_removed_and_finished_checkpoints_kept(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 4), resumable_state(4))
    (tmp_path / ".ckpt_000008.pt.tmp.777").write_bytes(b"partial")
    (tmp_path / ".notes.txt.tmp.1").write_text("not a checkpoint's")
    plan = plan_resume(tmp_path, "auto", MODEL)
    assert plan.notes == ["removed .ckpt_000008.pt.tmp.777, left by a save that was killed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.txt.tmp.1", "ckpt_000004.pt"]


def test_pruning_never_deletes_the_checkpoint_just_saved(tmp_path):
    for step in (90, 100, 20):  # 90 and 100 are another lineage's higher steps
        save_checkpoint(checkpoint_path(tmp_path, step), resumable_state(step))
    prune_checkpoints(tmp_path, keep=1, newest_step=20)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_000020.pt", "ckpt_000090.pt", "ckpt_000100.pt"]


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
    optimizer = model.configure_optimizers(0.1, 1e-3)
    loader = ShardLoader(tiny_shards, "train", batch_size=2, seq_len=8, seed=1)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "train_loader": loader.state_dict(),
             "rng": [rng_state(torch.device("cpu"))]}
    reseeded = ShardLoader(tiny_shards, "train", batch_size=2, seq_len=8, seed=2)
    with pytest.raises(CheckpointError, match="cannot resume from ckpt_000004.pt: train loader state does not match: "
                                              "seed changed from 1 to 2"):
        restore_training_state(state, Path("ckpt_000004.pt"), model, optimizer, reseeded, 0, torch.device("cpu"))


def test_restored_optimizer_takes_this_runs_hyperparameters(tiny_shards):
    model = GPT(GPTConfig(**MODEL))
    old = model.configure_optimizers(0.1, 1e-3, betas=(0.9, 0.95))
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    old.step()
    loader = ShardLoader(tiny_shards, "train", batch_size=2, seq_len=8)
    state = {"model": model.state_dict(), "optimizer": old.state_dict(), "train_loader": loader.state_dict(),
             "rng": [rng_state(torch.device("cpu"))]}
    new = model.configure_optimizers(0.0, 1e-3, betas=(0.8, 0.99))
    restore_training_state(state, Path("ckpt.pt"), model, new, loader, 0, torch.device("cpu"))
    assert new.param_groups[0]["weight_decay"] == 0.0
    assert new.param_groups[0]["betas"] == (0.8, 0.99)
    first = next(iter(new.state.values()))
    assert torch.equal(first["exp_avg"], next(iter(old.state.values()))["exp_avg"])


def test_a_checkpoint_without_the_resume_entries_is_refused_by_name(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 4), tiny_state(4))  # model, step and config only
    with pytest.raises(CheckpointError, match="ckpt_000004.pt cannot be resumed: it lacks optimizer, tokens_seen, "
                                              "train_loader, rng, world_size"):
        plan_resume(tmp_path, "auto", MODEL)
