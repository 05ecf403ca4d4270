"""Train GPT-2 on pre-tokenized shards, on one device or many.

    python train_gpt2.py --config configs/demo.toml                       # one process (CPU or GPU)
    torchrun --nproc_per_node=8 train_gpt2.py --config configs/gpt2-124M.toml   # DDP on 8 GPUs
    python train_gpt2.py --help                                            # every key and its default
"""

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import distributed
import tokenizer
from config import Config, ConfigError, grad_accum_steps, load_config, to_dict
from data import ShardError, ShardLoader
from fileio import atomic_write_text
from metrics import MetricsLogger, flops_per_token, measure_cpu_matmul_tflops, peak_tflops
from model import GPT
from schedule import lr_at


class TrainingDiverged(RuntimeError):
    pass


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA GPUs that have it, and on CPUs where a quick matmul shows it is faster than float32
    (CPUs without bf16 instructions run it ~100x slower); float32 elsewhere."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        bf16_faster = measure_cpu_matmul_tflops(torch.bfloat16, 256, 2) > measure_cpu_matmul_tflops(torch.float32, 256, 2)
        return torch.bfloat16 if distributed.master_decides(bf16_faster) else torch.float32  # one dtype on all ranks
    return torch.float32


def resolve_compile(setting: str, device: torch.device) -> bool:
    return device.type == "cuda" if setting == "auto" else setting == "true"


def prepare_data(cfg: Config, dist_info: distributed.DistInfo) -> None:
    """Build the demo corpus on first use, so the quickstart needs no download. One process per node builds it;
    the rest wait."""
    if cfg.data.demo and dist_info.local_rank == 0:
        import corpus
        if not corpus.is_complete(cfg.data.dir):
            print(f"building the demo corpus in {cfg.data.dir} (once; offline, from Python's own sources)")
            corpus.build_demo_corpus(cfg.data.dir)
    distributed.barrier()


@torch.no_grad()
def evaluate(model, loader: ShardLoader, steps: int, device: torch.device, autocast) -> float:
    """Mean loss over the same `steps` validation batches every time, averaged over ranks."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = loader.next_batch()
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        total += loss.detach()
    model.train()
    return distributed.all_reduce_mean(total / steps).item()


def train_step(model, optimizer: torch.optim.Optimizer, loader: ShardLoader, accum_steps: int, lr: float,
               grad_clip: float, device: torch.device, autocast) -> tuple[float, float]:
    """One optimizer step over accum_steps micro-batches. Returns the loss (mean over micro-steps and ranks) and
    the gradient norm before clipping."""
    ddp = isinstance(model, DDP)
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(accum_steps):
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # DDP all-reduces gradients only on the last micro-step; earlier ones just accumulate locally.
        sync = micro_step == accum_steps - 1 or not ddp
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
            _, loss = model(x, y)
        loss = loss / accum_steps  # the gradient of the mean over the whole step, not the sum
        loss_accum += loss.detach()
        loss.backward()
    distributed.all_reduce_mean(loss_accum)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_accum.item(), grad_norm.item()  # .item() waits for the device, so the caller's timing is real


def sample(model: GPT, cfg: Config, device: torch.device, num_samples: int = 2) -> list[str]:
    model.eval()
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    prompt = torch.tensor([tokenizer.encode(cfg.train.sample_prompt)] * num_samples, device=device)
    out = model.generate(prompt, cfg.train.sample_tokens, temperature=1.0, top_k=50, n_vocab=tokenizer.N_VOCAB,
                         generator=generator)
    model.train()
    return [tokenizer.decode(row.tolist()) for row in out]


def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    dist_info = distributed.setup(cfg.train.device)
    device, master = dist_info.device, dist_info.is_master
    accum_steps = grad_accum_steps(cfg, dist_info.world_size)
    dtype = resolve_dtype(cfg.train.dtype, device)
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer

    prepare_data(cfg, dist_info)
    B, T = cfg.data.micro_batch_size, cfg.data.seq_len
    loader_args = dict(batch_size=B, seq_len=T, rank=dist_info.rank, world_size=dist_info.world_size)
    train_loader = ShardLoader(cfg.data.dir, "train", shuffle=cfg.data.shuffle, seed=cfg.data.seed, **loader_args)
    val_loader = ShardLoader(cfg.data.dir, "val", shuffle=False, **loader_args) if cfg.train.eval_interval else None

    raw_model = GPT(cfg.model).to(device)
    optimizer = raw_model.configure_optimizers(cfg.optim.weight_decay, cfg.optim.lr, (cfg.optim.beta1, cfg.optim.beta2),
                                               cfg.optim.eps, device.type)
    compiled = resolve_compile(cfg.train.compile, device)
    model = torch.compile(raw_model) if compiled else raw_model
    if dist_info.enabled:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    out_dir = Path(cfg.train.out_dir)
    logger = MetricsLogger(out_dir / "metrics.jsonl", enabled=master)
    flops = flops_per_token(raw_model, T)
    peak = peak_tflops(device, dtype, cfg.train.peak_tflops)
    if master:
        atomic_write_text(out_dir / "train_config.json", json.dumps(to_dict(cfg), indent=2) + "\n")
        print(f"model: {raw_model.num_params() / 1e6:.1f}M parameters, {cfg.model.n_layer} layers, "
              f"{cfg.model.n_embd} wide | device {device} x {dist_info.world_size}, {str(dtype)[6:]}, "
              f"compile {compiled}")
        print(f"batch: {cfg.data.total_batch_tokens} tokens/step = {B} x {T} x {dist_info.world_size} ranks x "
              f"{accum_steps} accumulation steps | MFU peak {'unknown' if peak is None else f'{peak:.3g} TFLOP/s'}"
              f" per device, {flops / 1e6:.1f} MFLOP/token")

    for step in range(cfg.train.max_steps):
        last_step = step == cfg.train.max_steps - 1
        if val_loader is not None and (step % cfg.train.eval_interval == 0 or last_step):
            val_loss = evaluate(model, val_loader, cfg.train.val_steps, device, autocast)
            logger.log({"step": step, "val_loss": val_loss}, f"step {step:6d} | val loss {val_loss:.4f}")
        if master and cfg.train.sample_interval and step > 0 and (step % cfg.train.sample_interval == 0 or last_step):
            for text in sample(raw_model, cfg, device):
                print(f"sample: {text!r}")

        t0 = time.perf_counter()
        lr = lr_at(step, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, cfg.train.max_steps)
        loss_value, grad_norm = train_step(model, optimizer, train_loader, accum_steps, lr, cfg.optim.grad_clip,
                                           device, autocast)
        dt = time.perf_counter() - t0
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"the loss is {loss_value} at step {step}: training diverged (lower optim.lr, "
                                   "or check the data)")

        if step % cfg.train.log_interval == 0 or last_step:
            tokens_per_s = cfg.data.total_batch_tokens / dt
            mfu = flops * tokens_per_s / dist_info.world_size / (peak * 1e12) if peak else None
            record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                      "ms": dt * 1000, "tokens_per_s": tokens_per_s, "mfu": mfu}
            logger.log(record, f"step {step:6d} | loss {loss_value:.4f} | lr {lr:.3e} | norm {grad_norm:.3f}"
                               f" | {dt * 1000:.0f} ms | {tokens_per_s:,.0f} tok/s"
                               + (f" | MFU {mfu * 100:.1f}%" if mfu is not None else ""))

        if master and (last_step or (cfg.train.checkpoint_interval and (step + 1) % cfg.train.checkpoint_interval == 0)):
            state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                     "config": to_dict(cfg), "train_loader": train_loader.state_dict(),
                     "world_size": dist_info.world_size}
            path = checkpoint.save_checkpoint(checkpoint.checkpoint_path(out_dir, step + 1), state)
            checkpoint.prune_checkpoints(out_dir, cfg.train.keep_checkpoints)
            print(f"saved {path}")

    logger.close()
    distributed.teardown()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, ShardError, FileNotFoundError, checkpoint.CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
