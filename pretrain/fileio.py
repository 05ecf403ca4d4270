"""Files written whole: atomic writes (a file appears complete under its final name or not at all), and JSON-lines
records read back with a last line cut short by a killed writer left out."""

import contextlib
import json
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is left as it was, so a crash mid-write never
    leaves a truncated file under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class RecordsError(ValueError):
    """A JSON-lines file that is missing or holds a line that is not JSON; the message names the file and line."""


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl, health.jsonl), in order. A last line cut short (its writer
    was killed mid-write) is skipped; any other line that is not JSON is an error."""
    path = Path(path)
    if not path.is_file():
        raise RecordsError(f"{path} does not exist")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            is_cut_short = number == len(lines) and not text.endswith("\n")
            if is_cut_short:
                break
            raise RecordsError(f"{path}, line {number}: not a JSON record: {line[:80]!r}") from None
    return records
