"""Train GPT-2 on pre-tokenized shards, on one device or many.

    python train_gpt2.py --config configs/demo.toml                       # one process (CPU or GPU)
    torchrun --nproc_per_node=8 train_gpt2.py --config configs/gpt2-124M.toml   # DDP on 8 GPUs
    python train_gpt2.py --help                                            # every key and its default
"""

import json
import math
import sys
import time
from pathlib import Path

import torch

from model import GPT
from pretrain import checkpoint, distributed, parallel, runtime, shard_builder
from pretrain.config import Config, ConfigError, HelpRequested, grad_accum_steps, load_config, to_dict
from pretrain.fileio import atomic_write_text
from pretrain.loader import ShardLoader
from pretrain.metrics import MetricsLogger, flops_per_token, peak_tflops
from pretrain.sampling import generate_text
from pretrain.schedule import lr_at
from pretrain.shards import ShardError


class TrainingDiverged(RuntimeError):
    pass


def due(step: int, interval: int, last_step: bool) -> bool:
    """Whether a periodic job (eval, sample, ...) runs at this step: every `interval` steps and at the last one;
    never when interval is 0."""
    return interval > 0 and (step % interval == 0 or last_step)


def prepare_data(cfg: Config, dist_info: distributed.DistInfo) -> None:
    """Build the demo corpus on first use, so the quickstart needs no download. One process per node builds it;
    the rest wait."""
    if cfg.data.demo and dist_info.local_rank == 0:
        if not shard_builder.is_complete(cfg.data.dir):
            print(f"building the demo corpus in {cfg.data.dir} (once; offline, from Python's own sources)")
            shard_builder.build_demo_corpus(cfg.data.dir)
    distributed.barrier()


@torch.no_grad()
def evaluate(model, loader: ShardLoader, steps: int, rt: runtime.Runtime) -> float:
    """Mean loss over the same `steps` validation batches every time, averaged over ranks."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=rt.device)
    for _ in range(steps):
        x, y = rt.to_device(*loader.next_batch())
        with rt.autocast():
            _, loss = model(x, y)
        total += loss.detach()
    model.train()
    return distributed.all_reduce_mean(total / steps).item()


def train_step(model, optimizer: torch.optim.Optimizer, loader: ShardLoader, accum_steps: int, lr: float,
               grad_clip: float, rt: runtime.Runtime) -> tuple[float, float]:
    """One optimizer step over accum_steps micro-batches. Returns the loss (mean over micro-steps and ranks) and
    the gradient norm before clipping."""
    loss_accum = torch.zeros((), device=rt.device)
    for micro_step in range(accum_steps):
        x, y = rt.to_device(*loader.next_batch())
        # Gradients are all-reduced (DDP) or reduce-scattered (FSDP) only on the last micro-step.
        with parallel.gradient_sync(model, micro_step == accum_steps - 1), rt.autocast():
            _, loss = model(x, y)
        loss = loss / accum_steps  # the gradient of the mean over the whole step, not the sum
        loss_accum += loss.detach()
        loss.backward()
    distributed.all_reduce_mean(loss_accum)
    grad_norm = parallel.clip_grad_norm(model, grad_clip or float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # One host sync per step (it waits for the device, so the caller's timing is real)
    loss_value, grad_norm_value = torch.stack([loss_accum, grad_norm.to(loss_accum.dtype)]).tolist()
    return loss_value, grad_norm_value


def main(argv: list[str]) -> None:
    cfg = load_config(argv, prog="train_gpt2.py")
    device = runtime.pick_device(cfg.train.device, distributed.local_rank())
    dist_info = distributed.setup(device)
    master = dist_info.is_master
    accum_steps = grad_accum_steps(cfg, dist_info.world_size)
    # One dtype on every rank: on CPU the choice comes from a local matmul timing, so rank 0 decides for all.
    rt = runtime.resolve(device, cfg.train.dtype, cfg.train.compile, decide=distributed.master_decides)
    runtime.seed_everything(cfg.train.seed)  # the same initial weights on every rank

    prepare_data(cfg, dist_info)
    B, T = cfg.data.micro_batch_size, cfg.data.seq_len
    loader_args = dict(batch_size=B, seq_len=T, rank=dist_info.rank, world_size=dist_info.world_size)
    train_loader = ShardLoader(cfg.data.dir, "train", shuffle=cfg.data.shuffle, seed=cfg.data.seed, **loader_args)
    val_loader = ShardLoader(cfg.data.dir, "val", shuffle=False, **loader_args) if cfg.train.eval_interval else None

    raw_model = GPT(cfg.model).to(device)
    model = parallel.prepare(raw_model, rt, cfg.train.parallel, cfg.train.activation_checkpointing,
                             dist_info.world_size)
    optimizer = raw_model.configure_optimizers(cfg.optim.weight_decay, cfg.optim.lr, (cfg.optim.beta1, cfg.optim.beta2),
                                               cfg.optim.eps, device.type)

    out_dir = Path(cfg.train.out_dir)
    logger = MetricsLogger(out_dir / "metrics.jsonl", enabled=master)
    flops = flops_per_token(raw_model, T)
    peak = peak_tflops(device, rt.dtype, cfg.train.peak_tflops)
    if master:
        atomic_write_text(out_dir / "train_config.json", json.dumps(to_dict(cfg), indent=2) + "\n")
        print(f"model: {raw_model.num_params() / 1e6:.1f}M parameters, {cfg.model.n_layer} layers, "
              f"{cfg.model.n_embd} wide | {rt.describe()} x {dist_info.world_size}")
        peak_text = "unknown" if peak is None else f"{peak:.3g} TFLOP/s"
        print(f"batch: {cfg.data.total_batch_tokens} tokens/step = {B} x {T} x {dist_info.world_size} ranks x "
              f"{accum_steps} accumulation steps | MFU peak {peak_text} per device, {flops / 1e6:.1f} MFLOP/token")

    for step in range(cfg.train.max_steps):
        last_step = step == cfg.train.max_steps - 1
        if val_loader is not None and due(step, cfg.train.eval_interval, last_step):
            val_loss = evaluate(model, val_loader, cfg.train.val_steps, rt)
            logger.log({"step": step, "val_loss": val_loss}, f"step {step:6d} | val loss {val_loss:.4f}")
        # under FSDP every rank runs the forward passes (they gather the shards); only rank 0 prints
        samples_here = master or parallel.is_sharded(model)
        if samples_here and step > 0 and due(step, cfg.train.sample_interval, last_step):
            texts = generate_text(raw_model, cfg.train.sample_prompt, num_samples=2,
                                  max_new_tokens=cfg.train.sample_tokens, seed=cfg.train.seed, device=device)
            if master:
                print("\n".join(f"sample: {text!r}" for text in texts))

        t0 = time.perf_counter()
        lr = lr_at(step, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, cfg.train.max_steps)
        loss_value, grad_norm = train_step(model, optimizer, train_loader, accum_steps, lr, cfg.optim.grad_clip, rt)
        dt = time.perf_counter() - t0
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"the loss is {loss_value} at step {step}: training diverged (lower optim.lr, "
                                   "or check the data)")

        if due(step, cfg.train.log_interval, last_step):
            tokens_per_s = cfg.data.total_batch_tokens / dt
            mfu = flops * tokens_per_s / dist_info.world_size / (peak * 1e12) if peak else None
            record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                      "ms": dt * 1000, "tokens_per_s": tokens_per_s, "mfu": mfu}
            logger.log(record, f"step {step:6d} | loss {loss_value:.4f} | lr {lr:.3e} | norm {grad_norm:.3f}"
                               f" | {dt * 1000:.0f} ms | {tokens_per_s:,.0f} tok/s"
                               + (f" | MFU {mfu * 100:.1f}%" if mfu is not None else ""))

        interval = cfg.train.checkpoint_interval
        is_checkpoint_step = last_step or (interval and (step + 1) % interval == 0)
        if is_checkpoint_step:
            model_state, optimizer_state = parallel.full_state_dicts(model, optimizer)  # all ranks: FSDP gathers
        if master and is_checkpoint_step:
            path = checkpoint.save_training_state(out_dir, step + 1, model_state, optimizer_state, train_loader,
                                                  to_dict(cfg), dist_info.world_size)
            checkpoint.prune_checkpoints(out_dir, cfg.train.keep_checkpoints)
            print(f"saved {path}")

    logger.close()
    distributed.teardown()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except HelpRequested as help:
        print(help)
    except (ConfigError, ShardError, FileNotFoundError, checkpoint.CheckpointError, TrainingDiverged,
            runtime.RuntimeChoiceError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
