"""Checkpoints: what one holds, save atomically, load safely (weights_only=True), find the newest, build a model.

A checkpoint is a dict of tensors and plain Python values only, so torch.load(weights_only=True) can read it
and a checkpoint can never run code. The training loop hands this module its objects (save_training_state,
restore_training_state) and this module alone decides the dict's layout:

    model, optimizer   state dicts (the unwrapped, uncompiled model)
    step, tokens_seen  optimizer steps completed and the tokens they consumed
    train_loader       the loader's position (in tokens) and what it must match (split, seed, shards)
    rng                one entry per rank: python, numpy, torch CPU and CUDA states, so dropout continues identically
    config, world_size the resolved config as a dict, and the number of ranks that wrote it

Every rank's RNG state is gathered to rank 0, which writes the one file; on resume rank r takes entry r.
Training, evaluation and sampling all load models through load_model.
"""

import argparse
import dataclasses
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from model import GPT, GPTConfig
from pretrain import distributed, parallel
from pretrain.errors import MissingPackage, UserError
from pretrain.fileio import atomic_path

CHECKPOINT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
# How to compute, not what the model is: [model] keys of older checkpoints, now train.loss_chunk and
# train.recompute_gelu.
MOVED_TO_TRAIN = ("loss_chunk", "recompute_gelu")


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, corrupt, not one of ours, or does not fit this run."""


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt_{step:06d}.pt"


def checkpoint_step(path: str | Path) -> int:
    return int(CHECKPOINT_RE.match(Path(path).name).group(1))


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write state with torch.save; the file appears complete or not at all (a failed save leaves the previous
    checkpoints as they were)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except RuntimeError as e:  # torch.save's C++ writer reports a full disk as "basic_ios::clear: iostream error"
        needed = sum(t.nbytes for t in _tensors(state))
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else None
        if free is not None and free < needed:
            why = f"the disk is full ({free / 2**20:,.0f} MiB free, the checkpoint needs {needed / 2**20:,.0f} MiB)"
        else:
            why = str(e).strip().splitlines()[0]
        raise CheckpointError(f"cannot write checkpoint {path}: {why}; the checkpoints saved before it are "
                              "intact") from None
    return path


def _tensors(value):
    """Every tensor in a nest of dicts and lists."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


# -- random number generators ----------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict:
    """This process's generator states as tensors and plain values (numpy's array becomes a list of ints)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state(), "cuda": None}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# -- training state --------------------------------------------------------------------------------------------

def save_training_state(path: str | Path, step: int, tokens_seen: int, model_state: dict, optimizer_state: dict,
                        train_loader, config: dict, device: torch.device) -> Path:
    """Save everything a run needs to continue after `step` completed steps, to path.
    Every rank calls this (their RNG states are gathered); rank 0 writes. model_state, optimizer_state: the whole
    model's, in one process's layout (pretrain.parallel.full_state_dicts, also under FSDP); train_loader anything
    with a state_dict (the ShardLoader). Returns the path on every rank."""
    rng = distributed.gather_to_master(rng_state(device))
    path = Path(path)
    if rng is not None:
        state = {"model": model_state, "optimizer": optimizer_state, "step": step,
                 "tokens_seen": tokens_seen, "train_loader": train_loader.state_dict(), "rng": rng,
                 "config": config, "world_size": len(rng)}
        save_checkpoint(path, state)
    return path


def restore_training_state(state: dict, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           train_loader, rank: int, device: torch.device) -> None:
    """Put a loaded checkpoint's model, optimizer, loader position and this rank's RNG state back in place.
    The optimizer keeps this run's hyperparameters (weight decay, betas, eps) where the config changed them."""
    fresh_groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        parallel.load_full_state_dicts(model, optimizer, state["model"], state["optimizer"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {str(e).splitlines()[0]}") from None
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.update(fresh)
    distributed.on_every_rank(_restore_loader, train_loader, state["train_loader"], path)
    # After a change of world size, ranks beyond the saved ones take a saved rank's stream: dropout masks then
    # differ from an uninterrupted run's (the data does not).
    rngs = state["rng"]
    set_rng_state(rngs[rank % len(rngs)], device)


# -- files -----------------------------------------------------------------------------------------------------

def _restore_loader(train_loader, loader_state: dict, path: Path) -> None:
    try:
        train_loader.load_state_dict(loader_state)
    except ValueError as e:  # the shards changed: on one node only, maybe
        raise CheckpointError(f"cannot resume from {path}: {e}") from None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except RuntimeError as e:
        if "allocate" in str(e):  # a checkpoint too large for this machine's memory is not a damaged one
            raise UserError(f"checkpoint {path} does not fit in memory here: {str(e).splitlines()[0]}") from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt, or holds more than tensors and plain "
                              f"values (RuntimeError: {str(e).splitlines()[0] if str(e) else ''})") from None
    except (EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
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


def _model_config(state: dict, path: Path) -> GPTConfig:
    saved = state["config"].get("model") if isinstance(state["config"], dict) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} has no model config (config['model'])")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    saved = {k: v for k, v in saved.items() if k not in MOVED_TO_TRAIN}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise CheckpointError(f"checkpoint {path}: its model config has keys this model.py does not know "
                              f"({', '.join(unknown)}); known keys: {', '.join(sorted(known))}")
    return GPTConfig(**saved)


def _looks_local(source: str) -> bool:
    """Whether source was meant as a path on this machine rather than a Hub model name such as gpt2 or
    openai-community/gpt2: absolute, relative to . or ~, a .pt file, or inside a directory that exists here."""
    path = Path(source)
    if path.is_absolute() or source.startswith((".", "~")) or path.suffix == ".pt":
        return True
    return len(path.parts) > 1 and Path(path.parts[0]).is_dir()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint PATH | --model NAME, one of them required: how every program names the model load_model loads."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint of this codebase: a .pt file, or a run folder (its newest)")
    source.add_argument("--model", help="OpenAI GPT-2 weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a folder "
                                        "written by save_pretrained (needs transformers)")


def load_model(source: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """A GPT from a training checkpoint (.pt file, or a run directory: its newest checkpoint), or OpenAI GPT-2
    weights (a hub name such as gpt2-xl, or a directory written by save_pretrained or export_hf.py).
    Returns (model in eval mode on device, the checkpoint's metadata: step, config and the file read as path;
    empty for HF weights)."""
    source_path = Path(source)
    if source_path.is_dir() and (latest := find_latest(source_path)) is not None:
        source_path = latest
    if source_path.is_file():
        state = load_checkpoint(source_path)
        model = GPT(_model_config(state, source_path))
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {source_path} does not match its own model config: {e}") from None
        meta = {k: v for k, v in state.items() if k in ("step", "config")} | {"path": source_path}
    elif source_path.is_dir() and not (source_path / "config.json").is_file():
        raise CheckpointError(f"{source_path} holds no checkpoint (ckpt_*.pt) and no save_pretrained model "
                              "(config.json)")
    elif not source_path.exists() and _looks_local(str(source)):
        raise CheckpointError(f"checkpoint {source_path} does not exist")
    else:
        try:
            model, meta = GPT.from_pretrained(str(source)), {}
        except ImportError:
            raise MissingPackage("loading OpenAI's GPT-2 weights or a Hugging Face folder needs the transformers "
                                 "package: pip install transformers") from None
        except Exception as e:  # transformers and safetensors raise their own kinds for a damaged folder
            if source_path.exists():
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointError(f"{source_path} is not a readable Hugging Face GPT-2 folder: {first_line}") \
                    from None
            if not isinstance(e, OSError | ValueError):
                raise
            raise CheckpointError(f"no checkpoint or run directory {str(source)!r} here, and the Hugging Face Hub "
                                  "has no GPT-2 model of that name or cannot be reached") from None
    return model.to(device).eval(), meta
