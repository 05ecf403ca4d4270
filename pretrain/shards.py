"""Token shards on disk: write, read (memory-mapped, header checked) and list them.

Shard format (llm.c / modded-nanogpt): a header of 256 little-endian int32 — magic 20240520, version 1,
token count — then the tokens as uint16. build-nanogpt's plain .npy uint16 arrays are read too.
"""

import re
from pathlib import Path

import numpy as np

from pretrain.errors import UserError
from pretrain.fileio import atomic_path

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(UserError):
    """A shard file that is missing, truncated or not in a format we read."""


def write_shard(path: str | Path, tokens) -> None:
    """Write tokens (values < 2**16) as a .bin shard; the file appears complete or not at all."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"shard {path}: token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens (uint16, read-only) after checking its header against its size."""
    path = Path(path)
    try:
        return _read_shard(path)
    except OSError as e:  # permissions, a file gone or unreadable between listing and reading
        raise ShardError(f"shard {path} cannot be read: {e.strerror or e}") from None


def _read_shard(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist")
    size = path.stat().st_size
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r")
        except (ValueError, EOFError) as e:  # EOFError: an empty or cut-off file
            raise ShardError(f"shard {path} ({size} bytes) is not a readable .npy file: {e}") from None
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise ShardError(f"shard {path}: expected a 1-D uint16 .npy array, got {tokens.dtype} {tokens.shape}")
        return tokens
    if size < HEADER_BYTES:
        raise ShardError(f"shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"shard {path}: magic number {header[0]}, expected {SHARD_MAGIC} (not a token shard?)")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"shard {path}: version {header[1]}, expected {SHARD_VERSION}")
    ntok = int(header[2])
    expected = HEADER_BYTES + 2 * ntok
    if size != expected:
        raise ShardError(f"shard {path}: header says {ntok} tokens ({expected} bytes) but the file is {size} bytes"
                         + (" (truncated)" if size < expected else ""))
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(ntok,))


# *_<split>_*.bin or .npy: the split is the last "_train_" or "_val_" in the name (the prefix matches greedily), so a
# prefix that holds one of them ("my_train_data_val_000000.bin") does not make a shard of both splits.
SHARD_NAME = re.compile(r"^(?!\.)(?P<prefix>.*)_(?P<split>train|val)_(?P<rest>.*)\.(bin|npy)$")


def is_shard_name(name: str, split: str | None = None) -> bool:
    """Whether the loader reads a file of this name as a shard of `split` (of either split when None)."""
    match = SHARD_NAME.match(name)
    return match is not None and (split is None or match["split"] == split)


def list_shards(data_dir: str | Path, split: str) -> list[Path]:
    """The shards of one split ("train" or "val") in a directory, sorted by name: *_{split}_*.bin or .npy."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise ShardError(f"data directory {data_dir} is a file; expected the directory of the shards")
    if not data_dir.is_dir():
        raise ShardError(f"data directory {data_dir} does not exist")
    try:
        shards = sorted(p for p in data_dir.iterdir() if is_shard_name(p.name, split))
    except OSError as e:
        raise ShardError(f"data directory {data_dir} cannot be read: {e.strerror or e}") from None
    if not shards:
        raise ShardError(f"no {split} shards (*_{split}_*.bin or .npy) in {data_dir}")
    return shards
