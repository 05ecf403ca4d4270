"""plot.py: one PNG of a run's curves, several runs on one figure, a clear line for bad input."""

import json
import sys

import pytest
from helpers import run_script

from pretrain import plots
from pretrain.fileio import RecordsError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, n_layer: int, n_head: int, n_embd: int, tokens_per_step: int, hellaswag: bool) -> list[dict]:
    """A metrics.jsonl and train_config.json like a training run writes: a record per step, validation with bits per
    byte (and HellaSwag and CORE) every 4 steps."""
    records = []
    for step in range(10):
        if step % 4 == 0:
            evaluation = {"step": step, "val_loss": 8.0 - step / 4, "val_bpb": 3.0 - step / 8}
            records.append(evaluation)
            if hellaswag:
                records.append({"step": step, "hellaswag_acc_norm": 0.25 + step / 200})
                records.append({"step": step, "core": 0.01 + step / 100, "core_arc": 0.05})
        records.append({"step": step, "loss": 9.0 - step / 3, "lr": 1e-4 * (step + 1), "grad_norm": 2.0 / (step + 1),
                        "ms": 50.0, "tokens_per_s": 1000.0 + step, "mfu": 0.3})
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"model": {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd},
              "data": {"total_batch_tokens": tokens_per_step}}
    (run_dir / "train_config.json").write_text(json.dumps(config))
    return records


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


@pytest.mark.slow
def test_plot_py_writes_one_png_for_several_runs(tmp_path):
    write_run(tmp_path / "gpt2", 12, 12, 768, 524288, hellaswag=True)
    write_run(tmp_path / "demo", 4, 4, 128, 2048, hellaswag=False)
    out = tmp_path / "compare.png"
    result = run_script("plot.py", tmp_path / "gpt2", tmp_path / "demo", "--out", out, timeout=120)
    assert result.stdout == f"wrote {out}\n"
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".compare.png.tmp*"))


def test_figure_panels_hold_each_runs_curves(tmp_path):
    gpt2_records = write_run(tmp_path / "gpt2", 12, 12, 768, 524288, hellaswag=True)
    write_run(tmp_path / "demo", 4, 4, 128, 2048, hellaswag=False)
    fig = plots.build_figure([plots.read_run(tmp_path / "gpt2"), plots.read_run(tmp_path / "demo")])
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == list(plots.PANELS)

    loss = lines_by_label(axes["loss"])
    train = [r for r in gpt2_records if "loss" in r]
    val = [r for r in gpt2_records if "val_loss" in r]
    assert list(loss["_gpt2 train per step"].get_xdata()) == [r["step"] for r in train]
    assert list(loss["_gpt2 train per step"].get_ydata()) == [r["loss"] for r in train]
    assert list(loss["gpt2 val"].get_ydata()) == [r["val_loss"] for r in val]
    shown = {label for label in loss if not label.startswith("_")}  # what the legend lists
    assert shown == {"gpt2 train", "gpt2 val", "demo train", "demo val"}

    # Against tokens: a step record comes after its batch, a validation record before its step's batch.
    by_tokens = lines_by_label(axes["loss against tokens seen"])
    assert list(by_tokens["_gpt2 train per step"].get_xdata()) == [(r["step"] + 1) * 524288 for r in train]
    assert list(by_tokens["demo val"].get_xdata()) == [r["step"] * 2048 for r in val]

    hellaswag = lines_by_label(axes["HellaSwag acc_norm"])
    assert list(hellaswag["gpt2"].get_ydata()) == [r["hellaswag_acc_norm"] for r in gpt2_records
                                                   if "hellaswag_acc_norm" in r]
    assert list(hellaswag["OpenAI GPT-2 124M (0.2955)"].get_ydata()) == [0.2955, 0.2955]
    core = lines_by_label(axes["CORE"])
    assert list(core["gpt2"].get_ydata()) == [r["core"] for r in gpt2_records if "core" in r]
    assert list(core["OpenAI GPT-2 124M (0.1139)"].get_ydata()) == [0.1139, 0.1139]
    assert "demo" not in core  # a run that was not evaluated draws nothing there
    bpb = lines_by_label(axes["validation bits per byte"])
    assert list(bpb["demo"].get_ydata()) == [r["val_bpb"] for r in val]
    for title, key in (("learning rate", "lr"), ("gradient norm", "grad_norm"), ("tokens/s", "tokens_per_s")):
        assert list(lines_by_label(axes[title])["gpt2"].get_ydata()) == [r[key] for r in train]


def test_the_train_loss_curve_is_a_moving_average_over_a_fiftieth_of_the_run(tmp_path):
    assert plots.moving_average([4.0, 2.0, 6.0, 1.0], window=2) == [4.0, 3.0, 4.0, 3.5]
    run = plots.Run("long", [{"step": s, "loss": float(s % 7)} for s in range(200)], {})
    fig = plots.build_figure([run])
    smoothed = lines_by_label(fig.axes[0])["long train"].get_ydata()
    assert smoothed[10] == pytest.approx(sum(s % 7 for s in range(7, 11)) / 4)  # window 200 // 50 = 4


def test_no_reference_line_for_a_run_of_another_shape(tmp_path):
    write_run(tmp_path / "demo", 4, 4, 128, 2048, hellaswag=True)
    fig = plots.build_figure([plots.read_run(tmp_path / "demo")])
    hellaswag = next(ax for ax in fig.axes if ax.get_title() == "HellaSwag acc_norm")
    assert list(lines_by_label(hellaswag)) == ["demo"]


@pytest.mark.slow
def test_a_folder_without_metrics_is_one_line(tmp_path):
    result = run_script("plot.py", tmp_path, check=False, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'metrics.jsonl'} does not exist")
    assert result.stderr.count("\n") == 1


def test_an_empty_metrics_file_is_an_error_not_a_blank_figure(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")  # a run that stopped before its first step
    with pytest.raises(RecordsError, match=r"metrics.jsonl holds no training or validation records yet: nothing to "
                                           "plot"):
        plots.read_run(tmp_path / "run")
    assert not (tmp_path / "run" / "plot.png").exists()


def test_a_run_killed_mid_line_still_plots_and_a_broken_line_is_named(tmp_path):
    records = write_run(tmp_path / "run", 4, 4, 128, 2048, hellaswag=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 10, "lo')
    assert len(plots.read_run(tmp_path / "run").records) == len(records)
    metrics.write_text('{"step": 0}\nnot json\n')
    with pytest.raises(RecordsError, match=r"metrics.jsonl, line 2: not a JSON record"):
        plots.read_run(tmp_path / "run")


def test_missing_matplotlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"^plotting needs the matplotlib package: pip install matplotlib$"):
        plots.build_figure([])
