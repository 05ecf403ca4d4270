"""The training loader: batches (x, y) from the shards of one split, shuffled, disjoint across ranks, resumable.

Each epoch a split is ONE token stream, and epochs follow one another, so no token is dropped at a shard's or an
epoch's end. Unshuffled (validation, data.shuffle=false) the stream is the files in name order, and a step of
world_size*B*T tokens gives rank r the window [pos + r*B*T, pos + (r+1)*B*T + 1) (the +1 is the last target).

Shuffled, the stream is every document of the split (split at <|endoftext|>) in an order drawn from (seed, epoch),
over all shards at once. It is cut into windows of T tokens (+1 target), and each epoch's windows are dealt into
`lanes` contiguous lanes that are read column by column: window c of every lane (the lanes in a per-epoch random
order), then window c+1. Row g of the whole run reads the g-th window in that order, and rank r's rows of a step are
g..g+B-1 from g = pos/T + r*B. So the rows of one batch come from far-apart places of a globally shuffled epoch (a
fair sample of the corpus even when documents are much longer than a row), and every window is read once.

The state is one number, the tokens consumed so far, the same on every rank: a restored loader yields exactly the
batches the original would have, also under another world_size or batch_size (not another seq_len when shuffled,
since the windows are seq_len long). Memory: the tokens are only memory-mapped; the shuffle holds 16 bytes per
document (where each starts in its shard; an epoch's order and where each lands in the stream), 28 while a window
straddles two epochs: 160 MB for the ~10M documents of a 10B-token split, 1.6 GB for 100B tokens.
"""

import datetime
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pretrain.errors import rank_local
from pretrain.shards import ShardError, list_shards, read_shard
from pretrain.tokenizer import EOT_ID, N_VOCAB

SCAN_CHUNK = 1 << 20  # tokens examined at once when looking for document starts (a 1 MB mask)
LANES = 4096  # lanes of a shuffled epoch: as many as the rows of a step on 64 GPUs (B=64), so no two share one
ORDER_CHUNK = 1 << 20  # documents measured at once when laying out an epoch (bounds its temporary memory)


def document_starts(tokens: np.ndarray, eot_id: int = EOT_ID) -> np.ndarray:
    """Offsets where documents start: every EOT token, plus 0 (tokens before the first EOT are a document too)."""
    found = [np.flatnonzero(tokens[lo:lo + SCAN_CHUNK] == eot_id) + lo  # in chunks: never a whole-shard mask
             for lo in range(0, len(tokens), SCAN_CHUNK)]
    starts = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    return starts if not len(tokens) or (len(starts) and starts[0] == 0) else np.concatenate([[0], starts])


@dataclass(frozen=True)
class _EpochOrder:
    """One shuffled epoch: its documents in stream order, and how its windows are dealt into lanes."""
    docs: np.ndarray  # (D,) uint32 document numbers (in file order) in stream order
    starts: np.ndarray  # (D+1,) int64 stream offset of each of them; the last is the epoch's length
    first_window: int  # windows of all earlier epochs: this epoch's windows are those starting in it
    windows: int
    lanes: np.ndarray  # the order in which a full column visits the lanes
    tail_lanes: np.ndarray  # the same for the last column, which only the first windows % lanes lanes reach


class ShardLoader:
    """Batches (x, y) of shape (B, T) from the shards of one split, disjoint across ranks, resumable exactly."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool | None = None, seed: int = 0, lanes: int = LANES,
                 check_dates: bool = True):
        if batch_size < 1 or seq_len < 1 or lanes < 1:
            raise ValueError(f"batch_size ({batch_size}), seq_len ({seq_len}) and lanes ({lanes}) must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.split, self.batch_size, self.seq_len, self.lanes = split, batch_size, seq_len, lanes
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.check_dates = check_dates
        self.paths = list_shards(data_dir, split)
        # read_shard checks every header now, so a bad shard fails at start; the memmaps cost no RAM until read
        self.shards = [read_shard(p) for p in self.paths]
        self.lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.bases = np.concatenate([[0], np.cumsum(self.lengths)])  # where each shard starts in the files' stream
        self.epoch_tokens = int(self.bases[-1])
        need = batch_size * seq_len + 1
        if self.epoch_tokens < need:
            raise ShardError(f"{split} data in {data_dir} has {self.epoch_tokens} tokens, fewer than one batch needs "
                             f"(batch_size*seq_len+1 = {need})")
        if self.shuffle and self.lengths.max() >= 2**32:
            raise ShardError(f"shard {self.paths[int(self.lengths.argmax())]} holds 2**32 tokens or more; the "
                             "shuffle indexes documents within a shard in 32 bits: split it into smaller shards")
        self.position = 0  # global stream offset of the next step, counted from the start of epoch 0
        self._doc_offsets: np.ndarray | None = None  # (D+1,) uint32 offset of each document in its shard, then 0
        self._first_doc = np.zeros(0, dtype=np.int64)  # (shards+1,) number of each shard's first document, then D
        self._orders: OrderedDict[int, _EpochOrder] = OrderedDict()  # two epochs meet where a window straddles

    @property
    def epoch(self) -> int:
        return self.position // self.epoch_tokens

    @property
    def step_tokens(self) -> int:
        """Tokens one next_batch() reads over all ranks."""
        return self.world_size * self.batch_size * self.seq_len

    @property
    def whole_steps(self) -> int:
        """next_batch() calls from position 0 before a rank's window would run past the epoch's end (unshuffled:
        the number of distinct batches, as validation needs)."""
        return (self.epoch_tokens - 1) // self.step_tokens

    def describe(self) -> str:
        """What this loader reads, for the log."""
        names = self.paths[0].name if len(self.paths) == 1 else f"{self.paths[0].name} .. {self.paths[-1].name}"
        order = "documents shuffled over all shards" if self.shuffle else "in file order"
        return (f"{self.split}: {len(self.paths)} shard(s), {self.epoch_tokens:,} tokens ({names}, in "
                f"{self.paths[0].parent}), {order}")

    def reset(self) -> None:
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        if self.shuffle:
            first_row = self.position // T + self.rank * B
            starts = np.array([self._window(g) * T for g in range(first_row, first_row + B)], dtype=np.int64)
            buf = torch.from_numpy(self._read(starts, T + 1).reshape(B, T + 1))
            x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        else:
            buf = torch.from_numpy(self._read(np.array([self.position + self.rank * B * T]), B * T + 1))
            x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        self.position += self.world_size * B * T
        return x, y

    # -- state ---------------------------------------------------------------------------------------------------

    def _identity(self) -> dict:
        """What must match for a saved position to mean the same tokens."""
        identity = {"split": self.split, "shuffle": self.shuffle, "seed": self.seed,
                    "shards": [[p.name, int(n)] for p, n in zip(self.paths, self.lengths)]}
        if self.shuffle:  # the position counts windows of seq_len tokens, dealt into this many lanes
            identity.update(seq_len=self.seq_len, lanes=self.lanes)
        return identity

    def _fingerprints(self) -> list[list]:
        """Each shard's size and modification time: a shard replaced by another of the same name and token count
        (a rebuilt corpus of fixed-size shards) changes them, and comparing them costs no read of the tokens."""
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in self.paths]

    def state_dict(self) -> dict:
        # batch_size and world_size are informational (a step's rows are numbered over the run, so they may change),
        # and so is seq_len unless shuffled
        return {"position": self.position, "epoch": self.epoch, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "world_size": self.world_size, "fingerprints": self._fingerprints(),
                **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity()
        for key, value in mine.items():
            if key not in state:
                raise ValueError(f"loader state has no {key!r}; it was not saved by ShardLoader.state_dict")
            if state[key] != value:
                what = "the shards (names, token counts)" if key == "shards" else key
                raise ValueError(f"{self.split} loader state does not match: {what} changed from {state[key]!r} "
                                 f"to {value!r}; the saved position would point at different tokens")
        if self.check_dates and "fingerprints" in state:  # older checkpoints have none
            for (name, size, mtime), now in zip(state["fingerprints"], self._fingerprints()):
                if [size, mtime] != now[1:]:
                    raise ValueError(f"shard {name} in {self.paths[0].parent} changed since the checkpoint was saved "
                                     f"(size {size:,} -> {now[1]:,} bytes, modified {_when(mtime)} -> {_when(now[2])})"
                                     ": the saved position would point at other tokens; if only its date changed (a "
                                     "copy that kept the bytes), resume with --data.check_shard_dates=false")
        position = state.get("position")
        if not isinstance(position, int) or position < 0:
            raise ValueError(f"loader state has an invalid position {position!r}")
        self.position = position

    # -- the stream ----------------------------------------------------------------------------------------------

    def _window(self, row: int) -> int:
        """Which window of the stream (tokens [i*T, i*T+T+1)) the run's row-th row reads, when shuffled."""
        order = self._order(row * self.seq_len // self.epoch_tokens)
        k = row - order.first_window
        lanes = len(order.lanes)
        per_lane, longer = divmod(order.windows, lanes)  # the first `longer` lanes hold one window more
        if k < lanes * per_lane:
            column, slot = divmod(k, lanes)
            lane = int(order.lanes[slot])
        else:
            column, lane = per_lane, int(order.tail_lanes[k - lanes * per_lane])
        return order.first_window + lane * per_lane + min(lane, longer) + column

    def _read(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Tokens [s, s+length) of the global stream for each s in starts, concatenated, as int64."""
        epoch, lo = np.divmod(starts, self.epoch_tokens)
        n = np.minimum(length, self.epoch_tokens - lo)
        out = np.arange(len(starts)) * length  # where each piece goes in the output
        crosses = n < length  # a window that crosses an epoch's end reads on at the start of the next epoch
        epoch = np.concatenate([epoch, epoch[crosses] + 1])
        lo = np.concatenate([lo, np.zeros(crosses.sum(), dtype=np.int64)])
        out = np.concatenate([out, out[crosses] + n[crosses]])
        n = np.concatenate([n, length - n[crosses]])
        spans = [self._file_spans(e, lo[epoch == e], n[epoch == e], out[epoch == e]) for e in np.unique(epoch).tolist()]
        return self._gather(*map(np.concatenate, zip(*spans)))

    def _file_spans(self, epoch: int, lo: np.ndarray, n: np.ndarray, out: np.ndarray):
        """Where epoch offsets [lo[k], lo[k]+n[k]) lie in the files' stream (the shards in name order), as spans
        (file start, length, output position)."""
        if not self.shuffle:
            return lo, n, out  # the epoch is the files
        order = self._order(epoch)
        piece, doc, seg_lo, seg_hi = split_at(order.starts, lo, lo + n)  # documents in stream order
        file_start = self._document_file_starts(order.docs[doc]) + seg_lo - order.starts[doc]
        return file_start, seg_hi - seg_lo, out[piece] + seg_lo - lo[piece]

    def _gather(self, file_start: np.ndarray, length: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Read spans of the files' stream from the memmaps into an output array. Token ids that GPT-2 does not
        have stop the run here, at their first read."""
        span, shard, seg_lo, seg_hi = split_at(self.bases, file_start, file_start + length)
        if len(span) == 1:  # one contiguous read: unshuffled, within a shard
            local = int(seg_lo[0] - self.bases[shard[0]])
            read = self.shards[int(shard[0])][local:local + int(seg_hi[0] - seg_lo[0])].astype(np.int64)
            self._check_ids(read, lambda at: (int(shard[0]), local + at))
            return read
        # spans sorted by shard, so that each shard is read with one fancy index
        by_shard = np.argsort(shard, kind="stable")
        span, shard, seg_lo, seg_hi = span[by_shard], shard[by_shard], seg_lo[by_shard], seg_hi[by_shard]
        local_offsets = ranges(seg_lo - self.bases[shard], seg_hi - seg_lo)
        counts = np.bincount(shard, weights=seg_hi - seg_lo, minlength=len(self.shards)).astype(np.int64)
        shard_ends = np.cumsum(counts)
        read = np.empty(len(local_offsets), dtype=np.int64)
        for s in np.flatnonzero(counts).tolist():
            mine = slice(shard_ends[s] - counts[s], shard_ends[s])
            read[mine] = self.shards[s][local_offsets[mine]]
        self._check_ids(read, lambda at: (int(np.searchsorted(shard_ends, at, side="right")), int(local_offsets[at])))
        tokens = np.empty_like(read)
        tokens[ranges(out[span] + seg_lo - file_start[span], seg_hi - seg_lo)] = read
        return tokens

    def _check_ids(self, tokens: np.ndarray, where) -> None:
        """Ids >= N_VOCAB are the model's padded rows (never trained) or past its embedding (a crash deep inside
        it): stop with the shard and offset, which where(index in tokens) gives."""
        if tokens.max() < N_VOCAB:
            return
        at = int(np.argmax(tokens >= N_VOCAB))
        shard, offset = where(at)
        raise rank_local(ShardError(f"shard {self.paths[shard]}: token id {tokens[at]} at token offset {offset} is "
                                    f"not a GPT-2 token (ids are 0..{N_VOCAB - 1}): was this shard written with "
                                    "another tokenizer?"))

    # -- the shuffle ---------------------------------------------------------------------------------------------

    def _document_file_starts(self, docs: np.ndarray) -> np.ndarray:
        """Where documents (numbered in file order; D is the end of the last) start in the files' stream."""
        docs = docs.astype(np.int64)
        shard = np.searchsorted(self._first_doc, docs, side="right") - 1  # empty shards have no documents to match
        return self.bases[shard] + self._doc_offsets[docs]

    def _index_documents(self) -> None:
        """Find every document of the split: one pass over the shards, on the first shuffled read."""
        offsets = [document_starts(tokens).astype(np.uint32) for tokens in self.shards]
        self._doc_offsets = np.concatenate(offsets + [np.zeros(1, dtype=np.uint32)])
        self._first_doc = np.concatenate([[0], np.cumsum([len(o) for o in offsets])])

    def _order(self, epoch: int) -> _EpochOrder:
        if epoch not in self._orders:
            if self._doc_offsets is None:
                self._index_documents()
            self._orders[epoch] = self._shuffle(epoch)
            if len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def _shuffle(self, epoch: int) -> _EpochOrder:
        rng = np.random.default_rng([self.seed, epoch])
        docs = np.arange(len(self._doc_offsets) - 1, dtype=np.uint32)
        rng.shuffle(docs)
        starts = np.zeros(len(docs) + 1, dtype=np.int64)
        for lo in range(0, len(docs), ORDER_CHUNK):
            chunk = docs[lo:lo + ORDER_CHUNK].astype(np.int64)
            doc_len = self._document_file_starts(chunk + 1) - self._document_file_starts(chunk)
            starts[lo + 1:lo + 1 + len(chunk)] = starts[lo] + np.cumsum(doc_len)
        # the windows that start in this epoch: a window straddling its end belongs to it, and ends in the next
        first_window = -(-epoch * self.epoch_tokens // self.seq_len)
        windows = -(-(epoch + 1) * self.epoch_tokens // self.seq_len) - first_window
        lanes = min(self.lanes, windows)
        return _EpochOrder(docs, starts, first_window, windows, rng.permutation(lanes),
                           rng.permutation(windows % lanes))


def _when(mtime_ns: int) -> str:
    return datetime.datetime.fromtimestamp(mtime_ns / 1e9).isoformat(sep=" ", timespec="seconds")


def split_at(bounds: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, ...]:
    """Cut the spans [lo[k], hi[k]) where they cross the sorted bounds. Returns, for each piece in order, the span it
    comes from, the interval i (bounds[i] <= piece < bounds[i+1]) it lies in, and its ends."""
    first = np.searchsorted(bounds, lo, side="right") - 1
    last = np.searchsorted(bounds, hi - 1, side="right") - 1
    count = last - first + 1
    span = np.repeat(np.arange(len(lo)), count)
    interval = ranges(first, count)
    seg_lo = np.maximum(bounds[interval], lo[span])
    seg_hi = np.minimum(bounds[interval + 1], hi[span])
    nonempty = seg_hi > seg_lo  # empty intervals (empty shards) inside a span
    return span[nonempty], interval[nonempty], seg_lo[nonempty], seg_hi[nonempty]


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(starts[k], starts[k] + lengths[k]) over k, without a Python loop."""
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(starts - (ends - lengths), lengths)
