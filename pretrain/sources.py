"""Where documents come from: local files, a Hugging Face dataset, or the standard library's sources (the demo).

A source yields documents (str), always in the same order, and describes itself as JSON (stored in the shard
manifest and compared when an interrupted build resumes). Errors name the file and line, or the dataset.
"""

import contextlib
import glob
import gzip
import hashlib
import importlib
import json
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from pretrain.errors import UserError

INPUT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
# Parts of the stdlib tree that are tests, third-party packages or written per machine at build time.
DEMO_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class CorpusError(UserError):
    """A problem with the input, the arguments or the output directory; the message says what and where."""


class SourceUnreachable(CorpusError):
    """The dataset could not be fetched (no network, or the Hub is down)."""


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()



class Source(Protocol):
    def describe(self) -> dict:
        """What the documents are, as JSON: stored in the manifest and compared when a run resumes."""

    def __iter__(self) -> Iterator[str]:
        """The documents, always in the same order."""


def _checked_text(value, text_field: str, where: str) -> str:
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field {text_field!r} is {type(value).__name__}, expected a string")
    return value


def _text_of(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        got = f"keys {sorted(record)[:8]}" if isinstance(record, dict) else type(record).__name__
        raise CorpusError(f"{where}: expected a JSON object with a string {text_field!r} field, got {got} "
                          "(choose the field with --text-field)")
    return _checked_text(record[text_field], text_field, where)


def _read_text(path: Path) -> Iterator[str]:
    try:
        yield path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                      "expected one JSON object per line") from None
                yield _text_of(record, text_field, f"{path}, line {lineno}")
    except UnicodeDecodeError:
        raise CorpusError(f"{path}, line {lineno + 1}: not UTF-8 text") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise CorpusError(f"{path}: not a complete gzip file ({e})") from None


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except pyarrow.ArrowException as e:
        raise CorpusError(f"{path}: not a readable parquet file ({e})") from None
    columns = table.schema_arrow.names
    if text_field not in columns:
        raise CorpusError(f"{path}: no column {text_field!r}; it has {columns} (choose the column with --text-field)")
    row = 0
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _checked_text(value, text_field, f"{path}, row {row}")


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents in one file: a JSON object per line (.jsonl, .jsonl.gz), a row (.parquet) or the whole file."""
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(path, text_field)
    if path.name.endswith(".parquet"):
        return _read_parquet(path, text_field)
    return _read_text(path)


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Expand files, directories and globs (each one's matches sorted) into the list of input files, in order."""
    paths = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if not Path(p).is_dir())
            if not matches:
                raise CorpusError(f"--input {pattern!r} matches no files")
        elif Path(pattern).is_dir():
            matches = sorted(p for p in Path(pattern).rglob("*") if p.name.endswith(INPUT_SUFFIXES))
            if not matches:
                raise CorpusError(f"--input {pattern!r} is a directory with no {', '.join(INPUT_SUFFIXES)} files")
        elif Path(pattern).exists():
            matches = [Path(pattern)]
        else:
            raise CorpusError(f"--input {pattern!r} does not exist")
        for path in matches:
            if not path.name.endswith(INPUT_SUFFIXES):
                raise CorpusError(f"{path}: unsupported input type; expected one of {', '.join(INPUT_SUFFIXES)}")
        paths += matches
    return paths


@dataclass(frozen=True)
class LocalFiles:
    """Documents from local files, file after file (see read_documents for the formats)."""

    paths: tuple[Path, ...]
    text_field: str = "text"
    kind: str = "files"

    def describe(self) -> dict:
        # The file list, not sizes or dates: content is checked on resume by the hash of the last document written.
        listing = "\n".join(str(p) for p in self.paths)
        return {"kind": self.kind, "files": len(self.paths), "first": str(self.paths[0]) if self.paths else None,
                "paths_sha256": sha256_text(listing), "text_field": self.text_field}

    def __iter__(self) -> Iterator[str]:
        for path in self.paths:
            yield from read_documents(path, self.text_field)


def _network_errors() -> tuple[type[BaseException], ...]:
    """What datasets/huggingface_hub raise when the Hub cannot be reached, at load time or mid-stream."""
    from huggingface_hub.errors import HfHubHTTPError  # an error status (5xx, 429) after hf_hub's own retries

    errors = [ConnectionError, TimeoutError, HfHubHTTPError]  # ConnectionError covers hf_hub's OfflineModeIsEnabled
    # requests' errors are not ConnectionError; huggingface_hub's HTTP client is httpx or httpx2 by version
    for module, name in (("requests", "ConnectionError"), ("requests", "Timeout"), ("httpx2", "TransportError"),
                         ("httpx", "TransportError")):
        with contextlib.suppress(ImportError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


@dataclass(frozen=True)
class HubDataset:
    """Documents from a Hugging Face dataset (or a local dataset directory), streamed.

    Streaming rather than downloading: sample-10BT alone is ~27 GB of parquet, and a download would keep that in
    the cache and convert it again to Arrow (twice the disk) before the first token; streaming starts at once,
    needs no disk beyond the shards, and reads the same files in the same order, so the output is deterministic.
    The cost is on resume: skipped documents are streamed again (not tokenized).
    """

    name: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    def describe(self) -> dict:
        return {"kind": "hub", "dataset": self.name, "config": self.config, "split": self.split,
                "text_field": self.text_field}

    def __iter__(self) -> Iterator[str]:
        import datasets  # slow to import; only this source needs it
        from datasets.exceptions import DatasetNotFoundError

        what = self.name + (f" ({self.config})" if self.config else "")
        count = 0
        try:
            stream = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
            for record in stream:  # errors can surface here too: streaming opens the files lazily
                yield _text_of(record, self.text_field, f"{what} record {count}")
                count += 1
        except DatasetNotFoundError:
            raise CorpusError(f"dataset {what} was not found on the Hugging Face Hub (check --dataset/--name)") \
                from None
        except _network_errors():
            if count:
                raise SourceUnreachable(f"lost the connection to the Hugging Face Hub after {count} documents of "
                                        f"{what}; run the same command again to continue after the last complete "
                                        "shard") from None
            raise SourceUnreachable(f"could not reach the Hugging Face Hub to load {what}; with no network, tokenize "
                                    "local files with --input FILE_OR_GLOB (.txt, .jsonl, .jsonl.gz, .parquet) or "
                                    "build the offline demo corpus with --demo") from None


# ---- The offline demo corpus ---------------------------------------------------------------------------------


def stdlib_sources(root: str | Path | None = None) -> list[Path]:
    """The standard library's own .py files, sorted, without tests, installed packages or per-machine config."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in DEMO_SKIP_DIRS and not d.startswith("config-")]
        files += [Path(folder, n) for n in names if n.endswith(".py") and not n.startswith("_sysconfigdata")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def demo_source(files: list[Path] | None = None) -> LocalFiles:
    """The demo corpus's documents: each stdlib .py file (or each of `files`) is one document."""
    files = stdlib_sources() if files is None else files
    return LocalFiles(tuple(files), kind=f"demo: Python {platform.python_version()} standard library sources")
