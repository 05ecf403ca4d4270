"""Plot training curves from run folders (their metrics.jsonl) into one PNG; several runs share each panel.

    python plot.py runs/demo                                   # writes runs/demo/plot.png
    python plot.py runs/a runs/b --out compare.png             # two runs on one figure
    python plot.py runs/demo --health                          # training health -> runs/demo/health.png

Panels: train and validation loss (against step and tokens seen), HellaSwag acc_norm, learning rate, gradient
norm and tokens/s. With --health, the figure of health.jsonl instead (train.health_interval): update-to-data
ratio and gradient norm per layer, activations and residual norm by depth, attention entropy.
Needs matplotlib (pip install matplotlib).
"""

import argparse
from pathlib import Path

from pretrain import errors
from pretrain.health_plots import plot_health
from pretrain.plots import build_figure, read_run, save_figure


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="plot.py", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a training run's out_dir (holds metrics.jsonl)")
    parser.add_argument("--out", help="the PNG to write (default: RUN_DIR/plot.png for one run, "
                                      "plot.png for several; with --health, RUN_DIR/health.png)")
    parser.add_argument("--health", action="store_true", help="plot the run's health.jsonl (one run) instead")
    args = parser.parse_args(argv)
    if args.health and len(args.runs) > 1:
        parser.error("--health plots one run at a time")
    return args


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, or its whole path where two runs share a folder name."""
    names = [d.name for d in run_dirs]
    return [d.name if names.count(d.name) == 1 else str(d) for d in run_dirs]


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.health:
        print(f"wrote {plot_health(args.runs[0], args.out)}")
        return
    run_dirs = [Path(r) for r in args.runs]
    default_out = run_dirs[0] / "plot.png" if len(run_dirs) == 1 else Path("plot.png")
    out = Path(args.out) if args.out else default_out
    runs = [read_run(d, name) for d, name in zip(run_dirs, run_names(run_dirs))]
    save_figure(build_figure(runs), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    errors.run(main)
