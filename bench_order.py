"""Does the order in which tokens arrive change the model? Train the demo config three times on the same train
tokens, changing only the order, and score every model with one evaluator on the same validation tokens.

    python bench_order.py                          # all three orders, 150 steps each: ~6 min each on 2 idle cores
    python bench_order.py --orders lanes,random    # a subset
    python bench_order.py --steps 30               # a quick look

The orders:
  shards  the loader's order before issue #11: the shards one after another in a shuffled order, documents shuffled
          within each shard, and the rows of a micro-batch consecutive windows of that stream (kept here, only for
          this comparison);
  lanes   ShardLoader's order today: documents shuffled over the whole split, each row from its own lane;
  random  nanoGPT's: every row an independent random window of the concatenated shards (the reference).
Everything else is the same: model, initial weights, batch, steps, LR schedule, clipping.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from model import GPT
from pretrain import errors, runtime, shard_builder
from pretrain.config import Config, grad_accum_steps, load_config
from pretrain.loader import ShardLoader, document_starts
from pretrain.optim import build_optimizer, lr_at
from pretrain.shards import list_shards, read_shard
from pretrain.trainer import evaluate, train_step

ORDERS = ("shards", "lanes", "random")


class ShardByShardLoader:
    """The pre-#11 order for epoch 0: shards in a permuted order, each shard's documents permuted, and the B rows
    of a batch one contiguous window of that stream. Seeded as the old ShardLoader was ([seed, 0, 0] for the shard
    order, [seed, 0, 1, shard] for each shard's documents), so it yields the old loader's exact batches."""

    def __init__(self, data_dir: Path, batch_size: int, seq_len: int, seed: int):
        shards = [np.asarray(read_shard(p)) for p in list_shards(data_dir, "train")]
        pieces = []
        for shard in np.random.default_rng([seed, 0, 0]).permutation(len(shards)):
            tokens = shards[shard]
            starts = document_starts(tokens)
            ends = np.append(starts[1:], len(tokens))
            for doc in np.random.default_rng([seed, 0, 1, shard]).permutation(len(starts)):
                pieces.append(tokens[starts[doc]:ends[doc]])
        self.stream = np.concatenate(pieces).astype(np.int64)
        self.batch_size, self.seq_len, self.position = batch_size, seq_len, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.batch_size * self.seq_len
        if self.position + n + 1 > len(self.stream):
            raise ValueError("ShardByShardLoader holds one epoch; train for fewer steps")
        window = torch.from_numpy(self.stream[self.position:self.position + n + 1])
        self.position += n
        return window[:-1].view(self.batch_size, -1), window[1:].view(self.batch_size, -1)


class RandomWindowLoader:
    """nanoGPT's get_batch: each row starts at an independent uniformly random offset of the concatenated shards."""

    def __init__(self, data_dir: Path, batch_size: int, seq_len: int, seed: int):
        self.tokens = np.concatenate([read_shard(p) for p in list_shards(data_dir, "train")]).astype(np.int64)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])
        return torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])


def make_loader(order: str, cfg: Config):
    args = (Path(cfg.data.dir), cfg.data.micro_batch_size, cfg.data.seq_len)
    if order == "shards":
        return ShardByShardLoader(*args, seed=cfg.data.seed)
    if order == "random":
        return RandomWindowLoader(*args, seed=cfg.data.seed)
    return ShardLoader(args[0], "train", *args[1:], shuffle=True, seed=cfg.data.seed)


def train(cfg: Config, loader, steps: int, rt: runtime.Runtime) -> GPT:
    """train_gpt2.py's init, optimizer, schedule and training step (pretrain.trainer) on one process."""
    runtime.seed_everything(cfg.train.seed)
    model = GPT(cfg.model).to(rt.device)
    model.set_training_memory(cfg.train.loss_chunk, cfg.train.recompute_gelu)
    optimizer = build_optimizer(model, cfg.optim, rt.device.type, muon_dtype=rt.dtype)
    accum_steps = grad_accum_steps(cfg, 1)
    for step in range(steps):
        train_step(model, optimizer, loader, accum_steps, lr_at(step, cfg.optim, steps), cfg.optim.grad_clip, rt)
    return model


def validation_loss(model: GPT, cfg: Config, batches: int, rt: runtime.Runtime) -> float:
    """The evaluator every order is scored by (training's): the first `batches` batches of the val split."""
    loader = ShardLoader(cfg.data.dir, "val", cfg.data.micro_batch_size, cfg.data.seq_len, shuffle=False)
    return evaluate(model, loader, batches, rt)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.toml", help="a config with a demo corpus (default: the demo)")
    p.add_argument("--orders", default=",".join(ORDERS), help=f"comma-separated, from {', '.join(ORDERS)}")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the config's)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="float32 (default) or bfloat16: one dtype for every order")
    p.add_argument("--val-batches", type=int, default=100, help="validation batches scored (default 100)")
    args = p.parse_args(argv)
    orders = args.orders.split(",")
    unknown = sorted(set(orders) - set(ORDERS))
    if unknown:
        p.error(f"unknown order(s) {', '.join(unknown)}: choose from {', '.join(ORDERS)}")
    cfg = load_config(["--config", args.config], prog="bench_order.py")
    steps = args.steps or cfg.train.max_steps
    if cfg.data.demo:
        shard_builder.build_demo_corpus(cfg.data.dir)
    rt = runtime.resolve(cfg.train.device, args.dtype, False)
    print(f"{steps} steps of {cfg.data.total_batch_tokens} tokens per order, on {rt.describe()}; validation loss "
          f"over the first {args.val_batches} val batches")
    for order in orders:
        t0 = time.perf_counter()
        model = train(cfg, make_loader(order, cfg), steps, rt)
        loss = validation_loss(model, cfg, args.val_batches, rt)
        print(f"  {order:7s} val loss {loss:.4f}   ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    errors.run(main)
