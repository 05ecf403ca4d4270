"""The run folder: which checkpoint a run continues from (train.resume), refusals that keep two runs apart,
records truncated to the resumed step, stray temporary files and pruning. (End-to-end runs: test_resume.py.)"""

import pytest
import torch

from model import GPT, GPTConfig
from pretrain.checkpoint import CheckpointError, checkpoint_path, find_latest, save_checkpoint
from pretrain.config import Config, to_dict
from pretrain.run_dir import RunDir, Start, choose_start

MODEL = to_dict(Config(model=GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)))["model"]


def tiny_state(step: int) -> dict:
    cfg = Config(model=GPTConfig(**MODEL))
    torch.manual_seed(step)
    return {"model": GPT(cfg.model).state_dict(), "step": step, "config": to_dict(cfg)}


def resumable_state(step: int) -> dict:
    """tiny_state with the entries a resume needs (their contents do not matter to the choice)."""
    return {**tiny_state(step), "optimizer": {}, "tokens_seen": 0, "train_loader": {}, "rng": [], "world_size": 1}


def choose(folder, resume: str, model_config: dict) -> Start:
    return choose_start(RunDir(folder), resume, model_config)


def test_auto_resumes_from_the_newest_and_none_refuses_a_used_folder(tmp_path):
    assert choose(tmp_path, "auto", MODEL).path is None  # nothing there: a fresh start
    for step in (4, 8):
        save_checkpoint(checkpoint_path(tmp_path, step), resumable_state(step))
    assert choose(tmp_path, "auto", MODEL).path == tmp_path / "ckpt_000008.pt"
    with pytest.raises(CheckpointError, match=f"train.out_dir {tmp_path} already holds another run") as refused:
        choose(tmp_path, "none", MODEL)
    assert "--train.resume=auto" in str(refused.value)
    assert "another --train.out_dir" in str(refused.value)


def test_metrics_without_a_checkpoint_are_not_overwritten_by_a_fresh_start(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 10.9}\n')
    with pytest.raises(CheckpointError, match="found no checkpoint, and train.out_dir .* holds another run"):
        choose(tmp_path, "auto", MODEL)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0, "loss": 10.9}\n'


def test_corrupt_newest_falls_back_to_the_previous_and_is_kept_aside(tmp_path):
    for step in (4, 8):
        save_checkpoint(checkpoint_path(tmp_path, step), resumable_state(step))
    newest = checkpoint_path(tmp_path, 8)
    newest.write_bytes(newest.read_bytes()[:1000])
    plan = choose(tmp_path, "auto", MODEL)
    assert plan.path == tmp_path / "ckpt_000004.pt"
    assert "ckpt_000008.pt is truncated or corrupt" in plan.notes[0]
    assert "fell back to the previous checkpoint" in plan.notes[0]
    assert (tmp_path / "ckpt_000008.pt.corrupt").is_file()
    assert find_latest(tmp_path) == tmp_path / "ckpt_000004.pt"


def test_a_different_model_shape_is_named(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 4), resumable_state(4))
    wider = {**MODEL, "n_embd": 32, "dropout": 0.1}  # dropout is not the model's shape: only n_embd is named
    with pytest.raises(CheckpointError, match=r"the model differs \(model.n_embd 16 -> 32\);"):
        choose(tmp_path, "auto", wider)


def test_resuming_an_older_step_into_a_folder_with_newer_checkpoints_is_refused(tmp_path):
    for step in (4, 8):
        save_checkpoint(checkpoint_path(tmp_path, step), resumable_state(step))
    with pytest.raises(CheckpointError, match=r"holds later checkpoints \(ckpt_000008.pt\)"):
        choose(tmp_path, str(checkpoint_path(tmp_path, 4)), MODEL)
    other = tmp_path / "branch"
    assert choose(other, str(checkpoint_path(tmp_path, 4)), MODEL).path == checkpoint_path(tmp_path, 4)
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 0, "loss": 10.9}\n')
    with pytest.raises(CheckpointError, match="another folder"):
        choose(other, str(checkpoint_path(tmp_path, 4)), MODEL)


def test_resume_keeps_the_records_before_the_resumed_step_only(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 2), resumable_state(2))
    records = ['{"step": 0, "val_loss": 11.0}', '{"step": 0, "loss": 10.9}', '{"step": 1, "loss": 10.5}',
               '{"step": 2, "val_loss": 10.1}', '{"step": 2, "loss": 10.0}', '{"step": 3, "lo']  # cut by a kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(records))
    health = ['{"step": 0, "grad_norm": 1.5}', '{"step": 2, "grad_norm": 0.5}', '{"step": 4, "grad_norm": 0.25}']
    (tmp_path / "health.jsonl").write_text("\n".join(health) + "\n")
    choose(tmp_path, "auto", MODEL)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == records[:3]
    assert (tmp_path / "health.jsonl").read_text().splitlines() == health[:1]


def test_stray_temp_files_are_removed_and_finished_checkpoints_kept(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 4), resumable_state(4))
    (tmp_path / ".ckpt_000008.pt.tmp.777").write_bytes(b"partial")
    (tmp_path / ".notes.txt.tmp.1").write_text("not a checkpoint's")
    plan = choose(tmp_path, "auto", MODEL)
    assert plan.notes == ["removed .ckpt_000008.pt.tmp.777, left by a save that was killed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.txt.tmp.1", "ckpt_000004.pt"]


def test_pruning_never_deletes_the_checkpoint_just_saved(tmp_path):
    for step in (90, 100, 20):  # 90 and 100 are another lineage's higher steps
        save_checkpoint(checkpoint_path(tmp_path, step), resumable_state(step))
    RunDir(tmp_path).prune_checkpoints(keep=1, newest_step=20)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_000020.pt", "ckpt_000090.pt", "ckpt_000100.pt"]


def test_a_checkpoint_without_the_resume_entries_is_refused_by_name(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 4), tiny_state(4))  # model, step and config only
    with pytest.raises(CheckpointError, match="ckpt_000004.pt cannot be resumed: it lacks optimizer, tokens_seen, "
                                              "train_loader, rng, world_size"):
        choose(tmp_path, "auto", MODEL)
