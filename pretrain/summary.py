"""The end-of-run summary: what a run reached and what it cost, printed and saved as <out_dir>/summary.json.

It is built from the same records as metrics.jsonl (the MetricsLogger hands it each one), so the two always agree.
Means are over the steps this process trained: mean tokens/s is tokens trained / time spent in training steps
(evaluation and checkpoints excluded), and the mean MFU is the MFU at that throughput.
"""

import json
import math
import time
from pathlib import Path

from pretrain.fileio import atomic_write_text


class RunSummary:
    """The run's numbers, from its records: those of earlier attempts (seed, when a run resumes) and this one's."""

    def __init__(self):
        self.start_time = time.perf_counter()
        self.resumed_at: int | None = None  # the step this attempt resumed from
        self.last_step = None  # the last step trained or skipped
        self.skipped = 0
        self.final_loss = None
        self.train_seconds = 0.0
        self.trained_tokens = 0.0
        self.mfu_seconds = 0.0  # sum of mfu * step time: divided by train_seconds, the time-weighted mean MFU
        self.has_mfu = True
        self.val = []  # (step, val_loss)
        self.hellaswag = []  # (step, acc_norm)
        self.core = []  # (step, CORE)

    def seed(self, records: list[dict], resumed_at: int) -> None:
        """The records of the attempts before a resume (metrics.jsonl, truncated to the resumed step)."""
        for record in records:
            self.log(record)
        self.resumed_at = resumed_at

    def log(self, record: dict) -> None:
        step = record["step"]
        if "loss" in record:
            self.last_step = step
            self.final_loss = record["loss"]
            seconds = record["ms"] / 1000
            self.train_seconds += seconds
            self.trained_tokens += record["tokens_per_s"] * seconds  # the step's batch, whatever its size was
            if record.get("mfu") is None:
                self.has_mfu = False
            else:
                self.mfu_seconds += record["mfu"] * seconds
        if record.get("skipped"):
            self.last_step = step
            self.skipped += 1
        if "val_loss" in record:
            self.val.append((step, record["val_loss"]))
        if "hellaswag_acc_norm" in record:
            self.hellaswag.append((step, record["hellaswag_acc_norm"]))
        if "core" in record:
            self.core.append((step, record["core"]))

    def close(self) -> None:
        pass

    def result(self, final_checkpoint: str | Path | None, tokens_seen: int) -> dict:
        """The summary as a dict of plain values (None where the run has no such number). tokens_seen counts the
        run's every step, before a resume too (at whatever batch size those steps had)."""
        best_val = min(self.val, key=lambda entry: entry[1], default=(None, None))
        best_hellaswag = max(self.hellaswag, key=lambda entry: entry[1], default=(None, None))
        best_core = max(self.core, key=lambda entry: entry[1], default=(None, None))
        has_time = self.train_seconds > 0
        return {
            "steps": self.last_step + 1 if self.last_step is not None else 0,
            "skipped_steps": self.skipped,
            "tokens_seen": tokens_seen,
            "wall_time_s": time.perf_counter() - self.start_time,
            "resumed_at_step": self.resumed_at,
            "final_train_loss": self.final_loss,
            "final_val_loss": self.val[-1][1] if self.val else None,
            "best_val_loss": best_val[1],
            "best_val_loss_step": best_val[0],
            "best_hellaswag_acc_norm": best_hellaswag[1],
            "best_hellaswag_step": best_hellaswag[0],
            "best_core": best_core[1],
            "best_core_step": best_core[0],
            "mean_tokens_per_s": self.trained_tokens / self.train_seconds if has_time else None,
            "mean_mfu": self.mfu_seconds / self.train_seconds if has_time and self.has_mfu else None,
            "final_checkpoint": str(final_checkpoint) if final_checkpoint is not None else None,
        }


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s"


def _number(value: float | None, fmt: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, fmt)


def summary_lines(summary: dict) -> list[str]:
    """The summary as a few lines for the terminal or the log."""
    skipped = f" ({summary['skipped_steps']} skipped, not applied)" if summary["skipped_steps"] else ""
    wall = format_duration(summary["wall_time_s"])
    if summary["resumed_at_step"] is not None:
        wall += f" since the resume at step {summary['resumed_at_step']}"
    lines = [f"summary: {summary['steps']:,} steps{skipped}, {summary['tokens_seen']:,} tokens in {wall}"]
    train_loss = f"train loss {_number(summary['final_train_loss'], '.4f')}"
    if summary["final_val_loss"] is None:
        lines.append(f"  val loss not evaluated | {train_loss}")
    else:
        lines.append(f"  val loss {summary['final_val_loss']:.4f} final, {summary['best_val_loss']:.4f} best "
                     f"(step {summary['best_val_loss_step']}) | {train_loss}")
    mfu = summary["mean_mfu"]
    lines.append(f"  {_number(summary['mean_tokens_per_s'], ',.0f')} tok/s mean | MFU "
                 + ("n/a" if mfu is None else f"{mfu * 100:.1f}%") + " mean")
    if summary["best_hellaswag_acc_norm"] is not None:
        lines.append(f"  HellaSwag acc_norm {summary['best_hellaswag_acc_norm']:.4f} best "
                     f"(step {summary['best_hellaswag_step']})")
    if summary["best_core"] is not None:
        lines.append(f"  CORE {summary['best_core']:.4f} best (step {summary['best_core_step']})")
    lines.append(f"  final checkpoint {summary['final_checkpoint']}")
    return lines


def report(run_summary: RunSummary, path: str | Path, final_checkpoint: str | Path | None, tokens_seen: int) -> dict:
    """Print the summary and write it to path (the run folder's summary.json, atomically); returns it."""
    summary = run_summary.result(final_checkpoint, tokens_seen)
    for line in summary_lines(summary):
        print(line, flush=True)
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    return summary
