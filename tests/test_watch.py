"""Watching a run: progress lines or bar, the end-of-run summary, and the experiment trackers (offline).

One short training run with both trackers on is shared by the tests that read what it wrote; the display and
summary logic are also checked directly on records.
"""

import io
import json
import re
import struct
import sys

import pytest
from helpers import read_metrics, run_script, train_args

from pretrain.config import Config
from pretrain.errors import MissingPackage
from pretrain.metrics import Mfu
from pretrain.progress import Progress, step_line
from pretrain.summary import RunSummary, summary_lines
from pretrain.trackers import TensorBoardTracker, WandbTracker

STEPS, TOKENS_PER_STEP = 12, 256


@pytest.fixture(scope="module")
def watched_run(tiny_shards, tmp_path_factory):
    """12 steps, a line every 5, validation every 5, TensorBoard and W&B (offline) on; stdout is a pipe."""
    out = tmp_path_factory.mktemp("watched")
    result = run_script(*train_args(tiny_shards, out, f"--data.total_batch_tokens={TOKENS_PER_STEP}",
                                    f"--train.max_steps={STEPS}", "--train.log_interval=5", "--train.eval_interval=5",
                                    "--train.val_steps=2", "--train.tensorboard=true",
                                    "--train.wandb_project=watch-test"))
    return out, result.stdout


def step_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "loss" in r]


@pytest.mark.slow
def test_output_that_is_not_a_terminal_gets_a_line_every_log_interval(watched_run):
    out, stdout = watched_run
    logged = [int(m) for m in re.findall(r"^step +(\d+) \| loss", stdout, flags=re.MULTILINE)]
    assert logged == [0, 5, 10, 11]  # every 5th step and the last
    assert "\r" not in stdout  # no bar redraws in a log file
    assert [r["step"] for r in step_records(read_metrics(out))] == list(range(STEPS))  # the file has every step


@pytest.mark.slow
def test_summary_numbers_match_the_metrics(watched_run):
    out, stdout = watched_run
    summary = json.loads((out / "summary.json").read_text())
    records = read_metrics(out)
    steps = step_records(records)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    seconds = sum(r["ms"] for r in steps) / 1000
    assert summary["steps"] == STEPS
    assert summary["tokens_seen"] == STEPS * TOKENS_PER_STEP
    assert summary["final_train_loss"] == steps[-1]["loss"]
    assert summary["final_val_loss"] == val[-1]
    assert summary["best_val_loss"] == min(val)
    assert summary["best_val_loss_step"] == [r["step"] for r in records if r.get("val_loss") == min(val)][0]
    assert summary["mean_tokens_per_s"] == pytest.approx(STEPS * TOKENS_PER_STEP / seconds, rel=1e-9)
    assert summary["mean_mfu"] == pytest.approx(sum(r["mfu"] * r["ms"] for r in steps) / 1000 / seconds, rel=1e-9)
    assert summary["wall_time_s"] >= seconds
    assert summary["best_hellaswag_acc_norm"] is None
    assert summary["final_checkpoint"] == str(out / f"ckpt_{STEPS:06d}.pt")
    assert f"summary: {STEPS} steps, {STEPS * TOKENS_PER_STEP:,} tokens" in stdout
    assert f"val loss {val[-1]:.4f} final, {min(val):.4f} best" in stdout


def test_summary_takes_the_lowest_loss_and_the_highest_hellaswag():
    summary = RunSummary()
    for record in ({"step": 0, "val_loss": 5.0, "hellaswag_acc_norm": 0.25},
                   {"step": 0, "loss": 6.0, "ms": 1000.0, "tokens_per_s": 100.0, "mfu": 0.1},
                   {"step": 1, "loss": 5.0, "ms": 3000.0, "tokens_per_s": 100 / 3, "mfu": 0.3},
                   {"step": 2, "val_loss": 4.0, "hellaswag_acc_norm": 0.31},
                   {"step": 2, "val_loss": 4.5, "hellaswag_acc_norm": 0.28}):
        summary.log(record)
    result = summary.result("ckpt.pt", tokens_seen=1200)  # steps before a resume count too
    assert (result["best_val_loss"], result["best_val_loss_step"]) == (4.0, 2)
    assert result["final_val_loss"] == 4.5
    assert (result["best_hellaswag_acc_norm"], result["best_hellaswag_step"]) == (0.31, 2)
    assert result["tokens_seen"] == 1200
    assert result["mean_tokens_per_s"] == pytest.approx(200 / 4.0)
    assert result["mean_mfu"] == pytest.approx((0.1 * 1 + 0.3 * 3) / 4)  # the MFU at the mean throughput


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(step: int) -> dict:
    return {"step": step, "loss": 4.0 - step / 10, "lr": 1e-3, "grad_norm": 0.5, "ms": 100.0, "tokens_per_s": 2048.0,
            "mfu": 0.25}


def test_a_terminal_gets_a_bar_with_lines_above_it():
    terminal = FakeTerminal()
    progress = Progress(total_steps=4, log_interval=1, stream=terminal)
    for step in range(4):
        progress.update(record(step))
        if step == 1:
            progress.write("step      2 | val loss 3.9000")
    progress.close()
    shown = terminal.getvalue()
    assert "\r" in shown  # redrawn in place
    assert "4/4" in shown
    assert "loss 3.7000 | 2,048 tok/s | MFU 25.0%" in shown
    assert "step      2 | val loss 3.9000\n" in shown
    assert step_line(record(0)) not in shown  # no per-step lines under a bar


def test_plain_lines_and_quiet_ranks():
    log = io.StringIO()
    progress = Progress(total_steps=7, log_interval=3, stream=log)
    for step in range(7):
        progress.update(record(step))
    assert log.getvalue() == "".join(step_line(record(s)) + "\n" for s in (0, 3, 6))
    other_rank = io.StringIO()
    quiet = Progress(total_steps=7, log_interval=1, enabled=False, stream=other_rank)
    quiet.update(record(0))
    quiet.write("sample: x")
    assert other_rank.getvalue() == ""


@pytest.mark.slow
def test_tensorboard_events_hold_the_metrics_records(watched_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = watched_run
    records = read_metrics(out)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "val_loss"):
        expected = [(r["step"], r[key]) for r in records if key in r]
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert [step for step, _ in logged] == [step for step, _ in expected]
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


def wandb_history(run_file) -> list[dict]:
    """The history rows of an offline W&B run file: a LevelDB-style log (32 KiB blocks of records with a 7-byte
    header: crc, length, type) holding wandb's protobuf Records, after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2
    data = run_file.read_bytes()
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            message = wandb_internal_pb2.Record()
            message.ParseFromString(pending)
            pending = b""
            if message.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): float(item.value_json)
                             for item in message.history.item})
    return rows


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_records(watched_run):
    out, _ = watched_run
    run_files = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    rows = wandb_history(run_files[0])
    records = read_metrics(out)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss"):
        expected = [(r["step"], r[key]) for r in records if key in r]
        logged = [(int(row["_step"]), row[key]) for row in rows if key in row]
        assert [step for step, _ in logged] == [step for step, _ in expected]
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-12)


def test_missing_tracker_packages_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MissingPackage, match=r"^train.wandb_project needs the wandb package: pip install wandb$"):
        WandbTracker("p", tmp_path, {})
    with pytest.raises(MissingPackage, match=r"^train.tensorboard needs the tensorboard package: pip install"):
        TensorBoardTracker(tmp_path, resumed_step=None)
    assert Config().train.wandb_project == ""  # both off unless asked for
    assert Config().train.tensorboard is False


def test_summary_counts_skipped_steps_and_says_when_there_was_no_evaluation():
    summary = RunSummary()
    summary.log({"step": 0, "loss": 6.0, "ms": 1000.0, "tokens_per_s": 100.0, "mfu": None})
    summary.log({"step": 1, "skipped": True, "lr": 1e-3})
    summary.log({"step": 2, "loss": 5.0, "ms": 1000.0, "tokens_per_s": 100.0, "mfu": None})
    result = summary.result("ckpt.pt", tokens_seen=300)
    assert (result["steps"], result["skipped_steps"]) == (3, 1)
    lines = summary_lines(result)
    assert lines[0].startswith("summary: 3 steps (1 skipped, not applied), 300 tokens in ")
    assert lines[1] == "  val loss not evaluated | train loss 5.0000"
    assert "None" not in "\n".join(lines)


def test_mfu_is_the_flops_done_against_the_peak_and_never_above_100_percent():
    said = []
    mfu = Mfu(flops_per_token=6e6, peak_tflops=1.0, world_size=2, log=said.append)
    # 100,000 tokens/s over 2 devices at 6 MFLOP each: 0.3 TFLOP/s per device against a 1 TFLOP/s peak
    assert mfu(tokens_per_s=1e5, step=0) == pytest.approx(0.3)
    assert said == []
    assert mfu(tokens_per_s=5e5, step=1) is None  # 1.5 TFLOP/s per device: that peak was wrong
    assert said == ["MFU no longer reported from step 1: that step did 1.5 TFLOP/s per device, above the peak of "
                    "1 TFLOP/s, so that peak is wrong (measured under load?); set train.peak_tflops to this device's "
                    "peak"]
    assert mfu(tokens_per_s=1e5, step=2) is None  # and not again, nor said twice
    assert len(said) == 1
