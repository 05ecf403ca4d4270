"""Checkpoints: what one holds, save atomically, load safely (weights_only=True), find the newest, build a model.

A checkpoint is a dict of tensors and plain Python values only, so torch.load(weights_only=True) can read it
and a checkpoint can never run code. The training loop hands this module its objects (save_training_state) and
this module alone decides the dict's layout. Training, evaluation and sampling all load models through load_model.
"""

import pickle
import re
import zipfile
from pathlib import Path

import torch

from model import GPT, GPTConfig
from pretrain.fileio import atomic_path

CHECKPOINT_RE = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or not one of ours."""


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt_{step:06d}.pt"


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write state with torch.save; the file appears complete or not at all."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def save_training_state(out_dir: str | Path, step: int, model_state: dict, optimizer_state: dict,
                        train_loader, config: dict, world_size: int) -> Path:
    """Save everything a run needs to continue after `step` completed steps, as ckpt_<step>.pt in out_dir.
    model_state, optimizer_state: the whole model's (pretrain.parallel.full_state_dicts, also under FSDP);
    train_loader anything with a state_dict (the ShardLoader)."""
    state = {"model": model_state, "optimizer": optimizer_state, "step": step, "config": config,
             "train_loader": train_loader.state_dict(), "world_size": world_size}
    return save_checkpoint(checkpoint_path(out_dir, step), state)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt, or holds more than tensors and plain "
                              f"values ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint (expected a dict with 'model' and "
                              f"'config' entries)")
    return state


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """The checkpoints in out_dir, oldest step first. Temporary files never match."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def find_latest(out_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in out_dir, or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep 0: delete none)."""
    if keep > 0:
        for path in list_checkpoints(out_dir)[:-keep]:
            path.unlink()


def load_model(source: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """A GPT from a training checkpoint (.pt file, or a run directory: its newest checkpoint), or OpenAI GPT-2
    weights (a hub name such as gpt2-xl, or a directory written by save_pretrained).
    Returns (model in eval mode on device, the checkpoint's metadata: step, config; empty for HF weights)."""
    source_path = Path(source)
    if source_path.is_dir() and (latest := find_latest(source_path)) is not None:
        source_path = latest
    if source_path.is_file():
        state = load_checkpoint(source_path)
        model = GPT(GPTConfig(**state["config"]["model"]))
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {source_path} does not match its own model config: {e}") from None
        meta = {k: v for k, v in state.items() if k in ("step", "config")}
    elif source_path.suffix == ".pt":
        raise CheckpointError(f"checkpoint {source_path} does not exist")
    else:
        model, meta = GPT.from_pretrained(str(source)), {}
    return model.to(device).eval(), meta
