"""Training speed and memory: ways of running the same training step side by side, in one interleaved run.

    python bench.py --config configs/demo.toml
    python bench.py --config configs/gpt2-124M.toml --data.micro_batch_size=4 --bench.variants=anchor,default
    python bench.py --config configs/gpt2-124M.toml --bench.json=runs/bench-124M.json     # on a GPU
    python bench.py --config configs/demo.toml --bench.compare=configs/demo-modern.toml --bench.variants=default,compare

A step is train_gpt2.py's own training step (pretrain.trainer.train_step) on one micro-batch: the batch onto the
device, forward, backward, gradient clipping, the optimizer step. Variants (--bench.variants, default all that apply
here but compare):
  anchor      the anchors' way (nanoGPT, build-nanogpt): plain head + cross-entropy, every GELU output kept for
              backward; fused AdamW and bfloat16
              autocast only on CUDA (float32 and foreach AdamW on CPU); compiled as the config says
  default     the config as given, as train_gpt2.py would run it
  other_head  default with the other head: the plain head + cross-entropy (train.loss_chunk=0) if the config
              chunks it, else the chunked head (model.py's default chunk)
  foreach_adamw  default with the unfused AdamW
  eager / compiled, float32 / bfloat16   default with the other compile setting / autocast dtype
  act_ckpt    default with activation checkpointing
  kept_gelu   default keeping each GELU's output for backward (train.recompute_gelu=false), as the anchors do
  other_optim default with the other optimizer: muon (Muon for the blocks' matrices, AdamW for the rest) if the
              config says adamw, else adamw
  compare     the config of --bench.compare=PATH with the same overrides, as train_gpt2.py would run it (its model
              and optimizer), on the same batches: e.g. the modern recipe against GPT-2's (micro-batches must match)
Rounds visit every variant in turn, so the machine's noise hits all alike; times are medians over all rounds. The
optimizer column is the optimizer step's share of the step (timed apart, the device synchronised around it).
MFU uses train_gpt2.py's FLOP count against a matmul peak measured in the same run (and a known GPU's datasheet
figure). Peak memory comes from a fresh process per variant (CPU: peak resident memory above the process's
before the model; CUDA: peak allocated), so variants cannot inflate each other's.

bench.py's own options: --bench.steps (timed steps per variant per round), --bench.rounds, --bench.warmup,
--bench.variants (comma-separated), --bench.memory (true/false), --bench.json (write the results there),
--bench.compare (a config file for the compare variant),
--bench.profile=N (instead of timing: where one step's time goes, torch.profiler's N costliest ops per variant).
"""

import ctypes
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model import DEFAULT_LOSS_CHUNK, GPT
from pretrain import errors, parallel, runtime, shard_builder
from pretrain.config import Config, ConfigError, load_config
from pretrain.fileio import atomic_write_text
from pretrain.loader import ShardLoader
from pretrain.metrics import flops_per_token, gpu_peak_tflops
from pretrain.optim import build_optimizer
from pretrain.shards import ShardError, list_shards
from pretrain.trainer import train_step

BENCH_DEFAULTS = {"steps": 3, "rounds": 3, "warmup": 2, "variants": "", "memory": "true", "json": "", "profile": "0",
                  "compare": ""}
ALL_VARIANTS = ("anchor", "default", "other_head", "foreach_adamw", "other_compile", "other_dtype", "act_ckpt",
                "kept_gelu", "other_optim", "compare")


@dataclass
class Variant:
    key: str  # its name in --bench.variants
    name: str  # its name in the table
    loss_chunk: int
    fused_adamw: bool
    compile: bool
    dtype: torch.dtype
    activation_checkpointing: bool
    recompute_gelu: bool
    optimizer: str  # optim.name
    config: Config  # the model, optimizer settings and LR it trains with
    step_ms: list[float] = field(default_factory=list)
    load_ms: list[float] = field(default_factory=list)
    optimizer_ms: list[float] = field(default_factory=list)

    def settings(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        head = f"chunked head ({self.loss_chunk})" if self.loss_chunk else "plain head"
        adamw = "fused AdamW" if self.fused_adamw else "foreach AdamW"
        optimizer = f"Muon + {adamw}" if self.optimizer == "muon" else adamw
        compiled = "compiled" if self.compile else "eager"
        checkpointing = ", act. ckpt" if self.activation_checkpointing else ""
        recomputes = self.recompute_gelu and not self.compile and self.config.model.activation == "gelu"
        gelu = ", GELU recomputed" if recomputes else ""
        model = ", ".join(self.config.model.modern_flags())
        return f"{model + ', ' if model else ''}{head}, {optimizer}, {compiled}, {dtype}{gelu}{checkpointing}"


def split_bench_args(argv: list[str]) -> tuple[dict, list[str]]:
    """bench.py's own --bench.KEY=value options, and the rest (training config overrides)."""
    options, rest = dict(BENCH_DEFAULTS), []
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--bench."):
            rest.append(arg)
            continue
        name = key.removeprefix("bench.")
        if name not in BENCH_DEFAULTS or not eq:
            raise ConfigError(f"{arg}: bench options are --bench.KEY=value with KEY one of {', '.join(BENCH_DEFAULTS)}")
        options[name] = value
    for name in ("steps", "rounds", "warmup", "profile"):
        text = str(options[name])
        if not text.isdigit() or (name in ("steps", "rounds") and int(text) == 0):
            raise ConfigError(f"--bench.{name}: expected a whole number (steps and rounds at least 1), got {text!r}")
        options[name] = int(text)
    if options["memory"] not in ("true", "false", "only"):
        raise ConfigError(f"--bench.memory: expected true or false, got {options['memory']!r}")
    return options, rest


def make_variants(names: list[str], cfg, rt: runtime.Runtime,
                  compare: tuple[str, Config] | None = None) -> tuple[list[Variant], list[str]]:
    """The variants asked for, and a note for each one that does not apply on this machine. compare: the path and
    config of --bench.compare."""
    default = Variant("default", "default", cfg.train.loss_chunk, True, rt.compile, rt.dtype,
                      cfg.train.activation_checkpointing, cfg.train.recompute_gelu, cfg.optim.name, cfg)
    made, notes = [], []
    for name in names:
        if name == "anchor":
            # nanoGPT's choices: fused AdamW on CUDA only, autocast on CUDA only (float32 on CPU)
            on_cuda = rt.device.type == "cuda"
            anchor_dtype = rt.dtype if on_cuda else torch.float32
            made.append(Variant("anchor", "anchor", 0, on_cuda, rt.compile, anchor_dtype, False, False, "adamw", cfg))
        elif name == "default":
            made.append(default)
        elif name == "other_head":
            other_chunk = 0 if cfg.train.loss_chunk else DEFAULT_LOSS_CHUNK
            made.append(_like(default, name, "chunked_head" if other_chunk else "plain_head", loss_chunk=other_chunk))
        elif name == "foreach_adamw":
            made.append(_like(default, name, "foreach_adamw", fused_adamw=False))
        elif name == "other_compile":
            made.append(_like(default, name, "eager" if rt.compile else "compiled", compile=not rt.compile))
        elif name == "other_dtype":
            other = torch.bfloat16 if rt.dtype == torch.float32 else torch.float32
            note = _dtype_unsuitable(other, rt.device)
            if note:
                notes.append(note)
            else:
                made.append(_like(default, name, str(other).removeprefix("torch."), dtype=other))
        elif name == "act_ckpt":
            made.append(_like(default, name, "act_ckpt", activation_checkpointing=True))
        elif name == "kept_gelu":
            made.append(_like(default, name, "kept_gelu", recompute_gelu=False))
        elif name == "other_optim":
            other = "adamw" if cfg.optim.name == "muon" else "muon"
            made.append(_like(default, name, other, optimizer=other))
        elif name == "compare":
            if compare is None:
                raise ConfigError("--bench.variants=compare needs --bench.compare=PATH, the config to compare")
            path, other = compare
            made.append(Variant(name, Path(path).stem, other.train.loss_chunk, True, rt.compile, rt.dtype,
                                other.train.activation_checkpointing, other.train.recompute_gelu, other.optim.name,
                                other))
        else:
            raise ConfigError(f"--bench.variants: unknown variant {name!r}; variants are {', '.join(ALL_VARIANTS)}")
    return made, notes


def _like(base: Variant, key: str, name: str, **changes) -> Variant:
    settings = {k: getattr(base, k) for k in ("loss_chunk", "fused_adamw", "compile", "dtype",
                                              "activation_checkpointing", "recompute_gelu", "optimizer", "config")}
    return Variant(key, name, **{**settings, **changes})


def _dtype_unsuitable(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why a variant in `dtype` is left out here, or None: on a CPU without bfloat16 instructions a bfloat16 matmul
    runs tens of times slower than float32 (the same decision as train.dtype=auto)."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return None
    chosen, reason = runtime.auto_cpu_dtype()
    return None if chosen == torch.bfloat16 else f"bfloat16 skipped: {reason}"


class Batches:
    """Training batches from the config's shards (the real loader, so its cost is counted), or random tokens when
    there are none; `seconds` adds up the time spent getting them."""

    def __init__(self, cfg):
        B, T = cfg.data.micro_batch_size, cfg.data.seq_len
        if cfg.data.demo and not shard_builder.is_complete(cfg.data.dir):
            print(f"building the demo corpus in {cfg.data.dir} (once)")
            shard_builder.build_demo_corpus(cfg.data.dir)
        has_shards = _has_train_shards(cfg.data.dir)
        self.loader = ShardLoader(cfg.data.dir, "train", B, T, seed=cfg.data.seed) if has_shards else None
        self.source = f"shards in {cfg.data.dir}" if has_shards else f"random tokens (no shards in {cfg.data.dir})"
        self.generator = torch.Generator().manual_seed(0)
        self.shape = (B, T)
        self.seconds = 0.0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        if self.loader is not None:
            batch = self.loader.next_batch()
        else:
            tokens = torch.randint(0, 50257, (self.shape[0], self.shape[1] + 1), generator=self.generator)
            batch = tokens[:, :-1], tokens[:, 1:]
        self.seconds += time.perf_counter() - start
        return batch


class OneBatch:
    """A loader of one given batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.batch = (x, y)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch


class TimedOptimizer:
    """An optimizer whose step() is timed into `into` (milliseconds; the device synchronised around it)."""

    def __init__(self, optimizer, into: list[float], sync):
        self.optimizer, self.into, self.sync = optimizer, into, sync

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def step(self) -> None:
        self.sync()
        start = time.perf_counter()
        self.optimizer.step()
        self.sync()
        self.into.append((time.perf_counter() - start) * 1000)


class Bench:
    """One model shared by every variant of the config (so memory holds one copy), and one for the compare variant;
    each variant has its own optimizer, and its own compiled module when it compiles."""

    def __init__(self, cfg, rt: runtime.Runtime, variants: list[Variant]):
        self.cfg, self.rt = cfg, rt
        self.batches = Batches(cfg)
        self.models, self.optimizers, self.modules, self.optimizer_ms = {}, {}, {}, {}
        shared = {}  # config -> model: a memory run measures one variant's model alone
        for v in variants:
            if id(v.config) not in shared:
                runtime.seed_everything(cfg.train.seed)
                shared[id(v.config)] = GPT(v.config.model).to(rt.device)
            model = shared[id(v.config)]
            optim = dataclasses.replace(v.config.optim, name=v.optimizer)
            self.optimizer_ms[v.name] = []
            optimizer = build_optimizer(model, optim, rt.device.type, fused=v.fused_adamw, muon_dtype=v.dtype)
            self.models[v.name] = model
            self.optimizers[v.name] = TimedOptimizer(optimizer, self.optimizer_ms[v.name], self.sync)
            self.modules[v.name] = torch.compile(model) if v.compile else model

    def sync(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, v: Variant, loader=None) -> tuple[float, float]:
        """One training step (train_step, one micro-batch) as variant v, on the next batch of `loader` (default:
        the config's batches); returns (step seconds, seconds of it spent getting the batch)."""
        model = self.models[v.name]
        model.set_training_memory(v.loss_chunk, v.recompute_gelu)
        parallel.set_activation_checkpointing(model, v.activation_checkpointing)
        rt = runtime.Runtime(self.rt.device, v.dtype, v.compile)
        loader = loader or self.batches
        loading_before = getattr(loader, "seconds", 0.0)
        start = time.perf_counter()
        train_step(self.modules[v.name], self.optimizers[v.name], loader, 1, v.config.optim.lr,
                   v.config.optim.grad_clip, rt)  # ends with a host sync, so the time is real
        return time.perf_counter() - start, getattr(loader, "seconds", 0.0) - loading_before


def measured_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    size = 8192 if device.type == "cuda" else 1024
    return runtime.measure_matmul_tflops(dtype, size, 5, device)


def datasheet_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return gpu_peak_tflops(torch.cuda.get_device_name(device))  # the table train_gpt2.py's MFU uses


def run_timing(bench: Bench, variants: list[Variant], options: dict) -> dict[str, float]:
    """Warm up every variant (compiles happen here), then the interleaved rounds. Returns the best measured matmul
    peak per dtype (TFLOP/s), measured between rounds under the same load."""
    for v in variants:
        for _ in range(options["warmup"]):
            bench.step(v)
        print(f"warmed up {v.name}", flush=True)
    peaks: dict[str, float] = {}
    for round_index in range(options["rounds"]):
        for v in variants:
            for _ in range(options["steps"]):
                step_s, load_s = bench.step(v)
                v.step_ms.append(step_s * 1000)
                v.load_ms.append(load_s * 1000)
                v.optimizer_ms.append(bench.optimizer_ms[v.name][-1])
        for dtype in {v.dtype for v in variants}:
            key = str(dtype).removeprefix("torch.")
            peaks[key] = max(peaks.get(key, 0.0), measured_peak_tflops(bench.rt.device, dtype))
        print(f"round {round_index + 1}/{options['rounds']} done", flush=True)
    return peaks


def profile(bench: Bench, variants: list[Variant], top: int) -> None:
    """Where one training step's time goes, per variant (after a warm-up step)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if bench.rt.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort_key = "self_cuda_time_total" if bench.rt.device.type == "cuda" else "self_cpu_time_total"
    for v in variants:
        bench.step(v)
        with torch.profiler.profile(activities=activities) as prof:
            bench.step(v)
        print(f"\n{v.name}: {v.settings()}")
        print(prof.key_averages().table(sort_by=sort_key, row_limit=top, max_name_column_width=40))


def measure_memory(v: Variant, cfg, rt: runtime.Runtime) -> float:
    """Peak memory (bytes) of variant v's training step, in this process, which holds nothing else: a warm-up step
    on a one-token batch (cheap; the gradients and optimizer state appear), then the measured one."""
    if rt.device.type == "cpu":
        # Big blocks straight from mmap, so freed memory leaves the resident set and the peak is the live peak.
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        before = _resident_bytes("VmRSS")
    bench = Bench(cfg, rt, [v])
    one_token = torch.zeros((1, 1), dtype=torch.long)
    bench.step(v, OneBatch(one_token, one_token))
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
        bench.step(v)
        return torch.cuda.max_memory_allocated(rt.device)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident size (VmHWM) to the current one
    bench.step(v)
    return _resident_bytes("VmHWM") - before


def _resident_bytes(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def memory_in_subprocess(v: Variant, argv: list[str]) -> float | None:
    cmd = [sys.executable, __file__, *argv, f"--bench.variants={v.key}", "--bench.memory=only"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        print(f"memory of {v.name} not measured: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def summarise(variants: list[Variant], peaks: dict, memory: dict, tokens: int, datasheet: float | None,
              real_loader: bool) -> list[dict]:
    """One row per variant; speed and memory relative to the anchor (else the first variant)."""
    rows = []
    anchor = next((v for v in variants if v.name == "anchor"), variants[0])
    anchor_ms = statistics.median(anchor.step_ms)
    for v in variants:
        ms = statistics.median(v.step_ms)
        tokens_per_s = tokens / (ms / 1000)
        with torch.device("meta"):  # the count needs shapes only
            flops = flops_per_token(GPT(v.config.model), v.config.data.seq_len)
        peak = peaks[str(v.dtype).removeprefix("torch.")]
        row = {"variant": v.name, "settings": v.settings(), "ms_per_step": ms, "tokens_per_s": tokens_per_s,
               "speedup_vs_anchor": anchor_ms / ms, "mfu_measured_peak": flops * tokens_per_s / (peak * 1e12),
               "mfu_datasheet": flops * tokens_per_s / (datasheet * 1e12) if datasheet else None,
               "loader_share": statistics.median(v.load_ms) / ms if real_loader else None,
               "optimizer_ms": statistics.median(v.optimizer_ms),
               "optimizer_share": statistics.median(v.optimizer_ms) / ms,
               "peak_memory_bytes": memory.get(v.name)}
        anchor_memory = memory.get(anchor.name)
        has_memory = row["peak_memory_bytes"] is not None and anchor_memory
        row["memory_vs_anchor"] = row["peak_memory_bytes"] / anchor_memory if has_memory else None
        rows.append(row)
    return rows


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def table(rows: list[dict]) -> str:
    lines = ["| variant | settings | ms/step | tokens/s | vs anchor | MFU (measured peak) | MFU (datasheet) | "
             "peak memory | memory vs anchor | loader share | optimizer share |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        memory = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB"
        memory_ratio = "-" if r["memory_vs_anchor"] is None else f"{r['memory_vs_anchor']:.2f}x"
        lines.append(f"| {r['variant']} | {r['settings']} | {r['ms_per_step']:,.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['speedup_vs_anchor']:.2f}x | {_percent(r['mfu_measured_peak'])} | "
                     f"{_percent(r['mfu_datasheet'])} | {memory} | {memory_ratio} | {_percent(r['loader_share'])} | "
                     f"{_percent(r['optimizer_share'])} ({r['optimizer_ms']:,.1f} ms) |")
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} threads"


def main(argv: list[str]) -> None:
    options, config_argv = split_bench_args(argv)
    try:
        cfg = load_config(config_argv, prog="bench.py")
    except errors.HelpRequested as help_text:
        raise errors.HelpRequested(f"{__doc__}\n{help_text}") from None
    rt = runtime.resolve(cfg.train.device, cfg.train.dtype, cfg.train.compile,
                         compile_backend=cfg.train.compile_backend)
    compare = None
    if options["compare"]:
        # the same overrides on both (a later --config replaces the first; the overrides apply after it)
        compare = (options["compare"], load_config([*config_argv, "--config", options["compare"]], prog="bench.py"))
        shape = (compare[1].data.micro_batch_size, compare[1].data.seq_len)
        if shape != (cfg.data.micro_batch_size, cfg.data.seq_len):
            raise ConfigError(f"--bench.compare={options['compare']}: its micro-batch {shape[0]} x {shape[1]} is not "
                              f"this config's {cfg.data.micro_batch_size} x {cfg.data.seq_len}; both step on the "
                              "same batches")
    names = [n for n in options["variants"].split(",") if n]
    names = names or [n for n in ALL_VARIANTS if n != "compare" or compare]
    variants, notes = make_variants(names, cfg, rt, compare)
    if options["memory"] == "only":
        print(json.dumps({"peak_bytes": measure_memory(variants[0], cfg, rt)}))
        return

    bench = Bench(cfg, rt, variants)
    B, T = cfg.data.micro_batch_size, cfg.data.seq_len
    first = bench.models[variants[0].name]
    flops = flops_per_token(first, T)
    print(f"bench: {first.num_params() / 1e6:.1f}M parameters, micro-batch {B} x {T} | {machine(rt.device)} | "
          f"torch {torch.__version__} | data: {bench.batches.source}")
    for note in notes:
        print(note)
    if options["profile"]:
        profile(bench, variants, options["profile"])
        return
    peaks = run_timing(bench, variants, options)
    real_loader = bench.batches.loader is not None
    del bench  # its memory back before the memory runs
    memory = {}
    if options["memory"] == "true":
        memory = {v.name: memory_in_subprocess(v, argv) for v in variants}
    rows = summarise(variants, peaks, memory, B * T, datasheet_peak_tflops(rt.device), real_loader)
    print()
    print(table(rows))
    print(f"\nFLOPs/token {flops / 1e6:.1f}M (6N + 12 L C T); measured matmul peak: "
          + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in peaks.items()))
    if options["json"]:
        report = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "machine": machine(rt.device), "torch": torch.__version__, "command": "python bench.py "
                  + " ".join(argv), "micro_batch": [B, T], "flops_per_token": flops, "measured_peak_tflops": peaks,
                  "notes": notes, "rows": rows}
        atomic_write_text(options["json"], json.dumps(report, indent=2) + "\n")
        print(f"wrote {options['json']}")


def _has_train_shards(data_dir: str) -> bool:
    try:
        return bool(list_shards(data_dir, "train"))
    except ShardError:
        return False


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    errors.run(main)
