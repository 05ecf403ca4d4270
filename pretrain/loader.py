"""The training loader: batches (x, y) from the shards of one split, shuffled, disjoint across ranks, resumable.

All shards of a split form ONE global token stream per epoch: the shards one after another, each shard's documents
one after another, then the next epoch. A global step consumes world_size*B*T tokens and rank r reads the window
[pos + r*B*T, pos + (r+1)*B*T + 1) of it (the +1 is the last target). The loader's state is just pos, so it is the
same on every rank and survives a change of world_size.
"""

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pretrain.shards import list_shards, read_shard
from pretrain.tokenizer import EOT_ID

SCAN_CHUNK = 1 << 20  # tokens examined at once when looking for document starts (a 1 MB mask)


def document_starts(tokens: np.ndarray, eot_id: int = EOT_ID) -> np.ndarray:
    """Offsets where documents start: every EOT token, plus 0 (tokens before the first EOT are a document too)."""
    found = [np.flatnonzero(tokens[lo:lo + SCAN_CHUNK] == eot_id) + lo  # in chunks: never a whole-shard mask
             for lo in range(0, len(tokens), SCAN_CHUNK)]
    starts = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    return starts if not len(tokens) or (len(starts) and starts[0] == 0) else np.concatenate([[0], starts])


@dataclass(frozen=True)
class _Layout:
    """Where one shard's documents sit in one epoch's stream: stream offset starts[k] holds file offset src[k]."""
    starts: np.ndarray  # (D+1,) cumulative lengths of the documents in stream order, starting at 0
    src: np.ndarray  # (D,) file offset of the k-th document in stream order


class ShardLoader:
    """Batches (x, y) of shape (B, T) from the shards of one split, disjoint across ranks, resumable exactly."""

    layouts_kept = 4  # per-shard document layouts cached; one batch touches at most a few shards

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool | None = None, seed: int = 0):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.paths = list_shards(data_dir, split)
        # read_shard checks every header now, so a bad shard fails at start; the memmaps cost no RAM until read
        self.shards = [read_shard(p) for p in self.paths]
        self.lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.epoch_tokens = int(self.lengths.sum())
        need = batch_size * seq_len + 1
        if self.epoch_tokens < need:
            raise ValueError(f"{split} data in {data_dir} has {self.epoch_tokens} tokens, fewer than one batch needs "
                             f"(batch_size*seq_len+1 = {need})")
        self.position = 0  # global stream offset of the next step, counted from the start of epoch 0
        self._order: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, shard order, shard starts)
        self._doc_starts: dict[int, np.ndarray] = {}  # per shard; kept for the few shards in _layouts
        self._layouts: OrderedDict[tuple[int, int], _Layout] = OrderedDict()

    @property
    def epoch(self) -> int:
        return self.position // self.epoch_tokens

    def reset(self) -> None:
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        window = self._read(self.position + self.rank * B * T, B * T + 1)
        self.position += self.world_size * B * T
        buf = torch.from_numpy(window)
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    # -- state ---------------------------------------------------------------------------------------------------

    def _identity(self) -> dict:
        """What must match for a saved position to mean the same tokens."""
        return {"split": self.split, "shuffle": self.shuffle, "seed": self.seed,
                "shards": [[p.name, int(n)] for p, n in zip(self.paths, self.lengths)]}

    def state_dict(self) -> dict:
        # batch_size, seq_len and world_size are informational: the position is in tokens, so they may change
        return {"position": self.position, "epoch": self.epoch, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "world_size": self.world_size, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity()
        for key, value in mine.items():
            if key not in state:
                raise ValueError(f"loader state has no {key!r}; it was not saved by ShardLoader.state_dict")
            if state[key] != value:
                what = "the shards (names, token counts)" if key == "shards" else key
                raise ValueError(f"{self.split} loader state does not match: {what} changed from {state[key]!r} "
                                 f"to {value!r}; the saved position would point at different tokens")
        position = state.get("position")
        if not isinstance(position, int) or position < 0:
            raise ValueError(f"loader state has an invalid position {position!r}")
        self.position = position

    # -- the stream ----------------------------------------------------------------------------------------------

    def _read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the global stream as int64, crossing shards and epochs as needed."""
        pieces = []
        while length > 0:
            epoch, offset = divmod(start, self.epoch_tokens)
            order, shard_starts = self._shard_order(epoch)
            slot = int(np.searchsorted(shard_starts, offset, side="right")) - 1  # empty shards are skipped
            local = offset - int(shard_starts[slot])
            n = min(length, int(shard_starts[slot + 1]) - offset)
            pieces.append(self._read_shard(epoch, int(order[slot]), local, local + n))
            start, length = start + n, length - n
        return np.concatenate(pieces, dtype=np.int64)

    def _shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._order is None or self._order[0] != epoch:
            n = len(self.shards)
            order = self._rng(epoch).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, order, np.concatenate([[0], np.cumsum(self.lengths[order])]))
        return self._order[1], self._order[2]

    def _rng(self, epoch: int, shard: int | None = None) -> np.random.Generator:
        # distinct entropy for the shard order ([seed, epoch, 0]) and each shard's documents ([seed, epoch, 1, i])
        return np.random.default_rng([self.seed, epoch, 0] if shard is None else [self.seed, epoch, 1, shard])

    def _read_shard(self, epoch: int, shard: int, lo: int, hi: int) -> np.ndarray:
        """Stream offsets [lo, hi) within one shard's part of the epoch, gathered from the memmap."""
        tokens = self.shards[shard]
        if not self.shuffle:
            return tokens[lo:hi]  # the stream is the file
        layout = self._layout(epoch, shard)
        first = int(np.searchsorted(layout.starts, lo, side="right")) - 1
        last = int(np.searchsorted(layout.starts, hi - 1, side="right"))  # one past the last document touched
        seg_lo = np.maximum(layout.starts[first:last], lo)
        seg_hi = np.minimum(layout.starts[first + 1:last + 1], hi)
        shift = layout.src[first:last] - layout.starts[first:last]  # file offset minus stream offset, per document
        return tokens[np.arange(lo, hi) + np.repeat(shift, seg_hi - seg_lo)]

    def _layout(self, epoch: int, shard: int) -> _Layout:
        key = (epoch, shard)
        if key not in self._layouts:
            if shard not in self._doc_starts:
                self._doc_starts[shard] = document_starts(self.shards[shard])
            doc_starts = self._doc_starts[shard]
            doc_lens = np.diff(doc_starts, append=self.lengths[shard])
            perm = self._rng(epoch, shard).permutation(len(doc_starts))
            self._layouts[key] = _Layout(np.concatenate([[0], np.cumsum(doc_lens[perm])]), doc_starts[perm])
            while len(self._layouts) > self.layouts_kept:  # drop the oldest, and its scan if no other epoch uses it
                (_, old), _ = self._layouts.popitem(last=False)
                if all(s != old for _, s in self._layouts):
                    self._doc_starts.pop(old, None)
        self._layouts.move_to_end(key)
        return self._layouts[key]
