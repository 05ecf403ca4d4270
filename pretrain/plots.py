"""The training-curves figure of plot.py: one PNG comparing one or more runs from their metrics.jsonl.

Panels: loss (train and validation) against step and against tokens seen, validation bits per byte, HellaSwag
acc_norm and the CORE metric (each with OpenAI GPT-2 124M's score when a run has that shape), learning rate,
gradient norm and tokens/s. Each run keeps one colour in
every panel. matplotlib is imported only here (pyplot() and save_figure serve health_plots too) and only when a
figure is made: training never needs it.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from pretrain.errors import missing_package
from pretrain.fileio import RecordsError, atomic_path, read_jsonl
from pretrain.run_dir import RunDir

# OpenAI's GPT-2 124M, the lines to beat: HellaSwag acc_norm, completion style (build-nanogpt / llm.c); CORE
# (nanochat's table)
GPT2_124M_HELLASWAG = 0.2955
GPT2_124M_CORE = 0.1139
GPT2_124M_SHAPE = {"n_layer": 12, "n_head": 12, "n_embd": 768}

PANELS = ("loss", "loss against tokens seen", "validation bits per byte", "learning rate", "HellaSwag acc_norm",
          "CORE", "gradient norm", "tokens/s")
# the evaluation panels: their record key, the GPT-2 124M line and what turns them on
EVALUATIONS = {"validation bits per byte": ("val_bpb", None, "train.val_bpb"),
               "HellaSwag acc_norm": ("hellaswag_acc_norm", GPT2_124M_HELLASWAG, "train.hellaswag_interval"),
               "CORE": ("core", GPT2_124M_CORE, "train.core_interval")}


@dataclass
class Run:
    name: str
    records: list[dict]
    config: dict  # train_config.json, empty when the folder has none

    @property
    def tokens_per_step(self) -> int | None:
        return self.config.get("data", {}).get("total_batch_tokens")

    @property
    def is_gpt2_124m(self) -> bool:
        model = self.config.get("model", {})
        return all(model.get(key) == value for key, value in GPT2_124M_SHAPE.items())

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of every record that holds key."""
        found = [(r["step"], r[key]) for r in self.records if r.get(key) is not None]
        return [step for step, _ in found], [value for _, value in found]


def read_run(path: str | Path, name: str | None = None) -> Run:
    """A run folder's metrics records (a last line cut short is skipped) and config."""
    run = RunDir(path)
    if not run.metrics.is_file():
        raise RecordsError(f"{run.metrics} does not exist (a run folder holds it once training has started)")
    try:
        config = run.read_config()
    except json.JSONDecodeError as e:
        raise RecordsError(f"{run} holds a train_config.json that is not valid JSON: {e}") from None
    records = read_jsonl(run.metrics)
    if not any("loss" in r or "val_loss" in r for r in records):
        raise RecordsError(f"{run.metrics} holds no training or validation records yet: nothing to plot")
    return Run(name or run.path.name, records, config)


def matplotlib():
    """matplotlib with its figure and ticker modules, imported on first use, or one line saying how to get it."""
    try:
        import matplotlib
        import matplotlib.figure
        import matplotlib.ticker
    except ImportError:
        raise missing_package("plotting", "matplotlib") from None
    return matplotlib


def new_figure(**kwargs):
    """A matplotlib Figure that draws to files only: no pyplot, so no GUI backend and no global state."""
    return matplotlib().figure.Figure(**kwargs)


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of each value and the window - 1 before it (fewer at the start)."""
    averaged, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        averaged.append(total / min(i + 1, window))
    return averaged


def smoothing_window(num_points: int) -> int:
    """Enough steps to average out batch-to-batch noise, still few against the run: 1/50 of it."""
    return max(1, num_points // 50)


def _plot_loss(ax, run: Run, color, tokens_per_step: int | None) -> None:
    """Train loss per step (faint) and its moving average, validation loss as joined dots; x in steps, or in
    tokens seen when tokens_per_step is given."""
    scale = tokens_per_step or 1
    # A step record's loss comes after training on that step's batch: (step + 1) batches seen. A validation
    # record at step s is measured before step s trains: s batches seen.
    steps, losses = run.series("loss")
    x = [(s + 1) * scale if tokens_per_step else s for s in steps]
    ax.plot(x, losses, color=color, linewidth=0.6, alpha=0.25, label=f"_{run.name} train per step")
    ax.plot(x, moving_average(losses, smoothing_window(len(losses))), color=color, linewidth=1.2,
            label=f"{run.name} train")
    steps, val_losses = run.series("val_loss")
    ax.plot([s * scale for s in steps], val_losses, color=color, marker="o", markersize=3, linestyle="--",
            label=f"{run.name} val")


def build_figure(runs: list[Run]):
    """The figure (matplotlib Figure) with one axes per entry of PANELS, titled so."""
    fig = new_figure(figsize=(20, 8.5), layout="constrained")
    grid = fig.subplots(2, 4)
    axes = dict(zip(PANELS, grid.flat))
    for ax, title in zip(grid.flat, PANELS):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes["loss against tokens seen"].set_xlabel("tokens seen")
    colors = matplotlib().rcParams["axes.prop_cycle"].by_key()["color"]

    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        _plot_loss(axes["loss"], run, color, None)
        if run.tokens_per_step:
            _plot_loss(axes["loss against tokens seen"], run, color, run.tokens_per_step)
        for panel, key in (("learning rate", "lr"), ("gradient norm", "grad_norm"), ("tokens/s", "tokens_per_s")):
            steps, values = run.series(key)
            if steps:
                axes[panel].plot(steps, values, color=color, label=run.name)
        for panel, (key, _, _) in EVALUATIONS.items():
            steps, values = run.series(key)
            if steps:
                axes[panel].plot(steps, values, color=color, marker="o", markersize=3, label=run.name)

    for panel, (key, gpt2_124m, setting) in EVALUATIONS.items():
        if gpt2_124m is not None and any(run.is_gpt2_124m for run in runs):
            axes[panel].axhline(gpt2_124m, color="gray", linestyle="--", label=f"OpenAI GPT-2 124M ({gpt2_124m})")
        if not any(run.series(key)[0] for run in runs):
            axes[panel].text(0.5, 0.5, f"not evaluated ({setting})", ha="center", va="center",
                             transform=axes[panel].transAxes, color="gray")
    if any(run.series("grad_norm")[0] for run in runs):
        axes["gradient norm"].set_yscale("log")  # early spikes are orders of magnitude above the rest
    for ax in axes.values():
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write the figure (as .png, .pdf or .svg by the name; PNG without a suffix); the file appears complete or
    not at all."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=100)
    return path
