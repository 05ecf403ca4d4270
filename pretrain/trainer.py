"""Training, one call per job: the data, the training step, evaluation, and the periodic jobs of the loop.

train_gpt2.py wires these together and runs the loop; bench.py and bench_order.py call the same train_step and
evaluate, so what they measure is what trains. A periodic job knows when it is due: every `interval` optimizer
steps and after the last one (never when the interval is 0), and runs on the model after that many steps.
"""

import math
import time

import torch

from model import GPT, GPTConfig
from pretrain import checkpoint, distributed, hellaswag_scoring, parallel, shard_builder
from pretrain.bpb import bits_per_byte
from pretrain.config import Config
from pretrain.core_eval import CoreData, evaluate_core
from pretrain.errors import UserError
from pretrain.health import UpdateProbe
from pretrain.hellaswag import HellaSwagData
from pretrain.loader import ShardLoader
from pretrain.metrics import MetricsLogger, Mfu
from pretrain.optim import set_lr
from pretrain.run_dir import RunDir
from pretrain.runtime import Runtime
from pretrain.sampling import generate_text
from pretrain.shards import ShardError
from pretrain.sources import CorpusError


class TrainingDiverged(UserError):
    """The loss or gradient norm stopped being finite more often than train.skip_nonfinite allows."""


# ---- data ------------------------------------------------------------------------------------------------------

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


def build_loaders(cfg: Config, dist_info: distributed.DistInfo) -> tuple[ShardLoader, ShardLoader | None, list[str]]:
    """This rank's training loader (shuffled as data.shuffle says), its validation loader (in file order; None when
    validation is off), and lines for the log saying what each reads."""
    if shard_builder.is_unfinished(cfg.data.dir):
        raise ShardError(f"data.dir {cfg.data.dir} holds an unfinished fineweb.py build (its progress.json, no "
                         "manifest.json): run the command that built it again to finish it (it continues after the "
                         "last complete shard), or move progress.json away to train on the shards written so far")
    shape = dict(batch_size=cfg.data.micro_batch_size, seq_len=cfg.data.seq_len, rank=dist_info.rank,
                 world_size=dist_info.world_size)
    train = ShardLoader(cfg.data.dir, "train", shuffle=cfg.data.shuffle, seed=cfg.data.seed,
                        check_dates=cfg.data.check_shard_dates, **shape)
    lines = [f"data: {train.describe()}"]
    val = None
    if cfg.train.eval_interval:
        val = ShardLoader(cfg.data.dir, "val", shuffle=False, **shape)
        if val.whole_steps == 0:
            raise ShardError(f"the val split of {cfg.data.dir} holds {val.epoch_tokens:,} tokens, fewer than one "
                             f"validation batch over all ranks needs ({val.step_tokens + 1:,}: data.micro_batch_size x "
                             "data.seq_len x world size, +1): add validation data, or set train.eval_interval=0")
        steps = min(cfg.train.val_steps, val.whole_steps)
        reads = f"an evaluation reads {steps} batches per rank ({steps * val.step_tokens:,} tokens)"
        if steps < cfg.train.val_steps:
            reads += f", all the split holds: not train.val_steps={cfg.train.val_steps}, which would read some twice"
        lines.append(f"      {val.describe()}; {reads}")
    return train, val, lines


def build_model(config: GPTConfig, device: torch.device) -> GPT:
    """The GPT of `config` on `device`, its weights drawn on the CPU (the same initial weights on any device). A model
    that does not fit says how much it needed."""
    try:
        return GPT(config).to(device)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if "allocate" not in str(e) and not isinstance(e, torch.OutOfMemoryError):
            raise
        with torch.device("meta"):
            n = GPT(config).num_params()
        first_line = str(e).strip().splitlines()[0]
        raise UserError(f"the model does not fit in memory on {device}: its {n / 1e9:.2f}B parameters need "
                        f"{4 * n / 2**30:.1f} GiB as float32 weights, about {16 * n / 2**30:.1f} GiB with their "
                        f"gradients and AdamW's two moments ({first_line}): choose a smaller model, or shard it over "
                        "GPUs with train.parallel=fsdp") from None


def describe_run(cfg: Config, model: GPT, rt: Runtime, world_size: int, accum_steps: int, peak: float | None,
                 flops: float) -> list[str]:
    """The lines a run starts with: the model, the precision and why, the batch arithmetic and the MFU basis."""
    peak_text = "unknown (set train.peak_tflops)" if peak is None else f"{peak:.4g} TFLOP/s"
    modern = [*cfg.model.modern_flags(), *(["Muon"] if cfg.optim.name == "muon" else []),
              *(["wsd schedule"] if cfg.optim.schedule == "wsd" else [])]
    recipe = f" ({', '.join(modern)})" if modern else ""
    return [f"model: {model.num_params() / 1e6:.1f}M parameters, {cfg.model.n_layer} layers, {cfg.model.n_embd} "
            f"wide{recipe} | {rt.describe()} x {world_size}",
            f"precision: {str(rt.dtype).removeprefix('torch.')} ({rt.dtype_reason})",
            f"batch: {cfg.data.total_batch_tokens} tokens/step = {cfg.data.micro_batch_size} x {cfg.data.seq_len} x "
            f"{world_size} ranks x {accum_steps} accumulation steps | MFU peak {peak_text} per device, "
            f"{flops / 1e6:.1f} MFLOP/token"]


# ---- the step and evaluation -----------------------------------------------------------------------------------

def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader, accum_steps: int, lr: float,
               grad_clip: float, rt: Runtime, health: UpdateProbe | None = None) -> tuple[float, float]:
    """One optimizer step over accum_steps micro-batches from loader.next_batch(). Returns the loss (mean over
    micro-steps and ranks) and the gradient norm before clipping; when either is not finite the optimizer step is
    not taken. On health steps `health` sees the gradients before clipping and the parameters before the update."""
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
        set_lr(optimizer, lr)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: ShardLoader, steps: int, rt: Runtime) -> float:
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


class NonFiniteGuard:
    """Stops training at a step whose loss or gradient norm is not finite (train_step has not applied it), after
    letting `allowed` such steps be skipped."""

    def __init__(self, allowed: int, run: RunDir, skipped: int = 0):
        self.allowed, self.skipped, self.run = allowed, skipped, run  # skipped: before a resume, too

    def should_skip(self, step: int, loss: float, grad_norm: float) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return False
        self.skipped += 1
        if self.skipped > self.allowed:
            newest = self.run.newest_checkpoint()
            kept = f"the newest checkpoint, {newest}, is from before it" if newest else "no checkpoint was saved"
            raise TrainingDiverged(f"the loss is {loss} and the gradient norm {grad_norm} at step {step}: training "
                                   f"diverged and this step was not applied; {kept} (lower optim.lr, check the data, "
                                   f"or allow skipping with train.skip_nonfinite; {self.allowed} allowed now)")
        return True


# ---- periodic jobs ---------------------------------------------------------------------------------------------

class PeriodicJob:
    """Runs on the model after `step` optimizer steps, every `interval` steps and after the last one. `key` is the
    metrics.jsonl key it logs (None: it logs none), by which a resumed run knows it already ran at its first step."""

    key: str | None = None

    def __init__(self, interval: int, max_steps: int):
        self.interval, self.max_steps = interval, max_steps

    def due(self, step: int) -> bool:
        return self.interval > 0 and (step % self.interval == 0 or step == self.max_steps)

    def __call__(self, step: int) -> None:
        raise NotImplementedError


def run_due(jobs: list[PeriodicJob], step: int, done: list[str] = (), should_stop=None) -> bool:
    """Run, in order, the jobs due after `step` optimizer steps, but those whose record is in `done` (logged before
    a resume). With should_stop, it is asked before each job, and a True stops there: returns False then, True when
    every due job ran."""
    for job in jobs:
        if should_stop is not None and should_stop():
            return False
        already_logged = job.key is not None and job.key in done
        if job.due(step) and not already_logged:
            job(step)
    return True


class ValidationLoss(PeriodicJob):
    """The mean loss over the first train.val_steps batches of the val split (fewer when the split holds fewer:
    a batch is never read twice), and with train.val_bpb the bits per byte of the same tokens."""

    key = "val_loss"

    def __init__(self, cfg: Config, model: torch.nn.Module, loader: ShardLoader | None, rt: Runtime,
                 logger: MetricsLogger):
        super().__init__(cfg.train.eval_interval if loader is not None else 0, cfg.train.max_steps)
        self.model, self.loader, self.rt, self.logger = model, loader, rt, logger
        self.steps = min(cfg.train.val_steps, loader.whole_steps) if loader is not None else 0
        self.with_bpb = cfg.train.val_bpb

    def __call__(self, step: int) -> None:
        record = {"step": step, "val_loss": evaluate(self.model, self.loader, self.steps, self.rt)}
        line = f"step {step:6d} | val loss {record['val_loss']:.4f}"
        if self.with_bpb:
            record["val_bpb"] = bits_per_byte(self.model, self.loader, self.steps * self.loader.step_tokens, self.rt)
            line += f" | {record['val_bpb']:.4f} bits per byte"
        self.logger.log(record, line)


class Benchmark(PeriodicJob):
    """A benchmark loaded at startup (HellaSwag, CORE), scored every `interval` steps by score(model, data, rt), each
    rank its share; the result's metrics() go to metrics.jsonl and its text to the log."""

    def __init__(self, key: str, interval: int, score, data, max_steps: int, model: torch.nn.Module, rt: Runtime,
                 logger: MetricsLogger):
        super().__init__(interval if data is not None else 0, max_steps)
        self.key, self.score, self.data, self.model, self.rt, self.logger = key, score, data, model, rt, logger

    def __call__(self, step: int) -> None:
        result = self.score(self.model, self.data, self.rt)
        self.logger.log({"step": step, **result.metrics()}, f"step {step:6d} | {result}")


def hellaswag_accuracy(cfg: Config, model: torch.nn.Module, data: HellaSwagData | None, rt: Runtime,
                       logger: MetricsLogger) -> Benchmark:
    """HellaSwag acc and acc_norm (train.hellaswag_style) on the examples loaded at startup."""
    return Benchmark("hellaswag_acc_norm", cfg.train.hellaswag_interval, hellaswag_scoring.evaluate, data,
                     cfg.train.max_steps, model, rt, logger)


def core_metric(cfg: Config, model: torch.nn.Module, data: CoreData | None, rt: Runtime,
                logger: MetricsLogger) -> Benchmark:
    """The CORE metric on the tasks loaded at startup (train.core_max_per_task items each)."""
    return Benchmark("core", cfg.train.core_interval, evaluate_core, data, cfg.train.max_steps, model, rt, logger)


class Samples(PeriodicJob):
    """Two continuations of train.sample_prompt, through the training model (compiled when training is); not at
    step 0 (an untrained model's samples are noise)."""

    def __init__(self, cfg: Config, model: torch.nn.Module, rt: Runtime, logger: MetricsLogger, runs_here: bool):
        super().__init__(cfg.train.sample_interval if runs_here else 0, cfg.train.max_steps)
        self.module, self.train, self.rt, self.logger = parallel.inference_module(model), cfg.train, rt, logger

    def due(self, step: int) -> bool:
        return step > 0 and super().due(step)

    def __call__(self, step: int) -> None:
        texts = generate_text(self.module, self.train.sample_prompt, num_samples=2,
                              max_new_tokens=self.train.sample_tokens, seed=self.train.seed, device=self.rt.device)
        for i, text in enumerate(texts):
            self.logger.write(f"--- sample {i + 1} of {len(texts)}, after {step} steps ---\n{text}")


class Checkpoints(PeriodicJob):
    """Saves the training state every train.checkpoint_interval steps, after the last step (also when the interval
    is 0) and when a run stops early; keeps the newest train.keep_checkpoints. Every rank calls save (RNG states are
    gathered, FSDP gathers the shards); rank 0 writes."""

    def __init__(self, cfg: Config, run: RunDir, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 train_loader: ShardLoader, config_dict: dict, rt: Runtime, logger: MetricsLogger):
        super().__init__(cfg.train.checkpoint_interval, cfg.train.max_steps)
        self.keep = cfg.train.keep_checkpoints
        self.run, self.model, self.optimizer, self.train_loader = run, model, optimizer, train_loader
        self.config_dict, self.rt, self.logger = config_dict, rt, logger

    def due(self, steps_done: int) -> bool:
        return steps_done == self.max_steps or super().due(steps_done)

    def save(self, steps_done: int, tokens_seen: int):
        model_state, optimizer_state = parallel.full_state_dicts(self.model, self.optimizer)
        failure = None
        try:
            path = checkpoint.save_training_state(self.run.checkpoint_path(steps_done), steps_done, tokens_seen,
                                                  model_state, optimizer_state, self.train_loader, self.config_dict,
                                                  self.rt.device)
        except UserError as e:  # a full disk, say: the other ranks must stop too, not wait for rank 0
            failure = e
        message = distributed.first_error(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if message is not None:
            raise checkpoint.CheckpointError(message)
        if distributed.is_master():
            self.run.prune_checkpoints(self.keep, newest_step=steps_done)
            self.logger.write(f"saved {path}")
        return path


def step_record(step: int, lr: float, loss: float, grad_norm: float, seconds: float, tokens: int, mfu: Mfu) -> dict:
    """A training step's metrics.jsonl record."""
    tokens_per_s = tokens / seconds
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "ms": seconds * 1000,
            "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, step)}


class StepTimer:
    """Wall time of one training step (train_step's host sync makes it real)."""

    def __enter__(self) -> "StepTimer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
