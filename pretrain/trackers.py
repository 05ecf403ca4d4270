"""Experiment trackers: the records of metrics.jsonl, also sent to Weights & Biases and/or TensorBoard.

Both are off by default and optional dependencies; asking for one that is not installed stops the run at
startup with one line saying what to install, rather than after hours of training with nothing logged. Only
rank 0 opens them (the MetricsLogger is their only caller). Each numeric value of a record becomes a scalar
under its key, at the record's step.
"""

from pathlib import Path

from pretrain.config import Config, to_dict
from pretrain.errors import UserError, missing_package
from pretrain.run_dir import RunDir


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers other than the step (None, text and flags are left out)."""
    return {key: value for key, value in record.items()
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)}


class TensorBoardTracker:
    def __init__(self, log_dir: str | Path, resumed_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_package("train.tensorboard", "tensorboard") from None
        # purge_step: TensorBoard drops the events of steps from here on that an earlier attempt of the run wrote,
        # as run_dir truncates metrics.jsonl, so every step appears once
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resumed_step)

    def log(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, project: str, run_dir: str | Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise missing_package("train.wandb_project", "wandb") from None
        # The run folder's name names the W&B run; without network, WANDB_MODE=offline keeps it on disk for
        # `wandb sync` later. Each start (a resume too) is a W&B run of its own, from the step it starts at, so no
        # W&B run holds a step twice.
        try:
            self.run = wandb.init(project=project, name=Path(run_dir).name, dir=str(run_dir), config=config)
        except wandb.errors.Error as e:  # no API key, above all
            raise UserError(f"train.wandb_project: Weights & Biases could not start ({e}): run `wandb login` or set "
                            "WANDB_API_KEY, or set WANDB_MODE=offline to keep the run on disk for `wandb sync`") \
                from None

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_trackers(cfg: Config, run: RunDir, resumed_step: int | None = None, enabled: bool = True) -> list:
    """The trackers cfg asks for (none on ranks other than 0). resumed_step: the step a resumed run continues
    from (None for a fresh start)."""
    if not enabled:
        return []
    found = []
    if cfg.train.tensorboard:
        found.append(TensorBoardTracker(run.tensorboard, resumed_step))
    if cfg.train.wandb_project:
        found.append(WandbTracker(cfg.train.wandb_project, run.path, to_dict(cfg)))
    return found
