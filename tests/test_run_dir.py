"""The run folder: which checkpoint a run continues from (train.resume), refusals that keep two runs apart,
records truncated to the resumed step, stray temporary files and pruning. (End-to-end runs: test_resume.py.)"""

import json
import os

import pytest
import torch

from model import GPT, GPTConfig
from pretrain.checkpoint import CheckpointError, checkpoint_path, find_latest, save_checkpoint
from pretrain.config import Config, to_dict
from pretrain.run_dir import RunDir, RunDirError, Start, choose_start

MODEL = to_dict(Config(model=GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)))["model"]


def tiny_state(step: int) -> dict:
    cfg = Config(model=GPTConfig(**MODEL))
    torch.manual_seed(step)
    return {"model": GPT(cfg.model).state_dict(), "step": step, "config": to_dict(cfg)}


def resumable_state(step: int) -> dict:
    """tiny_state with the entries a resume needs (their contents do not matter to the choice)."""
    return {**tiny_state(step), "optimizer": {}, "tokens_seen": 0, "train_loader": {}, "rng": [], "world_size": 1}


def config(max_steps: int = 100, **model) -> dict:
    """A run's whole config as a dict, with MODEL's shape (changed by `model`)."""
    cfg = Config(model=GPTConfig(**{**MODEL, **model}))
    cfg.train.max_steps = max_steps
    return to_dict(cfg)


def choose(folder, resume: str, run_config: dict | None = None) -> Start:
    """choose_start as a run does, then let the folder go (as a run does when it ends)."""
    run = RunDir(folder)
    try:
        return choose_start(run, resume, run_config or config())
    finally:
        run.release()


def test_auto_resumes_from_the_newest_and_none_refuses_to_mix_with_checkpoints(tmp_path):
    assert choose(tmp_path, "auto").path is None  # nothing there: a fresh start
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # and a run that stops now leaves nothing
    for step in (4, 8):
        save_checkpoint(checkpoint_path(tmp_path, step), resumable_state(step))
    assert choose(tmp_path, "auto").path == tmp_path / "ckpt_000008.pt"
    with pytest.raises(RunDirError, match=f"train.resume=none, but train.out_dir {tmp_path} holds checkpoints "
                                              r"\(ckpt_000004.pt, ckpt_000008.pt\)") as refused:
        choose(tmp_path, "none")
    assert "--train.resume=auto" in str(refused.value)
    assert "another --train.out_dir" in str(refused.value)


def write_records_of_an_early_crash(folder, run_config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text('{"step": 0, "loss": 10.9}\n{"step": 1, "loss": 10.5}\n')
    (folder / "health.jsonl").write_text('{"step": 0, "grad_norm": 1.5}\n')
    (folder / "train_config.json").write_text(json.dumps(run_config))
    (folder / "tensorboard").mkdir()
    (folder / "tensorboard" / "events.out.tfevents.1").write_bytes(b"stale")


def test_the_same_run_after_a_crash_before_its_first_checkpoint_starts_again_with_nothing_stale(tmp_path):
    write_records_of_an_early_crash(tmp_path, config())
    start = choose(tmp_path, "auto", config())
    assert start.path is None
    assert start.notes == [f"an earlier attempt in {tmp_path} stopped before its first checkpoint, its records ended "
                           "at step 1: removed its records (metrics.jsonl, health.jsonl, train_config.json, "
                           "tensorboard), starting again from step 0"]
    assert list(tmp_path.iterdir()) == []


def test_another_runs_records_are_refused_with_a_way_out_that_works(tmp_path):
    write_records_of_an_early_crash(tmp_path, config(n_layer=2))
    with pytest.raises(RunDirError, match=r"holds the records of another run that stopped before its first "
                                              r"checkpoint .*its settings differ: model.n_layer 2 -> 1\): choose "
                                              r"another --train.out_dir, or start over in this one with "
                                              r"--train.resume=none"):
        choose(tmp_path, "auto", config())
    assert (tmp_path / "metrics.jsonl").read_text().startswith('{"step": 0')  # refused: nothing touched
    assert choose(tmp_path, "none", config()).path is None  # the way out named
    assert list(tmp_path.iterdir()) == []


def test_a_second_run_into_a_held_folder_stops_and_a_released_one_is_free(tmp_path):
    first = RunDir(tmp_path)
    first.hold()
    try:
        with pytest.raises(RunDirError, match=f"train.out_dir {tmp_path} is in use by another run "
                                                  rf"\(pid {os.getpid()} on "):
            choose(tmp_path, "auto")
    finally:
        first.release()
    assert choose(tmp_path, "auto").path is None


def test_corrupt_newest_falls_back_to_the_previous_and_is_kept_aside(tmp_path):
    for step in (4, 8):
        save_checkpoint(checkpoint_path(tmp_path, step), resumable_state(step))
    newest = checkpoint_path(tmp_path, 8)
    newest.write_bytes(newest.read_bytes()[:1000])
    plan = choose(tmp_path, "auto")
    assert plan.path == tmp_path / "ckpt_000004.pt"
    assert "ckpt_000008.pt is truncated or corrupt" in plan.notes[0]
    assert "fell back to the previous checkpoint" in plan.notes[0]
    assert (tmp_path / "ckpt_000008.pt.corrupt").is_file()
    assert find_latest(tmp_path) == tmp_path / "ckpt_000004.pt"


def test_a_different_model_shape_is_named(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 4), resumable_state(4))
    wider = config(n_embd=32, dropout=0.1)  # dropout is not the model's shape: only n_embd is named
    with pytest.raises(CheckpointError, match=r"the model differs \(model.n_embd 16 -> 32\);"):
        choose(tmp_path, "auto", wider)


def test_resuming_an_older_step_into_a_folder_with_newer_checkpoints_is_refused(tmp_path):
    for step in (4, 8):
        save_checkpoint(checkpoint_path(tmp_path, step), resumable_state(step))
    with pytest.raises(RunDirError, match=r"holds later checkpoints \(ckpt_000008.pt\)"):
        choose(tmp_path, str(checkpoint_path(tmp_path, 4)))
    other = tmp_path / "branch"
    assert choose(other, str(checkpoint_path(tmp_path, 4))).path == checkpoint_path(tmp_path, 4)
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 0, "loss": 10.9}\n')
    with pytest.raises(RunDirError, match="another folder"):
        choose(other, str(checkpoint_path(tmp_path, 4)))


def test_resume_keeps_the_records_before_the_resumed_step_only(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 2), resumable_state(2))
    records = ['{"step": 0, "val_loss": 11.0}', '{"step": 0, "loss": 10.9}', '{"step": 1, "loss": 10.5}',
               '{"step": 2, "val_loss": 10.1}', '{"step": 2, "loss": 10.0}', '{"step": 3, "lo']  # cut by a kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(records))
    health = ['{"step": 0, "grad_norm": 1.5}', '{"step": 2, "grad_norm": 0.5}', '{"step": 4, "grad_norm": 0.25}']
    (tmp_path / "health.jsonl").write_text("\n".join(health) + "\n")
    start = choose(tmp_path, "auto")
    # the steps before 2, and the evaluation at 2 of ckpt_2's weights, which the resumed run does not redo
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == records[:4]
    assert start.evaluated == ["val_loss"]
    assert (tmp_path / "health.jsonl").read_text().splitlines() == health[:1]


def test_stray_temp_files_are_removed_and_finished_checkpoints_kept(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 4), resumable_state(4))
    (tmp_path / ".ckpt_000008.pt.tmp.777").write_bytes(b"partial")
    (tmp_path / ".notes.txt.tmp.1").write_text("not a checkpoint's")
    plan = choose(tmp_path, "auto")
    assert plan.notes == ["removed .ckpt_000008.pt.tmp.777, left by a save that was killed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".notes.txt.tmp.1", "ckpt_000004.pt"]


def test_pruning_never_deletes_the_checkpoint_just_saved(tmp_path):
    for step in (90, 100, 20):  # 90 and 100 are another lineage's higher steps
        save_checkpoint(checkpoint_path(tmp_path, step), resumable_state(step))
    RunDir(tmp_path).prune_checkpoints(keep=1, newest_step=20)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_000020.pt", "ckpt_000090.pt", "ckpt_000100.pt"]


def test_a_checkpoint_without_the_resume_entries_is_refused_by_name(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 4), tiny_state(4))  # model, step and config only
    with pytest.raises(CheckpointError, match="ckpt_000004.pt cannot be resumed: it lacks optimizer, tokens_seen, "
                                              "train_loader, rng, world_size"):
        choose(tmp_path, "auto")


def test_a_finished_runs_rerun_changes_nothing_and_one_stopped_in_its_final_evaluation_redoes_it(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 6), resumable_state(6))
    records = '{"step": 5, "loss": 9.0}\n{"step": 6, "val_loss": 9.1}\n'
    (tmp_path / "metrics.jsonl").write_text(records)
    (tmp_path / "summary.json").write_text(json.dumps({"final_checkpoint": str(checkpoint_path(tmp_path, 6))}))
    start = choose(tmp_path, "auto", config(max_steps=6))
    assert start.has_nothing_to_do(6)
    assert (tmp_path / "metrics.jsonl").read_text() == records  # the final records stay
    assert choose(tmp_path, "auto", config(max_steps=4)).has_nothing_to_do(4)  # past a lowered max_steps
    assert (tmp_path / "metrics.jsonl").read_text() == records

    (tmp_path / "summary.json").unlink()  # stopped during its final evaluation: no summary
    start = choose(tmp_path, "auto", config(max_steps=6))
    assert start.step == 6
    assert not start.has_nothing_to_do(6)
    assert (tmp_path / "metrics.jsonl").read_text() == records  # the evaluations it made of ckpt_6 stay ...
    assert start.evaluated == ["val_loss"]  # ... and are not redone


def test_a_finished_run_resumed_further_keeps_its_evaluation_at_the_checkpoint(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 6), resumable_state(6))
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "loss": 9.0}\n{"step": 6, "val_loss": 9.1}\n'
                                            '{"step": 6, "core": 0.1, "core_arc": 0.2}\n{"step": 6, "loss": 8.9}\n'
                                            '{"step": 7, "val_loss": 8.8}\n')
    (tmp_path / "health.jsonl").write_text('{"step": 5, "grad_norm": 1.0}\n{"step": 6, "grad_norm": 0.5}\n')
    start = choose(tmp_path, "auto", config(max_steps=12))  # max_steps raised after the run ended at 6
    assert start.evaluated == ["val_loss", "core", "core_arc"]
    # the evaluations of ckpt_6's weights stay; step 6's training record and everything later are redone
    assert (tmp_path / "metrics.jsonl").read_text() == ('{"step": 5, "loss": 9.0}\n{"step": 6, "val_loss": 9.1}\n'
                                                        '{"step": 6, "core": 0.1, "core_arc": 0.2}\n')
    assert (tmp_path / "health.jsonl").read_text() == '{"step": 5, "grad_norm": 1.0}\n'


def test_a_run_started_from_another_folders_checkpoint_reruns_with_the_same_command(tmp_path):
    trunk, branch = tmp_path / "trunk", tmp_path / "branch"
    save_checkpoint(checkpoint_path(trunk, 4), resumable_state(4))
    source = str(checkpoint_path(trunk, 4))
    branch_config = config(max_steps=10)
    branch_config["train"]["resume"] = source
    # an attempt that stopped before the branch's first checkpoint: the same command starts from the trunk again
    write_records_of_an_early_crash(branch, branch_config)
    assert choose(branch, source, branch_config).path == checkpoint_path(trunk, 4)
    assert not (branch / "metrics.jsonl").exists()
    # once the branch has checkpoints of its own, the same command continues from them
    state = resumable_state(6)
    state["config"] = branch_config
    save_checkpoint(checkpoint_path(branch, 6), state)
    start = choose(branch, source, branch_config)
    assert start.path == checkpoint_path(branch, 6)
    assert f"continuing this run's own checkpoints (it started from {source})" in start.notes
    # another run's checkpoints in the folder are still refused
    with pytest.raises(RunDirError, match="already holds another run's checkpoints"):
        choose(branch, str(checkpoint_path(trunk, 4)).replace("trunk", "trunk/."), branch_config)


def test_skipped_steps_before_the_resumed_step_count_toward_the_limit(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 4), resumable_state(4))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "skipped": true}\n{"step": 2, "skipped": true}\n'
                                            '{"step": 4, "skipped": true}\n')
    assert choose(tmp_path, "auto").skipped == 2
