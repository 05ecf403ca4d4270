"""Files written whole: atomic writes (a file appears complete under its final name or not at all), and JSON-lines
records: appended a whole line at a time, read back with a last line cut short by a killed writer left out."""

import contextlib
import errno
import json
import math
import os
import shutil
from pathlib import Path

from pretrain.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is left as it was, so a crash mid-write never
    leaves a truncated file under the real name. A write the system refuses (no permission, a full disk) is a
    WriteError that names the file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}{_free_space_note(path, e)}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class WriteError(UserError):
    """A file that could not be written (permissions, a full disk); anything it replaces is left as it was."""


def _free_space_note(path: Path, error: OSError) -> str:
    if error.errno != errno.ENOSPC:
        return ""
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(next(p for p in (path.parent, *path.parents) if p.exists())).free
        return f" ({free / 2**20:,.0f} MiB free there)"
    return ""


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_safe(value):
    """value with every non-finite float replaced by None, through lists and dicts: JSON has no NaN or infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def jsonl_line(record: dict) -> str:
    """One record as a line of strict JSON (a diverged run's NaNs are written as null)."""
    return json.dumps(json_safe(record), allow_nan=False) + "\n"


class JsonlWriter:
    """Appends records to a JSON-lines file, one whole line each and line-buffered: a crash loses at most the line
    being written, which read_jsonl then leaves out."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1, encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(jsonl_line(record))

    def close(self) -> None:
        self.file.close()


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Replace a JSON-lines file with these records, atomically."""
    atomic_write_text(path, "".join(jsonl_line(record) for record in records))


class RecordsError(UserError):
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


def located_rows(path: str | Path, error: type[Exception], what: str) -> list[tuple[str, object]]:
    """The rows of a hand-made jsonl data file (HellaSwag's, a CORE task's), each with where it came from ("FILE
    line N") for the caller's checks; blank lines are skipped. A missing file, a line that is not JSON or a file
    without rows raises `error`, naming the file as `what` (e.g. "HellaSwag data file")."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist (expected a jsonl file: one JSON object per line)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path} line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise error(f"{path} line {number}: not valid JSON ({e.msg})") from None
    if not rows:
        raise error(f"{what} {path} holds no rows")
    return rows
