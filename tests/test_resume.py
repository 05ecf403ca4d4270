"""Resuming: the same command continues a run exactly (1 process and 2 gloo ranks, dropout on), a signal saves and
exits, a rerun never loses or mixes work, and a non-finite step is never applied.

Exactness is judged against an uninterrupted run: the losses of every step must be bit-identical. The warmup is
longer than every run here, so the learning rate of a step does not depend on train.max_steps and a run stopped at
max_steps=N/2 can be continued with max_steps=N.
"""

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from helpers import read_metrics, run_script, started, torchrun, train_args, worker_pid

from pretrain.checkpoint import load_checkpoint, load_model
from pretrain.fileio import read_jsonl
from pretrain.loader import ShardLoader

pytestmark = pytest.mark.slow  # every test here starts processes

STEADY = ["--model.dropout=0.1", "--optim.warmup_steps=100", "--train.eval_interval=3", "--train.val_steps=1"]
STEP_TOKENS = 256  # data.total_batch_tokens in train_args


def run_args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return train_args(data, out, *STEADY, f"--train.max_steps={steps}", *extra)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def steps_logged(out: Path, key: str) -> list[int]:
    return [r["step"] for r in read_metrics(out) if key in r]


def wait_for(condition, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the test could signal it"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def last_trained_step(out: Path) -> int:
    """The highest step with a training loss in a live run's metrics.jsonl (-1 if none yet)."""
    path = out / "metrics.jsonl"
    found = -1
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):  # the line being written may be incomplete
            record = json.loads(line)
            if "loss" in record:
                found = max(found, record["step"])
    return found


# -- one process ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_process(tiny_shards, tmp_path_factory) -> dict:
    """6 steps in one go, and 3 steps + resume + 3 steps in one out_dir."""
    ref, split = tmp_path_factory.mktemp("ref1"), tmp_path_factory.mktemp("split1")
    run_script(*run_args(tiny_shards, ref, 6))
    run_script(*run_args(tiny_shards, split, 3))
    second = run_script(*run_args(tiny_shards, split, 6))
    return {"ref": ref, "split": split, "second": second.stdout}


def test_one_process_resume_gives_bit_identical_losses_with_dropout(one_process):
    ref, split = one_process["ref"], one_process["split"]
    assert f"resuming from {split / 'ckpt_000003.pt'}: step 3, 768 tokens seen" in one_process["second"]
    assert "train.max_steps 3 -> 6" in one_process["second"]
    assert losses(split) == losses(ref)
    assert list(losses(split)) == list(range(6))
    final, expected = load_checkpoint(split / "ckpt_000006.pt"), load_checkpoint(ref / "ckpt_000006.pt")
    assert all(torch.equal(final["model"][k], v) for k, v in expected["model"].items())
    assert final["tokens_seen"] == 6 * STEP_TOKENS


def test_metrics_hold_each_step_once_after_a_resume(one_process):
    split = one_process["split"]
    assert steps_logged(split, "val_loss") == [0, 3, 6]  # the first run's final evaluation at 3 is not repeated
    assert steps_logged(split, "val_loss") == steps_logged(one_process["ref"], "val_loss")
    val = {r["step"]: r["val_loss"] for r in read_metrics(split) if "val_loss" in r}
    assert val == {r["step"]: r["val_loss"] for r in read_metrics(one_process["ref"]) if "val_loss" in r}


def test_final_validation_loss_is_of_the_final_weights(one_process, tiny_shards):
    """The last val loss is measured after the last optimizer step: it is the saved final model's loss."""
    model, _ = load_model(one_process["ref"])
    x, y = ShardLoader(tiny_shards, "val", batch_size=4, seq_len=32, shuffle=False).next_batch()
    with torch.no_grad():
        _, loss = model(x, y)
    final_val = [r["val_loss"] for r in read_metrics(one_process["ref"]) if "val_loss" in r][-1]
    assert loss.item() == pytest.approx(final_val, rel=1e-6)


def test_summary_counts_the_tokens_of_steps_before_a_resume_at_their_own_batch_size(tiny_shards, tmp_path):
    run_script(*run_args(tiny_shards, tmp_path, 2, "--train.eval_interval=0"))
    run_script(*run_args(tiny_shards, tmp_path, 3, "--train.eval_interval=0", "--data.total_batch_tokens=512"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tokens_seen"] == 2 * STEP_TOKENS + 512
    assert summary["tokens_seen"] == load_checkpoint(tmp_path / "ckpt_000003.pt")["tokens_seen"]


def copy_of(run: Path, tmp_path: Path) -> Path:
    """A copy of a shared fixture's run folder, for a test that runs a program on it (the fixture stays as it was
    for the other tests, whatever their order)."""
    return Path(shutil.copytree(run, tmp_path / run.name))


def test_rerun_of_a_finished_run_changes_nothing(one_process, tiny_shards, tmp_path):
    split = copy_of(one_process["split"], tmp_path)
    def files() -> dict:  # all but .lock, which names the run that held the folder last
        return {p.name: p.read_bytes() for p in split.iterdir() if p.is_file() and p.name != ".lock"}
    before = files()
    result = run_script(*run_args(tiny_shards, split, 6))
    assert "already at step 6 of train.max_steps=6: nothing to do" in result.stdout
    after = files()
    assert after == before  # the final validation record, the summary and the checkpoints are all still there


def test_model_change_on_resume_is_one_line(one_process, tiny_shards, tmp_path):
    split = copy_of(one_process["split"], tmp_path)
    result = run_script(*run_args(tiny_shards, split, 8, "--model.n_embd=32"), check=False)
    assert result.returncode == 2
    assert "the model differs (model.n_embd 64 -> 32)" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigint_saves_and_exits_zero(tiny_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    with started(*run_args(tiny_shards, out, 1000), log=log) as proc:
        wait_for(lambda: last_trained_step(out) >= 0, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()
    text = log.read_text()
    saved = sorted(out.glob("ckpt_*.pt"))
    assert len(saved) == 1
    step = load_checkpoint(saved[0])["step"]
    assert f"stopped by SIGINT after {step} steps: saved {saved[0]}; run the same command again" in text
    assert last_trained_step(out) == step - 1
    assert "Traceback" not in text


TWO_CTRL_C = """
import os, signal, sys, time
from pretrain.preemption import StopSignals
with StopSignals() as signals:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)  # the handler runs between the two (two pending SIGINTs would be delivered as one)
    print("after the first:", signals.received, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    print("after the second:", signals.received, flush=True)
"""


def test_second_ctrl_c_exits_at_once_but_torchruns_echo_does_not():
    result = run_script("-c", TWO_CTRL_C, check=False)
    assert result.returncode == 130
    assert "after the first: SIGINT" in result.stdout
    assert "after the second" not in result.stdout
    assert "second Ctrl-C: exiting now, without saving" in result.stderr
    assert "Traceback" not in result.stderr
    # Under torchrun the launcher forwards the terminal's Ctrl-C to workers that already got it: within a second,
    # a repeat is that echo, and the worker still stops cleanly at the step boundary.
    echoed = run_script("-c", TWO_CTRL_C, env={"TORCHELASTIC_RUN_ID": "test"})
    assert "after the second: SIGINT" in echoed.stdout


SCHEDULER_SIGNALS = """
import os, signal, time
from pretrain.preemption import StopSignals
with StopSignals() as signals:
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("still running; first:", signals.received, "stop:", signals.requested, flush=True)
os.kill(os.getpid(), signal.SIGTERM)  # outside, the default action again: the process ends
time.sleep(5)
print("not reached")
"""


def test_scheduler_signals_are_noted_not_fatal_while_training():
    result = run_script("-c", SCHEDULER_SIGNALS, check=False)
    assert "still running; first: SIGUSR1 stop: True" in result.stdout
    assert "SIGUSR1 received: stopping after this step" in result.stderr
    assert result.returncode == -signal.SIGTERM
    assert "not reached" not in result.stdout


def test_nonfinite_steps_are_never_applied(tiny_shards, tmp_path):
    """lr=1e6 without clipping: step 0 is finite, from step 1 on the loss is NaN. Two steps may be skipped; the third
    stops the run. Skipped steps leave the weights exactly as they were."""
    result = run_script(*train_args(tiny_shards, tmp_path, "--train.max_steps=8", "--train.eval_interval=0",
                                    "--optim.lr=1e6", "--optim.grad_clip=0", "--optim.warmup_steps=1",
                                    "--train.checkpoint_interval=1", "--train.skip_nonfinite=2"), check=False)
    assert result.returncode == 2
    assert "at step 3: training diverged and this step was not applied" in result.stderr
    assert f"the newest checkpoint, {tmp_path / 'ckpt_000003.pt'}, is from before it" in result.stderr
    assert "Traceback" not in result.stderr
    assert [r["step"] for r in read_metrics(tmp_path) if r.get("skipped")] == [1, 2]
    after_good_step = load_checkpoint(tmp_path / "ckpt_000001.pt")["model"]
    for skipped in (2, 3):
        weights = load_checkpoint(tmp_path / f"ckpt_{skipped:06d}.pt")["model"]
        assert all(torch.equal(weights[k], v) for k, v in after_good_step.items())
    assert all(torch.isfinite(v).all() for v in after_good_step.values())


# -- two gloo ranks ---------------------------------------------------------------------------------------------

M = 12  # steps of the 2-rank runs


@pytest.fixture(scope="module")
def two_ranks(tiny_shards, tmp_path_factory) -> dict:
    """An uninterrupted 2-rank run of M steps; and in another out_dir: M/2 steps, then the same command with
    max_steps=M signalled (SIGTERM to rank 1 only) after its first step, then that command again."""
    ref, out = tmp_path_factory.mktemp("ref2"), tmp_path_factory.mktemp("split2")
    half_copy = tmp_path_factory.mktemp("half") / "ckpt_000006.pt"
    logs = tmp_path_factory.mktemp("logs")
    run_script(*torchrun("--standalone", "--nproc_per_node=2", *run_args(tiny_shards, ref, M)))
    run_script(*torchrun("--standalone", "--nproc_per_node=2", *run_args(tiny_shards, out, M // 2)))
    shutil.copy(out / "ckpt_000006.pt", half_copy)
    (out / ".ckpt_000007.pt.tmp.4242").write_bytes(b"what a killed save leaves")
    command = torchrun("--standalone", "--nproc_per_node=2", *run_args(tiny_shards, out, M))
    with started(*command, log=logs / "signalled.log") as proc:
        wait_for(lambda: last_trained_step(out) >= M // 2, proc)
        os.kill(worker_pid(proc.pid, rank=1), signal.SIGTERM)
        signalled_rc = proc.wait(timeout=120)
    stopped_at = [load_checkpoint(p)["step"] for p in out.glob("ckpt_*.pt")]
    rerun = run_script(*command)
    return {"ref": ref, "out": out, "half": half_copy, "signalled_rc": signalled_rc, "stopped_at": stopped_at,
            "signalled_log": (logs / "signalled.log").read_text(), "rerun": rerun.stdout}


def test_two_ranks_resume_gives_bit_identical_losses_with_dropout(two_ranks):
    assert losses(two_ranks["out"]) == losses(two_ranks["ref"])
    assert list(losses(two_ranks["out"])) == list(range(M))
    assert steps_logged(two_ranks["out"], "val_loss") == [0, 3, 6, 9, 12]
    final = load_checkpoint(two_ranks["out"] / f"ckpt_{M:06d}.pt")
    expected = load_checkpoint(two_ranks["ref"] / f"ckpt_{M:06d}.pt")
    assert all(torch.equal(final["model"][k], v) for k, v in expected["model"].items())
    assert len(final["rng"]) == 2


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(two_ranks):
    text = two_ranks["signalled_log"]
    assert two_ranks["signalled_rc"] == 0, text  # torchrun itself was not signalled: 0 means every worker exited 0
    assert "SIGTERM received: stopping after this step" in text
    step = max(two_ranks["stopped_at"])
    assert M // 2 < step < M, text
    assert f"stopped by a signal to another rank after {step} steps: saved" in text
    assert "Traceback" not in text
    assert f"resuming from {two_ranks['out'] / f'ckpt_{step:06d}.pt'}: step {step}" in two_ranks["rerun"]


def test_stray_temp_file_of_a_killed_save_is_removed_at_the_next_start(two_ranks):
    assert "removed .ckpt_000007.pt.tmp.4242, left by a save that was killed" in two_ranks["signalled_log"]
    assert not list(two_ranks["out"].glob(".ckpt_*"))


def test_different_world_size_resumes_at_the_same_token(two_ranks, tiny_shards, tmp_path):
    result = run_script(*run_args(tiny_shards, tmp_path, 8, f"--train.resume={two_ranks['half']}"))
    assert "world size changed from 2 to 1: the data continues at the same token (1,536), 256 tokens per step" \
        in result.stdout
    assert list(losses(tmp_path)) == [6, 7]
    final = load_checkpoint(tmp_path / "ckpt_000008.pt")
    assert final["train_loader"]["position"] == 8 * STEP_TOKENS
    assert final["tokens_seen"] == 8 * STEP_TOKENS


# -- nothing lost, nothing mixed ---------------------------------------------------------------------------------

LONG = 400  # steps of a run that is stopped or killed long before its end


def test_a_second_run_into_a_folder_in_use_stops_with_one_line_and_the_first_is_untouched(tiny_shards, tmp_path):
    out = tmp_path / "run"
    command = run_args(tiny_shards, out, LONG, "--train.eval_interval=0")
    with started(*command, log=tmp_path / "first.log") as first:
        wait_for(lambda: last_trained_step(out) >= 1, first)
        second = run_script(*command, check=False, timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines() == [
            f"error: train.out_dir {out} is in use by another run (pid {first.pid} on {socket.gethostname()}, started "
            + second.stderr.split(", started ", 1)[1].strip()]
        assert "wait for it to end, or choose another --train.out_dir" in second.stderr
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 0
    trained = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert trained == list(range(len(trained)))  # every step once: the second run wrote nothing


def test_a_crash_before_the_first_checkpoint_is_rerun_by_the_same_command(tiny_shards, tmp_path):
    out = tmp_path / "run"
    command = run_args(tiny_shards, out, 40, "--train.eval_interval=0", "--train.health_interval=1")
    with started(*command, log=tmp_path / "crashed.log") as crashed:
        wait_for(lambda: last_trained_step(out) >= 2, crashed)
        crashed.send_signal(signal.SIGKILL)  # no checkpoint yet: the first one is after the last step
        crashed.wait()
    first_losses = losses(out)
    rerun = run_script(*command)
    assert f"an earlier attempt in {out} stopped before its first checkpoint, its records ended at step" \
        in rerun.stdout
    assert list(losses(out)) == list(range(40))  # each step once, from step 0 again
    assert all(losses(out)[step] == loss for step, loss in first_losses.items())  # the same run, again
    assert [r["step"] for r in read_jsonl(out / "health.jsonl")] == list(range(40))


def test_resume_keeps_each_step_once_in_health_and_tensorboard(tiny_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    command = run_args(tiny_shards, out, 30, "--train.eval_interval=0", "--train.health_interval=1",
                       "--train.checkpoint_interval=10", "--train.tensorboard=true")
    with started(*command, log=tmp_path / "killed.log") as killed:
        wait_for(lambda: last_trained_step(out) >= 12, killed)
        killed.send_signal(signal.SIGKILL)  # steps 10 to 12 and on were logged after the checkpoint, and will be again
        killed.wait()
    run_script(*command)
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(30))
    assert [r["step"] for r in read_jsonl(out / "health.jsonl")] == list(range(30))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(30))


def short_hellaswag_rows(n: int) -> list[dict]:
    """n HellaSwag rows short enough for a 32-token model: a 6-word context, 3-word endings."""
    words = "the man woman then ball car floor wall cake table chair door game water hand".split()
    rng = random.Random(0)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))
    rows = []
    for _ in range(n):
        context = text(6)
        rows.append({"activity_label": "Synthetic", "ctx_a": context, "ctx_b": "", "ctx": context,
                     "endings": [text(3) for _ in range(4)], "label": rng.randrange(4)})
    return rows


def test_a_signal_during_the_final_evaluation_says_what_was_saved_and_the_rerun_finishes(tiny_shards, tmp_path):
    """The final evaluation runs validation, then HellaSwag (long here: 600 examples), then samples. A SIGTERM during
    HellaSwag stops the run before the samples, with a line saying what was saved; the rerun does what is left
    (the samples), not what was done, and writes the summary."""
    out, rows = tmp_path / "run", tmp_path / "hellaswag.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in short_hellaswag_rows(600)))
    command = run_args(tiny_shards, out, 4, "--train.hellaswag_interval=4", f"--train.hellaswag_data={rows}",
                       "--train.sample_interval=4", "--train.sample_tokens=8")
    with started(*command, log=tmp_path / "stopped.log") as stopped:
        wait_for(lambda: (out / "ckpt_000004.pt").is_file() and "val_loss" in read_metrics(out)[-1], stopped)
        stopped.send_signal(signal.SIGTERM)  # while HellaSwag scores its 600 examples
        assert stopped.wait(timeout=300) == 0
    text = (tmp_path / "stopped.log").read_text()
    assert f"stopped by SIGTERM during the final evaluation: training ended and {out / 'ckpt_000004.pt'} is saved; " \
           "run the same command again to evaluate it and write the summary" in text
    assert "--- sample" not in text.split("stopped by SIGTERM")[0].split("| hellaswag")[-1]  # no samples after it
    assert not (out / "summary.json").exists()
    rerun = run_script(*command, timeout=300)
    assert "training ended at step 4, but its final evaluation did not: evaluating now" in rerun.stdout
    assert "| val loss" not in rerun.stdout and "| hellaswag" not in rerun.stdout  # done before, not redone
    assert "--- sample 1 of 2, after 4 steps ---" in rerun.stdout  # what was left
    assert steps_logged(out, "val_loss") == [0, 3, 4]  # the final one once
    assert steps_logged(out, "hellaswag_acc_norm") == [0, 4]
    assert json.loads((out / "summary.json").read_text())["final_checkpoint"] == str(out / "ckpt_000004.pt")
    assert "nothing to do" in run_script(*command).stdout  # now it has finished


def test_a_signal_before_training_starts_is_one_line(tmp_path):
    """SIGTERM while the run builds the demo corpus (before the loop that saves on a signal): one line, no
    traceback, exit 130; the rerun builds and trains as if nothing had happened."""
    data, out = tmp_path / "demo", tmp_path / "run"
    command = train_args(data, out, "--data.demo=true", "--train.max_steps=1", "--train.eval_interval=0")
    with started(*command, log=tmp_path / "log") as proc:
        wait_for(lambda: "building the demo corpus" in (tmp_path / "log").read_text(), proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
    text = (tmp_path / "log").read_text()
    assert "stopped by a signal (Ctrl-C or SIGTERM); nothing was saved" in text
    assert "Traceback" not in text
    run_script(*command, timeout=300)
    assert list(losses(out)) == [0]
