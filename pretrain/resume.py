"""Which checkpoint a run starts from (train.resume), and keeping its out_dir to one run.

    auto   out_dir holds checkpoints: continue from the newest readable one (a corrupt newest is renamed
           *.corrupt and the previous one used); no checkpoints: start fresh
    none   start fresh
    PATH   continue from that checkpoint file (or the newest in that run directory)

A fresh start into an out_dir that already holds a run's checkpoints or metrics is refused, so two runs never
mix; so is resuming from a step older than checkpoints already in out_dir (pruning would delete the new ones).
When resuming, metrics.jsonl keeps only the records before the resumed step, so every step appears once.
Rank 0 decides (it alone touches files); the other ranks receive its answer or its error.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from pretrain import checkpoint, distributed
from pretrain.checkpoint import CheckpointError
from pretrain.fileio import atomic_write_text

METRICS_FILE = "metrics.jsonl"


@dataclass
class ResumePlan:
    path: Path | None  # the checkpoint to continue from; None: a fresh start
    notes: list[str] = field(default_factory=list)  # lines for the log (fallbacks, cleanups)


def plan_resume(out_dir: str | Path, resume: str, model_config: dict) -> ResumePlan:
    """Rank 0 decides where the run starts and tidies out_dir; every rank returns the same plan or raises the same
    error (CheckpointError for a refusal)."""
    decided = None
    if distributed.is_master():
        try:
            decided = _plan(Path(out_dir), resume, model_config)
        except Exception as e:  # any failure, so that the other ranks raise it too instead of waiting for rank 0
            decided = e
    decided = distributed.from_master(decided)
    if isinstance(decided, Exception):
        raise decided
    return decided


def _plan(out_dir: Path, resume: str, model_config: dict) -> ResumePlan:
    notes = [f"removed {p.name}, left by a save that was killed" for p in checkpoint.remove_stray_temp_files(out_dir)]
    if resume == "none":
        _refuse_if_taken(out_dir, "train.resume=none, but")
        return ResumePlan(None, notes)
    if resume == "auto" and not checkpoint.list_checkpoints(out_dir):
        _refuse_if_taken(out_dir, "train.resume=auto found no checkpoint, and")
        return ResumePlan(None, notes)
    source = out_dir if resume == "auto" else Path(resume)
    if source.is_dir():
        path, state = _newest_readable(source, notes)
    else:
        path, state = source, checkpoint.load_checkpoint(source)  # a clear error now, not on every rank later
    missing = [key for key in checkpoint.RESUME_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: it lacks {', '.join(missing)} (written before "
                              "resuming existed?); load_model still reads its weights")
    differences = checkpoint.model_differences(state["config"], {"model": model_config})
    if differences:
        raise CheckpointError(f"cannot resume from {path}: the model differs ({', '.join(differences)}); use the "
                              "checkpoint's model settings, or another --train.out_dir to start afresh")
    if path.parent.resolve() != out_dir.resolve():
        _refuse_if_taken(out_dir, f"resuming from {path} (another folder), but")
    _refuse_newer(out_dir, path, state["step"])
    truncate_metrics(out_dir / METRICS_FILE, state["step"])
    return ResumePlan(path, notes)


def _refuse_if_taken(out_dir: Path, why: str) -> None:
    taken = [p.name for p in checkpoint.list_checkpoints(out_dir)]
    metrics = out_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        taken.append(METRICS_FILE)
    if taken:
        raise CheckpointError(f"{why} train.out_dir {out_dir} already holds another run ({', '.join(taken[-3:])}): "
                              "choose another --train.out_dir, or continue that run with --train.resume=auto")


def _newest_readable(run_dir: Path, notes: list[str]) -> tuple[Path, dict]:
    """The newest checkpoint that loads, and its contents; unreadable newer ones are renamed *.corrupt (kept, never
    used again)."""
    found = checkpoint.list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir} holds no checkpoint (ckpt_<step>.pt) to resume from")
    for path in reversed(found):
        try:
            return path, checkpoint.load_checkpoint(path)
        except CheckpointError as e:
            corrupt = path.with_name(path.name + ".corrupt")
            path.rename(corrupt)
            notes.append(f"{e}; renamed it {corrupt.name} and fell back to the previous checkpoint")
    raise CheckpointError(f"no checkpoint in {run_dir} is readable (all renamed *.corrupt): start afresh in another "
                          "--train.out_dir")


def _refuse_newer(out_dir: Path, path: Path, step: int) -> None:
    newer = [p.name for p in checkpoint.list_checkpoints(out_dir) if checkpoint.checkpoint_step(p) > step]
    if newer:
        raise CheckpointError(f"resuming from {path} (step {step}) into {out_dir}, which holds later checkpoints "
                              f"({', '.join(newer)}) that pruning would mix with the new ones: resume into another "
                              "--train.out_dir, or move them away")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records before `step` (and drop a line cut short by a crash); the resumed run logs the rest."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", -1) < step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def continue_from(plan: ResumePlan, config: dict, model, optimizer, train_loader, rank: int, world_size: int,
                  device) -> tuple[int, int, list[str]]:
    """Load plan.path into the model, optimizer, loader and RNGs. Returns (step, tokens seen, lines for the log)."""
    state = checkpoint.load_checkpoint(plan.path)
    checkpoint.restore_training_state(state, plan.path, model, optimizer, train_loader, rank, device)
    step, tokens_seen = state["step"], state["tokens_seen"]
    lines = [f"resuming from {plan.path}: step {step}, {tokens_seen:,} tokens seen"]
    changes = checkpoint.changed_settings(state["config"], config)
    if changes:
        lines.append(f"settings changed since the checkpoint: {', '.join(changes)}")
    if state["world_size"] != world_size:
        lines.append(f"world size changed from {state['world_size']} to {world_size}: the data continues at the same "
                     f"token ({train_loader.position:,}), {config['data']['total_batch_tokens']:,} tokens per step; "
                     "dropout's random streams are not those of an unchanged run")
    return step, tokens_seen, lines
