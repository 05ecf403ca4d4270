"""Typed training configuration: dataclasses, loaded from a TOML file, then overridden by --section.key=value.

    python train_gpt2.py --config configs/gpt2-124M.toml --optim.lr=3e-4 --train.max_steps 100

Every key lives in one section ([model], [data], [optim], [train]) and is declared once, as its field: type,
default, valid values and help line (model.option). An unknown key, a value of the wrong type or one outside its
valid values stops with an error that names it and says what is valid; validate() holds the rules between keys.
"""

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from model import GPTConfig, option
from pretrain.errors import HelpRequested, UserError
from pretrain.hellaswag import STYLES as HELLASWAG_STYLES
from pretrain.parallel import MODES as PARALLEL_MODES
from pretrain.runtime import COMPILE_BACKENDS, COMPILE_SETTINGS, DTYPES


@dataclass
class DataConfig:
    dir: str = option("data/fineweb-edu-sample-10BT", "holds *_train_*.bin and *_val_*.bin shards")
    demo: bool = option(False, "dir is the demo corpus: build it (offline, in seconds) if it is missing")
    seq_len: int = option(1024, "tokens per sequence, at most model.block_size", "[1, inf)")
    micro_batch_size: int = option(64, "sequences per forward/backward on one device", "[1, inf)")
    total_batch_tokens: int = option(524288, "tokens per optimizer step over all devices; 2**19 ~ 0.5M (GPT-3 125M)",
                                     "[1, inf)")
    shuffle: bool = option(True, "shuffle documents over all shards each epoch; false: files in order (val never is)")
    seed: int = option(1337, "seeds the per-epoch shuffle of the documents and lanes", "[0, inf)")
    check_shard_dates: bool = option(True, "refuse to resume when a shard's size or modification date changed since "
                                           "the checkpoint (false: trust names and token counts, e.g. after a copy "
                                           "that did not keep dates)")


@dataclass
class OptimConfig:
    name: str = option("adamw", "adamw (GPT-2's) or muon: Muon for the blocks' matrices, AdamW for the rest (the "
                                "modern recipe)", choices=("adamw", "muon"))
    lr: float = option(6e-4, "peak learning rate, reached after warmup (AdamW's groups)", "(0, inf)")
    min_lr: float = option(6e-5, "the schedule ends here, 10% of peak", "[0, inf)")
    warmup_steps: int = option(715, "linear warmup steps (375M tokens at 2**19 tokens/step)", "[0, inf)")
    schedule: str = option("cosine", "after warmup: cosine decay to min_lr (GPT-2's), or wsd: constant, then a linear "
                                     "decay over the last decay_frac of the steps", choices=("cosine", "wsd"))
    decay_frac: float = option(0.4, "wsd: the share of the steps that decays to min_lr", "(0, 1]")
    weight_decay: float = option(0.1, "weight decay (decoupled), on 2-D parameters (matrices, embeddings) only",
                                 "[0, inf)")
    muon_lr: float = option(0.02, "Muon's peak learning rate (the blocks' matrices), on the same schedule as lr",
                            "(0, inf)")
    muon_momentum: float = option(0.95, "Muon's momentum (Nesterov)", "[0, 1)")
    muon_adjust_lr: str = option("original", "Muon's learning rate per matrix shape: original (x sqrt(max(1, "
                                             "rows/cols)), Keller Jordan's) or match_rms_adamw (x 0.2 sqrt(max(rows, "
                                             "cols)), Moonshot's)", choices=("original", "match_rms_adamw"))
    muon_split_qkv: bool = option(True, "Muon orthogonalises c_attn's q, k and v each alone (false: as one matrix)")
    beta1: float = option(0.9, "AdamW's first-moment decay", "[0, 1)")
    beta2: float = option(0.95, "AdamW's second-moment decay", "[0, 1)")
    eps: float = option(1e-8, "AdamW's denominator epsilon", "(0, inf)")
    # a negative max norm would flip the gradient and train uphill
    grad_clip: float = option(1.0, "max global gradient norm; 0 disables clipping", "[0, inf)")


@dataclass
class TrainConfig:
    max_steps: int = option(19073, "~10B tokens at 2**19 tokens/step", "[1, inf)")
    out_dir: str = option("runs/gpt2-124M", "metrics.jsonl and checkpoints go here")
    device: str = option("auto", "auto picks cuda, then mps, then cpu; or cpu, cuda, cuda:N, mps")
    dtype: str = option("auto", "autocast dtype: auto (bfloat16 where supported), bfloat16 or float32",
                        choices=DTYPES)
    compile: str = option("auto", "torch.compile: auto (on for CUDA), true or false", choices=COMPILE_SETTINGS)
    compile_backend: str = option("inductor", "torch.compile's backend: inductor (generates kernels), or aot_eager "
                                              "(the same graphs run eagerly: checks compiled training in seconds)",
                                  choices=COMPILE_BACKENDS)
    seed: int = option(1337, "seeds the initial weights, dropout and sampling", "[0, inf)")
    log_interval: int = option(1, "print a training step every N steps when not on a terminal (all go to "
                                  "metrics.jsonl)", "[1, inf)")
    eval_interval: int = option(250, "validation loss every N steps and at the last step; 0 disables", "[0, inf)")
    val_steps: int = option(20, "validation batches per evaluation on each rank", "[1, inf)")
    sample_interval: int = option(250, "print text samples every N steps; 0 disables", "[0, inf)")
    sample_tokens: int = option(32, "tokens generated per sample", "[1, inf)")
    sample_prompt: str = option("Hello, I'm a language model,", "the text every sample continues")
    checkpoint_interval: int = option(1000, "save every N steps (0: only the final step, which is always saved)",
                                      "[0, inf)")
    keep_checkpoints: int = option(3, "delete older checkpoints beyond the newest N; 0 keeps them all", "[0, inf)")
    peak_tflops: float = option(0.0, "per-device peak for MFU; 0 looks it up (GPUs) or measures a matmul (CPU)",
                                "[0, inf)")
    health_interval: int = option(0, "record update/data ratios, gradients, activations to health.jsonl every N "
                                     "steps; 0: off", "[0, inf)")
    resume: str = option("auto", "auto: continue from out_dir's newest checkpoint if any; none: start fresh; or a "
                                 "checkpoint path")
    skip_nonfinite: int = option(0, "steps with a non-finite loss or gradient norm to skip (unapplied) before "
                                    "stopping", "[0, inf)")
    wandb_project: str = option("", "log metrics to this Weights & Biases project from rank 0 (needs wandb); "
                                    "empty: off")
    tensorboard: bool = option(False, "also write metrics as TensorBoard events to <out_dir>/tensorboard (needs "
                                      "tensorboard)")
    hellaswag_interval: int = option(0, "HellaSwag accuracy every N steps and at the last step; 0 disables",
                                     "[0, inf)")
    hellaswag_limit: int = option(0, "HellaSwag examples per evaluation, the first N; 0 means all 10,042", "[0, inf)")
    hellaswag_data: str = option("", "a local HellaSwag jsonl; \"\" means the Hugging Face dataset Rowan/hellaswag")
    hellaswag_style: str = option("completion", "completion (build-nanogpt, llm.c) or harness "
                                                "(lm-evaluation-harness)", choices=HELLASWAG_STYLES)
    core_interval: int = option(0, "the CORE metric (DCLM's 22 tasks, as nanochat computes it) every N steps and at "
                                   "the last step; 0 disables", "[0, inf)")
    core_max_per_task: int = option(500, "CORE items per task, the first N after nanochat's shuffle (nanochat's "
                                         "training default); 0: all", "[0, inf)")
    core_bundle: str = option("", "the unzipped CORE eval bundle (the folder holding core.yaml); \"\": downloaded "
                                  "once into the cache (~/.cache/pretrain)")
    val_bpb: bool = option(False, "also bits per byte of the validation tokens, beside val_loss (comparable across "
                                  "tokenizers)")
    parallel: str = option("ddp", "over ranks: ddp (whole model per rank, fastest) or fsdp (sharded: for what ddp "
                                  "can't fit)", choices=PARALLEL_MODES)
    activation_checkpointing: bool = option(False, "recompute each block in backward: far less memory, ~1/3 more "
                                                   "compute")
    loss_chunk: int = option(1024, "training: head + cross-entropy this many tokens at a time, never all logits; "
                                   "0: plain", "[0, inf)")
    recompute_gelu: bool = option(True, "eager training: recompute each MLP's GELU in backward instead of keeping "
                                        "its output")


@dataclass
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)  # model.py's GPTConfig, so model.py stays standalone
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


MOVED_KEYS = {"model.loss_chunk": "train.loss_chunk", "model.recompute_gelu": "train.recompute_gelu"}


class ConfigError(UserError):
    """A config file, key or value that cannot be used; the message names it and says what is valid."""


def in_range(value: float, interval: str) -> bool:
    """Whether value lies in an interval written like "[0, 1)" (NaN and infinities never do)."""
    low_text, high_text = interval[1:-1].split(",")
    low, high = float(low_text), float(high_text)
    above_low = value >= low if interval[0] == "[" else value > low
    below_high = value <= high if interval[-1] == "]" else value < high
    return math.isfinite(value) and above_low and below_high


def _sections(cfg: Config) -> dict[str, object]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def declarations(section: object) -> dict[str, tuple[type, dict]]:
    """Each key of a section: its type and its declaration (help, valid, choices; model.option)."""
    hints = typing.get_type_hints(type(section))
    return {f.name: (hints[f.name], f.metadata) for f in dataclasses.fields(section)}


def valid_keys(cfg: Config | None = None) -> list[str]:
    cfg = cfg or Config()
    return [f"{name}.{key}" for name, section in _sections(cfg).items() for key in declarations(section)]


def _check_type(key: str, value, expected: type):
    """A TOML value must already have the right type; ints are accepted where floats are expected."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not expected:
        raise ConfigError(f"{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def _parse_cli_value(key: str, text: str, expected: type):
    """A command-line value is a string; convert it to the field's type."""
    try:
        if expected is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError
            return lowered in ("true", "1")
        if expected is int:
            return int(text.replace("_", ""))
        if expected is float:
            return float(text)
        return text
    except ValueError:
        raise ConfigError(f"--{key}: expected {expected.__name__}, got {text!r}") from None


def _set(cfg: Config, key: str, value, from_cli: bool) -> None:
    section_name, _, name = key.partition(".")
    section = _sections(cfg).get(section_name)
    keys = declarations(section) if section is not None else {}
    if key in MOVED_KEYS:
        raise ConfigError(f"{key} is now {MOVED_KEYS[key]} (how training computes, not what the model is)")
    if name not in keys:
        raise ConfigError(f"unknown config key '{key}'. Valid keys: {', '.join(valid_keys(cfg))}")
    expected, _ = keys[name]
    value = _parse_cli_value(key, value, expected) if from_cli else _check_type(key, value, expected)
    setattr(section, name, value)


def load_toml(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark, as some editors write, is not TOML's
        table = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                          "save it as UTF-8") from None
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; expected a .toml file such as "
                          "configs/gpt2-124M.toml") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    for section_name, entries in table.items():
        if not isinstance(entries, dict):
            raise ConfigError(f"{path}: '{section_name}' must be a [section]; sections are "
                              f"{', '.join(_sections(cfg))}")
        for name, value in entries.items():
            try:
                _set(cfg, f"{section_name}.{name}", value, from_cli=False)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None


def _check_declared(cfg: Config) -> None:
    """Every key's value against its declaration: one of its choices, inside its interval."""
    for section_name, section in _sections(cfg).items():
        for name, (_, declared) in declarations(section).items():
            key, value = f"{section_name}.{name}", getattr(section, name)
            if declared.get("choices") and value not in declared["choices"]:
                raise ConfigError(f"{key}: expected one of {', '.join(declared['choices'])}, got {value!r}")
            if declared.get("valid") and not in_range(value, declared["valid"]):
                raise ConfigError(f"{key} = {value!r} is out of range: expected a value in {declared['valid']}")


def _check_out_dir(out_dir: str) -> None:
    """train.out_dir must be a directory or creatable as one: no part of the path may be a file."""
    existing = next((p for p in (Path(out_dir), *Path(out_dir).parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"train.out_dir {out_dir!r}: {existing} is a file; expected a directory for checkpoints "
                          "and metrics")


def validate(cfg: Config) -> None:
    """Each key against its declaration, then the rules between keys that do not depend on the number of devices
    (grad_accum_steps checks the one that does)."""
    _check_declared(cfg)
    if cfg.data.seq_len > cfg.model.block_size:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds model.block_size ({cfg.model.block_size})")
    if cfg.model.n_embd % cfg.model.n_head:
        raise ConfigError(f"model.n_embd ({cfg.model.n_embd}) must be divisible by model.n_head ({cfg.model.n_head})")
    if not 0 <= cfg.optim.min_lr <= cfg.optim.lr:
        raise ConfigError(f"optim.min_lr ({cfg.optim.min_lr}) must be between 0 and optim.lr ({cfg.optim.lr})")
    if cfg.train.sample_interval and not cfg.train.sample_prompt:
        raise ConfigError("train.sample_prompt is empty: samples need at least one character of text to continue "
                          "(or set train.sample_interval=0)")
    # Under FSDP every forward pass gathers weights from all ranks: the health probe (rank 0 alone) would hang, and
    # the HellaSwag scorer calls the blocks past the root's gather. Refused at startup rather than at the first one.
    if cfg.train.parallel == "fsdp" and cfg.train.health_interval:
        raise ConfigError("train.health_interval needs train.parallel=ddp: the health probe runs on rank 0 alone, "
                          "and under fsdp every forward pass needs all ranks (set train.health_interval=0)")
    # HellaSwag, CORE and bits per byte score through the model's hidden_states, past the root's gather
    for key, off in (("hellaswag_interval", "0"), ("core_interval", "0"), ("val_bpb", "false")):
        if cfg.train.parallel == "fsdp" and getattr(cfg.train, key):
            raise ConfigError(f"train.{key} needs train.parallel=ddp for now (set train.{key}={off} and run "
                              "evaluate.py on the checkpoints)")
    # Newton-Schulz needs each whole matrix; FSDP2 holds a shard of it per rank (a DTensor torch's Muon cannot step)
    if cfg.train.parallel == "fsdp" and cfg.optim.name == "muon":
        raise ConfigError("optim.name=muon needs train.parallel=ddp: torch's Muon orthogonalises whole matrices, and "
                          "fsdp gives each rank a shard (use ddp, or optim.name=adamw to shard)")
    _check_out_dir(cfg.train.out_dir)
    if not cfg.train.resume:
        raise ConfigError("train.resume is empty: expected auto, none or the path of a checkpoint")


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step so that every step sees exactly data.total_batch_tokens tokens."""
    per_micro_step = cfg.data.micro_batch_size * cfg.data.seq_len * world_size
    if cfg.data.total_batch_tokens % per_micro_step:
        raise ConfigError(
            f"data.total_batch_tokens ({cfg.data.total_batch_tokens}) must be divisible by data.micro_batch_size x "
            f"data.seq_len x world size = {cfg.data.micro_batch_size} x {cfg.data.seq_len} x {world_size} "
            f"= {per_micro_step}")
    return cfg.data.total_batch_tokens // per_micro_step


def help_text(cfg: Config, prog: str = "train_gpt2.py") -> str:
    lines = [f"usage: {prog} [--config FILE.toml] [--section.key=value ...]", "",
             "Keys, with their defaults (after --config, if one was given):"]
    for section_name, section in _sections(cfg).items():
        lines.append(f"  [{section_name}]")
        for name, (typ, declared) in declarations(section).items():
            choices = f", one of {', '.join(declared['choices'])}" if declared.get("choices") else ""
            valid_range = f" in {declared['valid']}" if declared.get("valid") else ""
            default = getattr(section, name)
            lines.append(f"    --{section_name}.{name}={default!r}  ({typ.__name__}{valid_range}{choices})")
            lines.append(f"        {declared.get('help', '')}")
    return "\n".join(lines)


def load_config(argv: list[str], prog: str = "train_gpt2.py") -> Config:
    """Defaults, then --config FILE, then --key=value / --key value overrides, in that order.
    Raises ConfigError for anything invalid, and HelpRequested (holding every key, its default and its meaning)
    for --help."""
    args = list(argv)
    cfg = Config()
    overrides: list[tuple[str, str]] = []
    config_path = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            i += 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            value = args[i + 1]
            i += 1
        if key == "config":
            config_path = value
        else:
            overrides.append((key, value))
        i += 1
    if config_path is not None:
        load_toml(cfg, config_path)
    for key, value in overrides:
        _set(cfg, key, value, from_cli=True)
    if "--help" in args or "-h" in args:
        raise HelpRequested(help_text(cfg, prog))
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (saved in checkpoints and the run directory)."""
    return dataclasses.asdict(cfg)
