"""The run folder (train.out_dir): the names of its files, which checkpoint a run continues from, and keeping the
folder to one run.

    metrics.jsonl       every step's record, validation losses, HellaSwag (metrics.MetricsLogger)
    health.jsonl        training-health records (health.HealthMonitor)
    train_config.json   the resolved config
    summary.json        the end-of-run summary
    tensorboard/        TensorBoard events (train.tensorboard)
    ckpt_<step>.pt      checkpoints (pretrain.checkpoint says what one holds)

Where a run starts (train.resume):
    auto   the folder holds checkpoints: continue from the newest readable one (a corrupt newest is renamed
           *.corrupt and the previous one used); none: start at step 0
    none   start at step 0
    PATH   continue from that checkpoint file (or the newest in that run folder)
A run holds its folder while it trains (an flock on .lock, which the kernel drops when the process ends, so a
crashed run leaves nothing stuck): a second run into it stops at once. Starting at step 0 in a folder that holds
checkpoints is refused (they would be mixed with the new ones), as is resuming from a step older than checkpoints
already there (pruning would delete the new ones). A folder that holds only the records of an attempt that stopped
before its first checkpoint is cleared for the same command's rerun (and refused to another config); a run started
from another folder's checkpoint (train.resume=PATH) continues from its own checkpoints once it has some.
When resuming, every step-keyed record (metrics.jsonl, health.jsonl; TensorBoard purges its own) keeps the records
before the resumed step, and the evaluations at it (they measured the checkpoint's weights; the resumed run does not
redo them), so every step appears once; a run that already finished is left as it is. Rank 0 decides (it alone
touches files) and loads the checkpoint once; the other ranks receive its answer or its error. resume() hands the
loaded checkpoint to pretrain.checkpoint, which puts it back in place.
"""

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from model import GPTConfig
from pretrain import checkpoint, distributed
from pretrain.checkpoint import CheckpointError
from pretrain.errors import UserError
from pretrain.fileio import atomic_write_text, read_jsonl, write_jsonl

METRICS = "metrics.jsonl"
HEALTH = "health.jsonl"
CONFIG = "train_config.json"
SUMMARY = "summary.json"
TENSORBOARD = "tensorboard"
LOCK = ".lock"
STEP_RECORDS = (METRICS, HEALTH)  # JSON lines keyed by "step": truncated to the step a run resumes from
RECORDS = (METRICS, HEALTH, CONFIG, SUMMARY, TENSORBOARD)  # what a run writes besides checkpoints
TEMP_RE = re.compile(r"^\.ckpt_\d+\.pt\.tmp\.\d+$")  # fileio.atomic_path's temporary name for a checkpoint
# What a resumed run needs of a checkpoint (checkpoint.save_training_state writes them all).
RESUME_KEYS = ("model", "optimizer", "step", "tokens_seen", "train_loader", "rng", "config", "world_size")
# Model settings that change the parameters' shapes or meaning: a checkpoint only resumes with the same ones.
# What the weights are: a checkpoint resumes only into the same (zero_init_proj and dropout change no weight's role).
GPT2_DEFAULTS = dataclasses.asdict(GPTConfig())
MODEL_SHAPE_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "position", "norm", "qk_norm",
                    "activation", "tie_head", "logit_softcap")


class RunDirError(UserError):
    """A run folder that is in use, cannot be written, or holds another run; the message says the way out."""


def _is_evaluation(record: dict, path: Path) -> bool:
    """An evaluation of the model after record["step"] steps (validation, HellaSwag, CORE), not a training step's
    record or a health record (both made while training step record["step"])."""
    is_training_step = "loss" in record or record.get("skipped")
    return path.name == METRICS and not is_training_step


class RunDir:
    """One run's folder and the paths of what it holds."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metrics = self.path / METRICS
        self.health = self.path / HEALTH
        self.summary = self.path / SUMMARY
        self.tensorboard = self.path / TENSORBOARD
        self._lock = None  # the open .lock while this process holds the folder
        self._created = False  # whether hold() made the folder

    def __str__(self) -> str:
        return str(self.path)

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.path / CONFIG, json.dumps(config, indent=2) + "\n")

    def read_config(self) -> dict:
        """train_config.json, or {} when the folder has none."""
        path = self.path / CONFIG
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def checkpoint_path(self, step: int) -> Path:
        return checkpoint.checkpoint_path(self.path, step)

    def checkpoints(self) -> list[Path]:
        return checkpoint.list_checkpoints(self.path)

    def newest_checkpoint(self) -> Path | None:
        return checkpoint.find_latest(self.path)

    def prune_checkpoints(self, keep: int, newest_step: int | None = None) -> None:
        """Delete all but the newest `keep` checkpoints (keep 0: delete none). With newest_step, only checkpoints up
        to that step count, so a file with a higher step can never push out the one just saved."""
        if keep <= 0:
            return
        found = self.checkpoints()
        if newest_step is not None:
            found = [p for p in found if checkpoint.checkpoint_step(p) <= newest_step]
        for path in found[:-keep]:
            path.unlink()

    def remove_stray_temp_files(self) -> list[Path]:
        """Delete the temporary files a killed save left behind (never a finished checkpoint). Returns them."""
        stray = [p for p in self.path.iterdir() if TEMP_RE.match(p.name)] if self.path.is_dir() else []
        for path in stray:
            path.unlink(missing_ok=True)
        return stray

    # -- holding the folder ----------------------------------------------------------------------------------------

    def hold(self) -> None:
        """Take the folder for this process's run, or stop with one line naming the run that holds it."""
        try:
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / LOCK, "a+")
        except OSError as e:
            raise RunDirError(f"train.out_dir {self} cannot be written: {e.strerror}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise RunDirError(f"train.out_dir {self} is in use by another run ({holder}): wait for it to end, or "
                              "choose another --train.out_dir") from None
        except OSError as e:  # a filesystem without flock (NFS without a lock daemon, some FUSE mounts)
            lock.close()
            raise RunDirError(f"train.out_dir {self} is on a filesystem that cannot lock files ({e.strerror}), so "
                              "two runs could mix in it: choose a folder on another filesystem") from None
        lock.seek(0)
        lock.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {' '.join(sys.argv)}\n")
        lock.flush()
        self._lock = lock

    def release(self) -> None:
        """Let the folder go; a run that stopped before writing anything leaves no folder (or lock) behind."""
        if self._lock is None:
            return
        self._lock.close()  # closing drops the flock (and, closed, NFS unlinks the file instead of renaming it)
        self._lock = None
        with contextlib.suppress(OSError):  # tidying only: a folder another process wrote into stays
            if [p.name for p in self.path.iterdir()] == [LOCK]:
                (self.path / LOCK).unlink()
                if self._created:
                    self.path.rmdir()

    # -- records ---------------------------------------------------------------------------------------------------

    def records(self) -> list[str]:
        """The names of the records a run has written here (metrics, health, config, summary, TensorBoard)."""
        return [name for name in RECORDS if (self.path / name).exists()]

    def clear_records(self) -> None:
        """Delete every record an earlier attempt wrote (not its checkpoints: it has none when this is called)."""
        for name in self.records():
            path = self.path / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def last_recorded_step(self) -> int | None:
        if not self.metrics.is_file():
            return None
        return max((record["step"] for record in read_jsonl(self.metrics)), default=None)

    def finished_with(self, checkpoint_file: Path) -> bool:
        """Whether the run ended here with its final evaluation and summary after that checkpoint: the summary is
        the last thing a run writes, and names the checkpoint it ended with."""
        if not self.summary.is_file():
            return False
        try:
            ended_with = json.loads(self.summary.read_text(encoding="utf-8")).get("final_checkpoint")
        except json.JSONDecodeError:
            return False
        return ended_with is not None and Path(ended_with).name == checkpoint_file.name

    def truncate_records(self, step: int) -> None:
        """Keep the records of what happened before a run resumed at `step` (and drop a line cut short by a crash):
        every record of the steps before it, and the evaluations at it, which measured the very weights the
        checkpoint of `step` holds. The resumed run logs the rest."""
        for path in (self.path / name for name in STEP_RECORDS):
            if path.is_file():
                kept = [record for record in read_jsonl(path)
                        if record["step"] < step or (record["step"] == step and _is_evaluation(record, path))]
                write_jsonl(path, kept)

    def evaluations_at(self, step: int) -> list[str]:
        """The keys of metrics.jsonl's evaluation records at `step` (val_loss, hellaswag_acc_norm, core, ...): a run
        resumed at `step` does not evaluate those again."""
        if not self.metrics.is_file():
            return []
        return [key for record in read_jsonl(self.metrics) if record["step"] == step
                and _is_evaluation(record, self.metrics) for key in record if key != "step"]

    def skipped_before(self, step: int) -> int:
        """How many steps before `step` were skipped (train.skip_nonfinite counts over the whole run)."""
        if not self.metrics.is_file():
            return 0
        return sum(1 for record in read_jsonl(self.metrics) if record.get("skipped") and record["step"] < step)


# ---- where a run starts ------------------------------------------------------------------------------------------

@dataclass
class Start:
    """Where a run starts: a checkpoint (its path and, on rank 0, its loaded contents) or a fresh start."""
    path: Path | None = None  # None: a fresh start
    notes: list[str] = field(default_factory=list)  # lines for the log (fallbacks, cleanups)
    state: dict | None = None  # the checkpoint's contents, loaded once by rank 0 (None on the other ranks)
    step: int = 0  # the checkpoint's step
    finished: bool = False  # the checkpoint's run ended with its final evaluation and summary
    evaluated: list[str] = field(default_factory=list)  # record keys already evaluated at `step` (not redone)
    skipped: int = 0  # steps skipped before `step` (train.skip_nonfinite counts over the whole run)

    def has_nothing_to_do(self, max_steps: int) -> bool:
        """Whether the checkpoint is past max_steps, or at it with the run's final evaluation done."""
        return self.path is not None and (self.step > max_steps or (self.step == max_steps and self.finished))

    def load(self) -> dict:
        """The checkpoint's contents: rank 0's copy, or (other ranks) read from the file now."""
        return self.state if self.state is not None else checkpoint.load_checkpoint(self.path)


def choose_start(run: RunDir, resume: str, config: dict) -> Start:
    """Rank 0 takes the folder (RunDir.hold), decides where the run starts and tidies the folder; every rank returns
    the same Start (the checkpoint's contents only on rank 0) or raises the same error (RunDirError or
    CheckpointError for a refusal). config: this run's whole config, as a dict."""
    decided = None
    if distributed.is_master():
        try:
            run.hold()
            decided = _choose(run, resume, config)
        except Exception as e:  # any failure, so that the other ranks raise it too instead of waiting for rank 0
            decided = e
    if isinstance(decided, Start):
        decided_without_state = dataclasses.replace(decided, state=None)  # the checkpoint stays on rank 0
    else:
        decided_without_state = decided  # an error, or None on the other ranks
    shared = distributed.from_master(decided_without_state)
    if isinstance(shared, Exception):
        raise shared
    return decided if distributed.is_master() else shared


def _choose(run: RunDir, resume: str, config: dict) -> Start:
    notes = [f"removed {p.name}, left by a save that was killed" for p in run.remove_stray_temp_files()]
    started_elsewhere = resume not in ("auto", "none")
    if not run.checkpoints():
        if resume in ("auto", "none") or _is_an_earlier_attempt(run, config):
            notes += _clear_an_attempt_without_checkpoints(run, resume, config)
        if resume in ("auto", "none"):
            return Start(None, notes)
    elif resume == "none":
        raise RunDirError(f"train.resume=none, but train.out_dir {run} holds checkpoints "
                          f"({', '.join(p.name for p in run.checkpoints()[-3:])}) that a run from step 0 would mix "
                          "with its own: continue that run with --train.resume=auto, or choose another "
                          "--train.out_dir")
    source = run.path if resume == "auto" else Path(resume)
    source_folder = source if source.is_dir() else source.parent
    if started_elsewhere and run.checkpoints() and source_folder.resolve() != run.path.resolve():
        # this folder's own checkpoints, if this same command wrote them: the branch goes on from its newest
        path, state = _newest_readable(run, notes)
        if state["config"].get("train", {}).get("resume") != resume:
            raise RunDirError(f"resuming from {source} (another folder), but train.out_dir {run} already holds "
                              f"another run's checkpoints ({path.name}): choose another --train.out_dir, or "
                              "continue that run with --train.resume=auto")
        notes.append(f"continuing this run's own checkpoints (it started from {source})")
    elif source.is_dir():
        path, state = _newest_readable(RunDir(source), notes)
    else:
        path, state = source, checkpoint.load_checkpoint(source)  # a clear error now, not on every rank later
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: it lacks {', '.join(missing)} (written before "
                              "resuming existed?); load_model still reads its weights")
    differences = model_differences(state["config"], config["model"])
    if differences:
        raise CheckpointError(f"cannot resume from {path}: the model differs ({', '.join(differences)}); use the "
                              "checkpoint's model settings, or another --train.out_dir to start afresh")
    saved_optimizer = state["config"].get("optim", {}).get("name", "adamw")
    if saved_optimizer != config["optim"]["name"]:
        raise CheckpointError(f"cannot resume from {path}: it was trained with optim.name={saved_optimizer}, whose "
                              f"state {config['optim']['name']} cannot take over; resume with "
                              f"--optim.name={saved_optimizer}, or start afresh in another --train.out_dir")
    if path.parent.resolve() != run.path.resolve():
        _refuse_if_taken(run, f"resuming from {path} (another folder), but")
    _refuse_newer(run, path, state["step"])
    step, max_steps = state["step"], config["train"]["max_steps"]
    finished = run.finished_with(path)
    has_work_left = step < max_steps or (step == max_steps and not finished)
    if has_work_left:
        run.truncate_records(step)  # a run with nothing left to do keeps its records as they are
    return Start(path, notes, state, step, finished, run.evaluations_at(step), run.skipped_before(step))


def _is_an_earlier_attempt(run: RunDir, config: dict) -> bool:
    """Whether the records in a folder without checkpoints are an earlier attempt of this same run (its config,
    train.resume=PATH included): a rerun clears them."""
    earlier = run.read_config()
    return bool(run.records()) and bool(earlier) and not _differences(earlier, config)


def _differences(earlier: dict, config: dict) -> list[str]:
    """The settings of an earlier attempt (its train_config.json) that this run changes."""
    return changed_settings(earlier, config) if earlier else []


def _clear_an_attempt_without_checkpoints(run: RunDir, resume: str, config: dict) -> list[str]:
    """A folder without checkpoints that holds records: an attempt that stopped before its first checkpoint. The
    same run (config) starts again, and so does any run with train.resume=none; another config is refused, so that
    a different run's records are not lost by accident."""
    records = run.records()
    if not records:
        return []
    differences = [change for change in _differences(run.read_config(), config)
                   if not change.startswith("train.resume")]
    if resume != "none" and differences:
        raise RunDirError(f"train.out_dir {run} holds the records of another run that stopped before its first "
                          f"checkpoint ({', '.join(records)}; its settings differ: {', '.join(differences[:3])}): "
                          "choose another --train.out_dir, or start over in this one with --train.resume=none, which "
                          "deletes those records")
    last = run.last_recorded_step()
    run.clear_records()
    ended = f", its records ended at step {last}" if last is not None else ""
    again = "from step 0" if resume in ("auto", "none") else f"from {resume}"
    return [f"an earlier attempt in {run} stopped before its first checkpoint{ended}: removed its records "
            f"({', '.join(records)}), starting again {again}"]


def _refuse_if_taken(run: RunDir, why: str) -> None:
    checkpoints = [p.name for p in run.checkpoints()]
    records = run.records()
    if checkpoints:
        raise RunDirError(f"{why} train.out_dir {run} already holds another run ({', '.join(checkpoints[-3:])}): "
                          "choose another --train.out_dir, or continue that run with --train.resume=auto")
    if records:
        raise RunDirError(f"{why} train.out_dir {run} holds the records of another run ({', '.join(records)}): choose "
                          "another --train.out_dir, or delete them")


def _newest_readable(run: RunDir, notes: list[str]) -> tuple[Path, dict]:
    """The newest checkpoint that loads, and its contents; unreadable newer ones are renamed *.corrupt (kept, never
    used again)."""
    found = run.checkpoints()
    if not found:
        raise CheckpointError(f"{run} holds no checkpoint (ckpt_<step>.pt) to resume from")
    for path in reversed(found):
        try:
            return path, checkpoint.load_checkpoint(path)
        except CheckpointError as e:
            corrupt = path.with_name(path.name + ".corrupt")
            path.rename(corrupt)
            notes.append(f"{e}; renamed it {corrupt.name} and fell back to the previous checkpoint")
    raise CheckpointError(f"no checkpoint in {run} is readable (all renamed *.corrupt): start afresh in another "
                          "--train.out_dir")


def _refuse_newer(run: RunDir, path: Path, step: int) -> None:
    newer = [p.name for p in run.checkpoints() if checkpoint.checkpoint_step(p) > step]
    if newer:
        raise RunDirError(f"resuming from {path} (step {step}) into {run}, which holds later checkpoints "
                          f"({', '.join(newer)}) that pruning would mix with the new ones: resume into another "
                          "--train.out_dir, or move them away")


def model_differences(saved_config: dict, model_config: dict) -> list[str]:
    """The model settings that differ between a checkpoint's config and this run's model config, as
    'key saved -> now'."""
    saved_model = {**GPT2_DEFAULTS, **saved_config.get("model", {})}  # a key older checkpoints lack is GPT-2's
    return [f"model.{key} {saved_model.get(key)!r} -> {model_config[key]!r}" for key in MODEL_SHAPE_KEYS
            if saved_model.get(key) != model_config[key]]


def changed_settings(saved_config: dict, config: dict) -> list[str]:
    """Every other setting this run changes relative to the checkpoint (allowed; reported in the log)."""
    changes = []
    for section, values in config.items():
        for key, value in values.items():
            saved = saved_config.get(section, {}).get(key, value)
            if saved != value and (section, key) != ("train", "resume"):
                changes.append(f"{section}.{key} {saved!r} -> {value!r}")
    return changes


def resume(start: Start, config: dict, model, optimizer, train_loader, rank: int, world_size: int,
           device) -> tuple[int, int, list[str]]:
    """Load start's checkpoint into the model, optimizer, loader and RNGs. Returns (step, tokens seen, lines for
    the log)."""
    state = distributed.on_every_rank(start.load)  # a checkpoint one node cannot read stops every rank
    start.state = None  # rank 0's copy (weights and optimizer moments) is not kept for the whole run
    checkpoint.restore_training_state(state, start.path, model, optimizer, train_loader, rank, device)
    step, tokens_seen = state["step"], state["tokens_seen"]
    lines = [f"resuming from {start.path}: step {step}, {tokens_seen:,} tokens seen"]
    changes = changed_settings(state["config"], config)
    if changes:
        lines.append(f"settings changed since the checkpoint: {', '.join(changes)}")
    if state["world_size"] != world_size:
        lines.append(f"world size changed from {state['world_size']} to {world_size}: the data continues at the same "
                     f"token ({train_loader.position:,}), {config['data']['total_batch_tokens']:,} tokens per step; "
                     "dropout's random streams are not those of an unchanged run")
    return step, tokens_seen, lines
