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
from pretrain import (
    checkpoint,
    distributed,
    hellaswag_scoring,
    parallel,
    preemption,
    resume,
    runtime,
    shard_builder,
    summary,
    trackers,
)
from pretrain.config import Config, ConfigError, HelpRequested, grad_accum_steps, load_config, to_dict
from pretrain.fileio import atomic_write_text
from pretrain.health import HealthMonitor, UpdateProbe
from pretrain.hellaswag import HellaSwagError
from pretrain.loader import ShardLoader
from pretrain.metrics import MetricsLogger, flops_per_token, peak_tflops
from pretrain.progress import Progress
from pretrain.sampling import generate_text
from pretrain.schedule import lr_at
from pretrain.shards import ShardError
from pretrain.sources import CorpusError


class TrainingDiverged(RuntimeError):
    pass


# Errors in what the user gave (config, data, device, checkpoint): one line on stderr and exit status 2, no traceback.
USER_ERRORS = (ConfigError, ShardError, FileNotFoundError, checkpoint.CheckpointError, TrainingDiverged,
               runtime.RuntimeChoiceError, CorpusError, HellaSwagError)


class NonFiniteGuard:
    """Stops training at a step whose loss or gradient norm is not finite (train_step has not applied it), after
    letting `allowed` such steps be skipped."""

    def __init__(self, allowed: int, out_dir: Path):
        self.allowed, self.skipped, self.out_dir = allowed, 0, out_dir

    def should_skip(self, step: int, loss: float, grad_norm: float) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return False
        self.skipped += 1
        if self.skipped > self.allowed:
            newest = checkpoint.find_latest(self.out_dir)
            kept = f"the newest checkpoint, {newest}, is from before it" if newest else "no checkpoint was saved"
            raise TrainingDiverged(f"the loss is {loss} and the gradient norm {grad_norm} at step {step}: training "
                                   f"diverged and this step was not applied; {kept} (lower optim.lr, check the data, "
                                   f"or allow skipping with train.skip_nonfinite; {self.allowed} allowed now)")
        return True


def due(step: int, interval: int, max_steps: int) -> bool:
    """Whether a periodic job (eval, sample) runs at `step`, i.e. after `step` optimizer steps: every `interval`
    steps and after the last one (step == max_steps); never when interval is 0."""
    return interval > 0 and (step % interval == 0 or step == max_steps)


def prepare_data(cfg: Config, dist_info: distributed.DistInfo) -> None:
    """Build the demo corpus on first use, so the quickstart needs no download. One process per node builds it;
    the rest wait, and stop with the builder's error at once if it fails (rather than in a collective's timeout)."""
    failure = None
    if cfg.data.demo and dist_info.local_rank == 0:
        try:
            if not shard_builder.is_complete(cfg.data.dir):
                print(f"building the demo corpus in {cfg.data.dir} (once; offline, from Python's own sources)")
                shard_builder.build_demo_corpus(cfg.data.dir)
        except Exception as e:
            failure = e
    error = distributed.first_error(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if error is not None:
        raise CorpusError(error)


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
               grad_clip: float, rt: runtime.Runtime, health: UpdateProbe | None = None) -> tuple[float, float]:
    """One optimizer step over accum_steps micro-batches. Returns the loss (mean over micro-steps and ranks) and
    the gradient norm before clipping; when either is not finite the optimizer step is not taken. On health steps
    `health` sees the gradients before clipping and the parameters before the update."""
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
    if health is not None:
        health.before_update()
    grad_norm = parallel.clip_grad_norm(model, grad_clip or float("inf"))
    # One host sync per step (it waits for the device, so the caller's timing is real), before the update: a
    # non-finite step is never applied, so the weights (and the next checkpoint) stay those of the last good step.
    loss_value, norm_value = torch.stack([loss_accum, grad_norm.to(loss_accum.dtype)]).tolist()
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


def main(argv: list[str]) -> None:
    cfg = load_config(argv, prog="train_gpt2.py")
    device = runtime.pick_device(cfg.train.device, distributed.local_rank())
    dist_info = distributed.setup(device)
    try:
        train(cfg, dist_info, device)
    finally:
        distributed.teardown()


def train(cfg: Config, dist_info: distributed.DistInfo, device: torch.device) -> None:
    master = dist_info.is_master
    accum_steps = grad_accum_steps(cfg, dist_info.world_size)
    # One dtype on every rank: on CPU the choice comes from a local matmul timing, so rank 0 decides for all.
    rt = runtime.resolve(device, cfg.train.dtype, cfg.train.compile, decide=distributed.master_decides)
    runtime.seed_everything(cfg.train.seed)  # the same initial weights on every rank
    config_dict = to_dict(cfg)
    out_dir = Path(cfg.train.out_dir)
    plan = resume.plan_resume(out_dir, cfg.train.resume, config_dict["model"])

    prepare_data(cfg, dist_info)
    B, T = cfg.data.micro_batch_size, cfg.data.seq_len
    loader_args = dict(batch_size=B, seq_len=T, rank=dist_info.rank, world_size=dist_info.world_size)
    train_loader = ShardLoader(cfg.data.dir, "train", shuffle=cfg.data.shuffle, seed=cfg.data.seed, **loader_args)
    val_loader = ShardLoader(cfg.data.dir, "val", shuffle=False, **loader_args) if cfg.train.eval_interval else None
    hellaswag_data = hellaswag_scoring.load_for_training(cfg.train, master)

    raw_model = GPT(cfg.model).to(device)
    runtime.seed_everything(cfg.train.seed + dist_info.rank)  # from here on each rank draws its own dropout masks
    model = parallel.prepare(raw_model, rt, cfg.train.parallel, cfg.train.activation_checkpointing,
                             dist_info.world_size)
    optimizer = raw_model.configure_optimizers(cfg.optim.weight_decay, cfg.optim.lr, (cfg.optim.beta1, cfg.optim.beta2),
                                               cfg.optim.eps, device.type)
    flops = flops_per_token(raw_model, T)
    peak = peak_tflops(device, rt.dtype, cfg.train.peak_tflops)  # on CPU a matmul of random numbers

    # Last before the loop: this restores the RNG states, and nothing may draw random numbers before the first step.
    start_step, tokens_seen, resume_lines = 0, 0, [f"starting fresh in {out_dir}"]
    if plan.path is not None:
        start_step, tokens_seen, resume_lines = resume.continue_from(plan, config_dict, raw_model, optimizer,
                                                                     train_loader, dist_info.rank,
                                                                     dist_info.world_size, device)
    if start_step >= cfg.train.max_steps:
        if master:
            print(f"{plan.path} is already at step {start_step} of train.max_steps={cfg.train.max_steps}: nothing "
                  "to do (raise --train.max_steps to train further)")
        return
    run_summary = summary.RunSummary(cfg.data.total_batch_tokens)
    progress = Progress(cfg.train.max_steps, cfg.train.log_interval, start_step=start_step, enabled=master)
    logger = MetricsLogger(out_dir / "metrics.jsonl", enabled=master, progress=progress,
                           sinks=[run_summary, *trackers.open_trackers(cfg, out_dir, enabled=master)])
    if master:
        atomic_write_text(out_dir / "train_config.json", json.dumps(config_dict, indent=2) + "\n")
        logger.write(f"model: {raw_model.num_params() / 1e6:.1f}M parameters, {cfg.model.n_layer} layers, "
                     f"{cfg.model.n_embd} wide | {rt.describe()} x {dist_info.world_size}")
        peak_text = "unknown (set train.peak_tflops)" if peak is None else f"{peak:.4g} TFLOP/s"
        logger.write(f"batch: {cfg.data.total_batch_tokens} tokens/step = {B} x {T} x {dist_info.world_size} ranks x "
                     f"{accum_steps} accumulation steps | MFU peak {peak_text} per device, "
                     f"{flops / 1e6:.1f} MFLOP/token")
        logger.write("\n".join(plan.notes + resume_lines))

    def periodic_jobs(step: int) -> None:
        """Validation loss and text samples of the model after `step` optimizer steps, when they are due."""
        if val_loader is not None and due(step, cfg.train.eval_interval, cfg.train.max_steps):
            val_loss = evaluate(model, val_loader, cfg.train.val_steps, rt)
            logger.log({"step": step, "val_loss": val_loss}, f"step {step:6d} | val loss {val_loss:.4f}")
        if hellaswag_data is not None and due(step, cfg.train.hellaswag_interval, cfg.train.max_steps):
            hellaswag = hellaswag_scoring.evaluate(model, hellaswag_data, rt)
            logger.log({"step": step, **hellaswag.metrics()}, f"step {step:6d} | {hellaswag}")
        # under FSDP every rank runs the forward passes (they gather the shards); only rank 0 prints
        samples_here = master or parallel.is_sharded(model)
        if samples_here and step > 0 and due(step, cfg.train.sample_interval, cfg.train.max_steps):
            texts = generate_text(raw_model, cfg.train.sample_prompt, num_samples=2,
                                  max_new_tokens=cfg.train.sample_tokens, seed=cfg.train.seed, device=device)
            for i, text in enumerate(texts):
                logger.write(f"--- sample {i + 1} of {len(texts)}, after {step} steps ---\n{text}")

    def log_step(step: int, lr: float, loss: float, grad_norm: float, dt: float, skipped: bool) -> None:
        if skipped:
            logger.log({"step": step, "skipped": True, "lr": lr},
                       f"step {step:6d} | loss {loss} | norm {grad_norm}: not applied, skipped "
                       f"({nonfinite.skipped} of train.skip_nonfinite={nonfinite.allowed})")
            return
        tokens_per_s = cfg.data.total_batch_tokens / dt
        mfu = flops * tokens_per_s / dist_info.world_size / (peak * 1e12) if peak else None
        logger.log_step({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "ms": dt * 1000,
                         "tokens_per_s": tokens_per_s, "mfu": mfu})

    def checkpoint_or_stop(steps_done: int, tokens_seen: int, stopping: bool, signal_name: str | None) -> bool:
        """Save when due or when stopping (every rank calls it: RNG states are gathered). True: stop now."""
        interval = cfg.train.checkpoint_interval
        stopping = stopping and steps_done < cfg.train.max_steps  # a signal in the last step: finish the run instead
        is_checkpoint_step = steps_done == cfg.train.max_steps or (interval and steps_done % interval == 0)
        if not (is_checkpoint_step or stopping):
            return False
        model_state, optimizer_state = parallel.full_state_dicts(model, optimizer)  # all ranks: FSDP gathers
        path = checkpoint.save_training_state(out_dir, steps_done, tokens_seen, model_state, optimizer_state,
                                              train_loader, config_dict, device)
        if master:
            checkpoint.prune_checkpoints(out_dir, cfg.train.keep_checkpoints, newest_step=steps_done)
            logger.write(f"saved {path}")
        if stopping:
            distributed.barrier()  # every rank leaves once the file is complete
            if master:
                logger.write(f"stopped by {signal_name or 'a signal to another rank'} after {steps_done} steps: "
                             f"saved {path}; run the same command again to resume (train.resume=auto)")
        return stopping

    health = HealthMonitor(raw_model, out_dir / "health.jsonl", cfg.train.health_interval, cfg.optim.grad_clip,
                           rt.autocast, enabled=master, log=logger.write)  # warnings above the progress bar
    nonfinite = NonFiniteGuard(cfg.train.skip_nonfinite, out_dir)
    try:
        with preemption.StopSignals() as signals:
            for step in range(start_step, cfg.train.max_steps):
                periodic_jobs(step)
                t0 = time.perf_counter()
                lr = lr_at(step, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, cfg.train.max_steps)
                with health.recording(step, train_loader) as probe:
                    loss, grad_norm = train_step(model, optimizer, train_loader, accum_steps, lr, cfg.optim.grad_clip,
                                                 rt, probe)
                dt = time.perf_counter() - t0
                tokens_seen += cfg.data.total_batch_tokens
                log_step(step, lr, loss, grad_norm, dt, skipped=nonfinite.should_skip(step, loss, grad_norm))
                stopping = distributed.any_rank(signals.requested)  # every rank stops after the same step
                if checkpoint_or_stop(step + 1, tokens_seen, stopping, signals.received):
                    return
        periodic_jobs(cfg.train.max_steps)  # the final model, after the last optimizer step
    finally:
        logger.close()
    if master:
        summary.report(run_summary, out_dir, checkpoint.find_latest(out_dir), tokens_seen)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except HelpRequested as help:
        print(help)
    except KeyboardInterrupt:
        print("interrupted: exiting without saving", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
