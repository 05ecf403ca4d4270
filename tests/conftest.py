import socket
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import tokenizer
from data import write_shard


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """A few small train/val shards of real text (Python's own sources), enough for short training runs."""
    out = tmp_path_factory.mktemp("tiny_shards")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [(stdlib / name).read_text(encoding="utf-8") for name in ("argparse.py", "json/decoder.py", "textwrap.py")]
    tokens = np.array([t for doc in docs for t in [tokenizer.EOT_ID] + tokenizer.encode(doc)], dtype=np.uint16)
    write_shard(out / "tiny_val_000000.bin", tokens[:8192])
    write_shard(out / "tiny_train_000000.bin", tokens[8192:40000])
    write_shard(out / "tiny_train_000001.bin", tokens[40000:])
    return out


@pytest.fixture
def free_port() -> int:
    """A TCP port on localhost that nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
