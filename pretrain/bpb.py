"""Bits per byte on the validation shards: the loss in a unit that does not depend on the tokenizer.

bpb = (summed cross-entropy in nats) / ln 2 / (UTF-8 bytes of the target tokens), over the first `tokens` targets
of the val split read in file order (as the unshuffled ShardLoader reads it), in rows of seq_len tokens that each
start a fresh context. As in nanochat (nanochat/loss_eval.py), a target of zero bytes, <|endoftext|>, counts
neither its bytes nor its loss: a document boundary is not text. Rows are split over ranks and the sums all-reduced,
so every rank gets the figure of one process, whatever the world size and batch size.
"""

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain import distributed, parallel, tokenizer
from pretrain.errors import UserError
from pretrain.runtime import Runtime
from pretrain.shards import ShardError, list_shards, read_shard

HEAD_CHUNK = 1024  # positions whose 50k-wide logits exist at once


@functools.lru_cache(maxsize=None)
def token_byte_lengths() -> torch.Tensor:
    """(N_VOCAB,) int64: the UTF-8 bytes each token stands for; 0 for <|endoftext|>."""
    enc = tokenizer.get_encoding()
    lengths = [len(enc.decode_single_token_bytes(i)) for i in range(tokenizer.N_VOCAB)]
    lengths[tokenizer.EOT_ID] = 0
    return torch.tensor(lengths, dtype=torch.int64)


@dataclass(frozen=True)
class BitsPerByte:
    bpb: float
    tokens: int  # targets read
    counted_tokens: int  # those with bytes (not <|endoftext|>)
    bytes: int
    nats: float

    @property
    def loss(self) -> float:
        """Mean cross-entropy per counted token, in nats."""
        return self.nats / self.counted_tokens

    def __str__(self) -> str:
        return (f"bpb {self.bpb:.4f} ({self.tokens:,} val tokens, {self.bytes:,} bytes; loss {self.loss:.4f} "
                "on the tokens with bytes)")


def first_tokens(shards: list[np.ndarray], count: int, where: str) -> np.ndarray:
    """The first `count` tokens of the split's stream (the shards in file order), checked to be GPT-2 ids."""
    pieces, have = [], 0
    for shard in shards:
        if have >= count:
            break
        pieces.append(np.asarray(shard[:count - have], dtype=np.int64))
        have += len(pieces[-1])
    if have < count:
        raise ShardError(f"the {where} holds {have:,} tokens; bits per byte over {count - 1:,} targets needs {count:,}")
    stream = np.concatenate(pieces)
    if stream.max() >= tokenizer.N_VOCAB:
        at = int(np.argmax(stream >= tokenizer.N_VOCAB))
        raise ShardError(f"the {where}: token {at} is id {stream[at]}, not a GPT-2 token "
                         f"(ids are 0..{tokenizer.N_VOCAB - 1})")
    return stream


def val_shards(val) -> tuple[list[np.ndarray], str, int | None, int | None]:
    """The val split's memmapped shards from a data directory or a ShardLoader (its shards; its position is left
    alone), where they are for messages, and the loader's batch_size and seq_len (None for a directory)."""
    if isinstance(val, (str, Path)):
        paths = list_shards(val, "val")
        return [read_shard(p) for p in paths], f"val split of {val}", None, None
    return val.shards, f"{val.split} split of {val.paths[0].parent}", val.batch_size, val.seq_len


@torch.no_grad()
def measure(model: torch.nn.Module, val, tokens: int, rt: Runtime, batch_size: int | None = None,
            seq_len: int | None = None) -> BitsPerByte:
    """Bits per byte over the first `tokens` targets of val (a data directory or a val ShardLoader). seq_len
    defaults to the loader's, else the model's block_size; batch_size (rows per forward) to the loader's, else 8.
    Every rank must call it under torch.distributed. model may be wrapped in DDP or torch.compile."""
    raw, body = parallel.scoring_body(model, rt)
    shards, where, loader_batch, loader_seq = val_shards(val)
    T = seq_len or loader_seq or raw.config.block_size
    B = batch_size or loader_batch or 8
    if tokens < 1:
        raise UserError(f"bits per byte needs at least one token, got {tokens}")
    if T > raw.config.block_size:
        raise UserError(f"bits per byte in rows of {T} tokens: longer than the model's block_size "
                        f"{raw.config.block_size}")
    stream = torch.from_numpy(first_tokens(shards, tokens + 1, where))  # +1: the last target
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # Row g reads tokens g*T .. g*T+T-1 and predicts the next of each; only the very last row can be shorter.
    rows = [(g * T, min(T, tokens - g * T)) for g in range(rank, -(-tokens // T), world_size)]
    full = [start for start, n in rows if n == T]
    batches = [(full[lo:lo + B], T) for lo in range(0, len(full), B)] + [([s], n) for s, n in rows if n < T]
    head = functools.partial(raw.logits, n_vocab=min(tokenizer.N_VOCAB, raw.config.vocab_size))
    byte_lengths = token_byte_lengths().to(rt.device)
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # nats, bytes, counted tokens
    was_training = raw.training
    raw.eval()
    try:
        for starts, n in batches:
            windows = torch.stack([stream[s:s + n + 1] for s in starts]).to(rt.device)
            sums += row_sums(body, head, windows[:, :-1], windows[:, 1:], byte_lengths, rt)
    finally:
        raw.train(was_training)
    nats, n_bytes, counted = distributed.all_reduce_sum(sums).tolist()
    if n_bytes == 0:
        raise ShardError(f"the first {tokens} tokens of the {where} are all <|endoftext|>: no bytes to count")
    return BitsPerByte(nats / math.log(2) / n_bytes, tokens, int(counted), int(n_bytes), nats)


def row_sums(body, head, x: torch.Tensor, y: torch.Tensor, byte_lengths: torch.Tensor,
             rt: Runtime) -> torch.Tensor:
    """(nats, bytes, counted targets) of rows x -> y, the targets without bytes left out."""
    with rt.autocast():
        hidden = body(x).flatten(0, 1)
    y = y.flatten()
    nats = torch.zeros((), dtype=torch.float64, device=x.device)
    for lo in range(0, len(y), HEAD_CHUNK):  # never all (tokens x 50k) logits at once
        with rt.autocast():
            logits = head(hidden[lo:lo + HEAD_CHUNK])
        losses = F.cross_entropy(logits.float(), y[lo:lo + HEAD_CHUNK], reduction="none")
        nats += (losses * (byte_lengths[y[lo:lo + HEAD_CHUNK]] > 0)).sum(dtype=torch.float64)
    n_bytes = byte_lengths[y]
    return torch.stack([nats, n_bytes.sum().double(), (n_bytes > 0).sum().double()])


def bits_per_byte(model: torch.nn.Module, val, tokens: int, rt: Runtime, batch_size: int | None = None) -> float:
    """measure(...).bpb: the figure training logs."""
    return measure(model, val, tokens, rt, batch_size).bpb
