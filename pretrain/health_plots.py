"""The training-health figure, from the records of a run's health.jsonl (see pretrain/health.py).

    from pretrain.health_plots import plot_health
    plot_health("runs/demo")          # writes runs/demo/health.png and returns its path

Six panels: log10 update-to-data ratio per layer against step (with the 1e-3 line and the warning bounds),
gradient norm per layer, residual-stream norm and activation std by depth at a few steps, attention entropy
per layer against step (against the uniform-attention ceiling) and per head at the last recording.
matplotlib is imported only here, and only when a figure is drawn.
"""

import math
from pathlib import Path

from pretrain.fileio import RecordsError, read_jsonl
from pretrain.health import HIGH_RATIO, LOW_RATIO
from pretrain.plots import matplotlib, new_figure, save_figure
from pretrain.run_dir import RunDir

HEALTHY_RATIO = 1e-3  # the classic rule of thumb for an update-to-data ratio
DEPTH_PROFILES = 4  # how many recordings the by-depth panels show (first, last and evenly between)


def _log10(value: float | None) -> float:
    return math.log10(value) if value else math.nan  # None or 0 leaves a gap in the line


def _spread(records: list[dict], count: int) -> list[dict]:
    """Up to `count` records: the first, the last and evenly spaced ones between."""
    if len(records) <= count:
        return records
    picks = sorted({round(i * (len(records) - 1) / (count - 1)) for i in range(count)})
    return [records[i] for i in picks]


def _plot_per_layer(ax, records: list[dict], value) -> None:
    steps = [r["step"] for r in records]
    for layer in records[-1]["layers"]:
        ax.plot(steps, [value(r["layers"].get(layer, {})) for r in records], label=layer)


def draw_health(records: list[dict]):
    """The health figure of `records` (health.jsonl's, in order) as a matplotlib Figure with 2 x 3 panels."""
    if not records:
        raise RecordsError("no health records to plot: was train.health_interval set?")
    fig = new_figure(figsize=(16, 9), layout="constrained")
    MaxNLocator = matplotlib().ticker.MaxNLocator
    axes = fig.subplots(2, 3)

    ax = axes[0, 0]
    _plot_per_layer(ax, records, lambda layer: _log10(layer.get("update_ratio")))
    ax.axhline(math.log10(HEALTHY_RATIO), color="black", linestyle="--", label="1e-3")
    for bound in (HIGH_RATIO, LOW_RATIO):
        ax.axhline(math.log10(bound), color="red", linestyle=":", linewidth=1)
    ax.set(title="update / data ratio per layer (weight matrices)", xlabel="step", ylabel="log10 |dW| / |W|")
    ax.legend(fontsize="x-small", ncol=2)

    ax = axes[0, 1]
    _plot_per_layer(ax, records, lambda layer: layer.get("grad_norm") or math.nan)
    clipped_steps = [r["step"] for r in records if r["clipped"]]
    if clipped_steps:
        ax.plot(clipped_steps, [0.0] * len(clipped_steps), "|", color="red", transform=ax.get_xaxis_transform(),
                markersize=12, label="clipped")
    ax.set(title="gradient norm per layer (before clipping)", xlabel="step", yscale="log")
    ax.legend(fontsize="x-small", ncol=2)

    profiles = _spread(records, DEPTH_PROFILES)
    ax = axes[0, 2]
    for r in profiles:
        norms = r["activations"]["residual_norm"]
        ax.plot(range(len(norms)), norms, marker="o", label=f"step {r['step']}")
    ax.set(title="residual stream norm by depth", xlabel="depth (0: embeddings, d: after block h.d-1)",
           ylabel="mean |x| per token")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="x-small")

    ax = axes[1, 0]
    for r in profiles:
        acts = r["activations"]
        depths = range(1, len(acts["block_std"]) + 1)
        line, = ax.plot(depths, acts["block_std"], marker="o", label=f"block output, step {r['step']}")
        ax.plot(depths, acts["gelu_std"], marker="x", linestyle="--", color=line.get_color(),
                label=f"GELU, step {r['step']}")
    ax.set(title="activation std by depth", xlabel="depth (d: block h.d-1)", ylabel="std")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="x-small", ncol=2)

    ax = axes[1, 1]
    steps = [r["step"] for r in records]
    n_layer = len(records[-1]["attention_entropy"])
    for layer in range(n_layer):
        means = [sum(r["attention_entropy"][layer]) / len(r["attention_entropy"][layer]) for r in records]
        ax.plot(steps, means, label=f"h.{layer}")
    ax.plot(steps, [r["attention_entropy_uniform"] for r in records], color="black", linestyle="--",
            label="uniform")
    ax.set(title="attention entropy per layer (mean over heads)", xlabel="step", ylabel="nats")
    ax.legend(fontsize="x-small", ncol=2)

    ax = axes[1, 2]
    last = records[-1]
    image = ax.imshow(last["attention_entropy"], aspect="auto", cmap="viridis", vmin=0,
                      vmax=last["attention_entropy_uniform"])
    fig.colorbar(image, ax=ax, label="nats (top: uniform)")
    ax.set(title=f"attention entropy per head, step {last['step']}", xlabel="head", ylabel="layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def plot_health(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Draw the health figure of a run folder's health.jsonl to out_path (default: RUN_DIR/health.png)."""
    run = RunDir(run_dir)
    if not run.health.is_file():
        raise RecordsError(f"{run.health} does not exist: train with --train.health_interval=N to record it")
    return save_figure(draw_health(read_jsonl(run.health)), out_path or run.path / "health.png")
