"""Train GPT-2 on pre-tokenized shards, on one device or many.

    python train_gpt2.py --config configs/demo.toml                       # one process (CPU or GPU)
    torchrun --nproc_per_node=8 train_gpt2.py --config configs/gpt2-124M.toml   # DDP on 8 GPUs
    python train_gpt2.py --help                                            # every key and its default

The loop reads top to bottom: configure, set up ranks and device, build the data, model and optimizer, restore the
newest checkpoint, then for each step the periodic jobs (validation, HellaSwag, samples), the training step, its
log line and a checkpoint when due. Each is one call into pretrain/ (the step itself is pretrain/trainer.py).
"""

from pretrain import (
    core_eval,
    distributed,
    errors,
    hellaswag_scoring,
    parallel,
    preemption,
    run_dir,
    runtime,
    summary,
    trackers,
)
from pretrain.config import Config, grad_accum_steps, load_config, to_dict
from pretrain.fileio import read_jsonl
from pretrain.health import HealthMonitor
from pretrain.metrics import MetricsLogger, Mfu, flops_per_token, peak_tflops
from pretrain.optim import build_optimizer, lr_at
from pretrain.progress import Progress
from pretrain.trainer import (
    Checkpoints,
    NonFiniteGuard,
    Samples,
    StepTimer,
    ValidationLoss,
    build_loaders,
    build_model,
    core_metric,
    describe_run,
    hellaswag_accuracy,
    prepare_data,
    run_due,
    step_record,
    train_step,
)


def main(argv: list[str]) -> None:
    cfg = load_config(argv, prog="train_gpt2.py")
    device = runtime.pick_device(cfg.train.device, distributed.local_rank())
    dist_info = distributed.setup(device)
    run = run_dir.RunDir(cfg.train.out_dir)
    try:
        train(cfg, dist_info, run)
    finally:
        run.release()
        distributed.teardown()


def train(cfg: Config, dist_info: distributed.DistInfo, run: run_dir.RunDir) -> None:
    master, device, max_steps = dist_info.is_master, dist_info.device, cfg.train.max_steps
    accum_steps = grad_accum_steps(cfg, dist_info.world_size)
    # One dtype on every rank: on some CPUs the choice comes from a local matmul timing, so rank 0 decides for all.
    rt = runtime.resolve(device, cfg.train.dtype, cfg.train.compile, agree=distributed.from_master,
                         compile_backend=cfg.train.compile_backend)
    runtime.seed_everything(cfg.train.seed)  # the same initial weights on every rank
    config_dict = to_dict(cfg)
    start = run_dir.choose_start(run, cfg.train.resume, config_dict)  # rank 0 holds the folder from here on
    if start.has_nothing_to_do(max_steps):
        if master:
            print(f"{start.path} is already at step {start.step} of train.max_steps={max_steps}: nothing to do "
                  "(raise --train.max_steps to train further)")
        return

    prepare_data(cfg, dist_info)
    train_loader, val_loader, data_lines = distributed.on_every_rank(build_loaders, cfg, dist_info)
    hellaswag_data = hellaswag_scoring.load_for_training(cfg.train, master)
    core_data = core_eval.load_for_training(cfg.train, master)

    raw_model = distributed.on_every_rank(build_model, cfg.model, device)
    raw_model.set_training_memory(cfg.train.loss_chunk, cfg.train.recompute_gelu)
    runtime.seed_everything(cfg.train.seed + dist_info.rank)  # from here on each rank draws its own dropout masks
    model = parallel.prepare(raw_model, rt, cfg.train.parallel, cfg.train.activation_checkpointing,
                             dist_info.world_size)
    optimizer = build_optimizer(raw_model, cfg.optim, device.type, muon_dtype=rt.dtype)
    flops = flops_per_token(raw_model, cfg.data.seq_len)
    peak = peak_tflops(device, rt.dtype, cfg.train.peak_tflops)  # on CPU a matmul of random numbers

    # Last before the loop: this restores the RNG states, and nothing may draw random numbers before the first step.
    start_step, tokens_seen, resume_lines = 0, 0, [f"starting at step 0 in {run}"]
    if start.path is not None:
        start_step, tokens_seen, resume_lines = run_dir.resume(start, config_dict, raw_model, optimizer, train_loader,
                                                               dist_info.rank, dist_info.world_size, device)
    if start_step == max_steps:
        resume_lines.append(f"training ended at step {max_steps}, but its final evaluation did not: evaluating now")

    run_summary = summary.RunSummary()
    if master and start.path is not None:
        run_summary.seed(read_jsonl(run.metrics) if run.metrics.is_file() else [], resumed_at=start_step)
    progress = Progress(max_steps, cfg.train.log_interval, start_step=start_step, enabled=master)
    resumed_step = start_step if start.path is not None else None
    logger = MetricsLogger(run.metrics, enabled=master, progress=progress,
                           sinks=[run_summary, *trackers.open_trackers(cfg, run, resumed_step, enabled=master)])
    if master:
        run.write_config(config_dict)
        for line in describe_run(cfg, raw_model, rt, dist_info.world_size, accum_steps, peak, flops):
            logger.write(line)
        logger.write("\n".join(data_lines + start.notes + resume_lines))

    # under FSDP every rank runs the forward passes of the samples (they gather the shards); only rank 0 prints
    samples_here = master or parallel.is_sharded(model)
    jobs = [ValidationLoss(cfg, model, val_loader, rt, logger),
            hellaswag_accuracy(cfg, model, hellaswag_data, rt, logger),
            core_metric(cfg, model, core_data, rt, logger),
            Samples(cfg, model, rt, logger, samples_here)]
    checkpoints = Checkpoints(cfg, run, model, optimizer, train_loader, config_dict, rt, logger)
    # health warnings go through the logger, above the progress bar
    health = HealthMonitor(raw_model, run.health, cfg.train.health_interval, cfg.optim.grad_clip, rt.autocast,
                           enabled=master, log=logger.write, muon=cfg.optim.name == "muon")
    nonfinite = NonFiniteGuard(cfg.train.skip_nonfinite, run, skipped=start.skipped)
    mfu = Mfu(flops, peak, dist_info.world_size, log=logger.write)
    try:
        with preemption.StopSignals() as signals:
            for step in range(start_step, max_steps):
                run_due(jobs, step, done=start.evaluated if step == start_step else ())
                lr = lr_at(step, cfg.optim, max_steps)
                with StepTimer() as timer, health.recording(step, train_loader) as probe:
                    loss, grad_norm = train_step(model, optimizer, train_loader, accum_steps, lr, cfg.optim.grad_clip,
                                                 rt, probe)
                tokens_seen += cfg.data.total_batch_tokens
                if nonfinite.should_skip(step, loss, grad_norm):
                    logger.log({"step": step, "skipped": True, "lr": lr},
                               f"step {step:6d} | loss {loss} | norm {grad_norm}: not applied, skipped "
                               f"({nonfinite.skipped} of train.skip_nonfinite={nonfinite.allowed})")
                else:
                    logger.log_step(step_record(step, lr, loss, grad_norm, timer.seconds, cfg.data.total_batch_tokens,
                                                mfu))
                steps_done = step + 1
                # every rank stops after the same step; after the last one, the final evaluation asks in its turn
                stopping = distributed.any_rank(signals.requested) and steps_done < max_steps
                if checkpoints.due(steps_done) or stopping:
                    path = checkpoints.save(steps_done, tokens_seen)
                if stopping:
                    distributed.barrier()  # every rank leaves once the file is complete
                    logger.write(f"stopped by {signals.received or 'a signal to another rank'} after {steps_done} "
                                 f"steps: saved {path}; run the same command again to resume (train.resume=auto)")
                    return
            # Training is done and its last checkpoint saved. The final evaluation (of the model after the last
            # step) stops at a signal before any of its jobs; the same command's rerun does the jobs left.
            done = start.evaluated if start_step == max_steps else ()
            if not run_due(jobs, max_steps, done, should_stop=lambda: distributed.any_rank(signals.requested)):
                logger.write(f"stopped by {signals.received or 'a signal to another rank'} during the final "
                             f"evaluation: training ended and {run.newest_checkpoint()} is saved; run the same "
                             "command again to evaluate it and write the summary")
                return
    finally:
        logger.close()
        health.close()
    if master:
        summary.report(run_summary, run.summary, run.newest_checkpoint(), tokens_seen)


if __name__ == "__main__":
    errors.run(main)
