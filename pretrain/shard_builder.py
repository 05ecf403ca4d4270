"""Documents -> GPT-2 token shards: the tokenize-and-shard pipeline behind fineweb.py, resumable.

build_corpus tokenizes a source's documents (pretrain.sources) in a process pool, consumes the results in order (so
the output never depends on the worker count) and cuts the stream of <|endoftext|> + document tokens into .bin
shards: the first val_tokens tokens go to val shards, the rest to train.

After each shard it records how far it got in progress.json, so a run that was interrupted, started again with
the same arguments, continues after its last complete shard and writes the same bytes an uninterrupted run would.
A finished corpus has a manifest.json (source, tokenizer, counts, each shard's sha256) and no progress.json.
"""

import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from pretrain.fileio import atomic_write_text
from pretrain.shards import HEADER_BYTES, is_shard_name, write_shard
from pretrain.sources import CorpusError, LocalFiles, Source, demo_source, sha256_text
from pretrain.tokenize_pool import available_cpus, chunks, maybe_pool, tokenized
from pretrain.tokenizer import EOT_ID, RANKS_SHA256

DEFAULT_SHARD_SIZE = 100_000_000  # tokens per shard (200 MB), as build-nanogpt and llm.c
DEFAULT_VAL_TOKENS = 100_000_000  # their first shard is the val split
CHUNK_CHARS = 1 << 18  # characters per task sent to a worker (~80k tokens): amortizes the IPC, bounds memory
MANIFEST = "manifest.json"
INPUT_STAT = "input_stat_sha256"  # config key: local inputs' sizes and modification times
PROGRESS = "progress.json"
LOCK = ".lock"

# A local input smaller than ten times DEFAULT_VAL_TOKENS gets a tenth of its tokens for validation instead, so that
# both splits get tokens; its size is estimated from the files' (compressed files count at their compressed size).
LOCAL_VAL_FRACTION = 0.1
BYTES_PER_TOKEN = 4  # English text in GPT-2 tokens, roughly

DEMO_DIR = Path("data/demo")
DEMO_SHARD_SIZE = 1_000_000
DEMO_VAL_TOKENS = 250_000


def local_val_tokens(paths: tuple[Path, ...] | list[Path]) -> int:
    """The default validation split of local files: DEFAULT_VAL_TOKENS, or a tenth of a smaller input."""
    estimated_tokens = sum(p.stat().st_size for p in paths) // BYTES_PER_TOKEN
    return min(DEFAULT_VAL_TOKENS, math.ceil(estimated_tokens * LOCAL_VAL_FRACTION))


# ----------------------------------------------------------------------------------------------------------------
# Build progress, manifest and the shard writer


@dataclass
class BuildProgress:
    """How far a build got: everything needed to continue it exactly, written atomically after each shard."""

    config: dict
    docs_done: int = 0  # documents all of whose tokens are in written shards
    carry: int = 0  # tokens of document `docs_done` (the one split by the last shard boundary) already written
    last_doc_sha256: str | None = None  # the last document with tokens written, to catch changed input on resume
    shards: list[dict] = field(default_factory=list)  # name, split, tokens, docs (that start in it), sha256

    @property
    def docs_started(self) -> int:
        return self.docs_done + (self.carry > 0)

    def save(self, output_dir: Path) -> None:
        atomic_write_text(output_dir / PROGRESS, json.dumps(asdict(self), indent=1) + "\n")


def _normalized(obj):
    """obj as it reads back from JSON, so configs compare equal across a save and a load."""
    return json.loads(json.dumps(obj))


def input_stat(source: Source) -> str | None:
    """A fingerprint of local input files' paths, sizes and modification times (None for other sources), so that
    a file changed under the same path is noticed without reading it."""
    if not isinstance(source, LocalFiles):
        return None
    lines = []
    for path in source.paths:
        stat = path.stat()
        lines.append(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return sha256_text("\n".join(lines))


def _check_same_config(saved: dict, config: dict, output_dir: Path) -> None:
    if saved.get(INPUT_STAT) is None:  # a build from before inputs were fingerprinted, or not from local files
        saved = {**saved, INPUT_STAT: config.get(INPUT_STAT)}
    if saved == config:
        return
    if saved[INPUT_STAT] != config[INPUT_STAT]:
        raise CorpusError(f"the input changed since {output_dir} was built from it (a file's size or modification "
                          f"time differs); delete {output_dir} to build it again, or choose another --output")
    diffs = [f"{key}: {saved.get(key)!r} then, {config.get(key)!r} now"
             for key in sorted(set(saved) | set(config)) if saved.get(key) != config.get(key)]
    raise CorpusError(f"{output_dir} was built with different arguments ({'; '.join(diffs)}); "
                      "use the same arguments to continue it, or another --output (or delete the directory)")


def _check_no_foreign_shards(output_dir: Path, prefix: str) -> None:
    """The training loader reads every shard in a directory, so shards of another build beside ours would be mixed
    into the training data."""
    foreign = sorted(p.name for p in output_dir.iterdir() if is_shard_name(p.name) and
                     not p.name.startswith(f"{prefix}_"))
    if foreign:
        raise CorpusError(f"{output_dir} holds shards of another build ({foreign[0]}, ...): training would mix "
                          "them with these; choose another --output")


def _checked_manifest(output_dir: Path, config: dict) -> dict:
    """The manifest of a finished build of this config, after checking every shard it lists is still whole."""
    manifest = json.loads((output_dir / MANIFEST).read_text())
    _check_same_config({k: manifest.get(k) for k in config}, config, output_dir)
    for shard in manifest["shards"]:
        _check_shard_file(output_dir, shard, f"listed in {MANIFEST}")
    return manifest


def _load_progress(output_dir: Path, config: dict, prefix: str) -> BuildProgress:
    """The saved progress of an interrupted build with this config, or a fresh start."""
    path = output_dir / PROGRESS
    if not path.exists():
        ours = [p.name for p in output_dir.glob(f"{prefix}_*.bin")]
        if ours:
            raise CorpusError(f"{output_dir} holds shards ({ours[0]}, ...) but no {PROGRESS} or {MANIFEST} to say "
                              "how they were made; choose another --output or delete them")
        return BuildProgress(config=config)
    state = BuildProgress(**json.loads(path.read_text()))
    # Resuming checks the input by content (_skip_written), so it adopts the input files' current sizes and times.
    state.config = {**state.config, INPUT_STAT: config[INPUT_STAT]}
    _check_same_config(state.config, config, output_dir)
    for shard in state.shards:
        _check_shard_file(output_dir, shard, f"listed in {path}")
    return state


def _check_shard_file(output_dir: Path, shard: dict, why: str) -> None:
    path = output_dir / shard["name"]
    if not path.is_file() or path.stat().st_size != HEADER_BYTES + 2 * shard["tokens"]:
        raise CorpusError(f"shard {path} ({why}) is missing or has the wrong size; delete {output_dir} to start again")


def is_unfinished(output_dir: str | Path) -> bool:
    """Whether a build of this directory started and has not finished: its progress file, and no manifest."""
    output_dir = Path(output_dir)
    return (output_dir / PROGRESS).is_file() and not (output_dir / MANIFEST).is_file()


def is_complete(output_dir: str | Path) -> bool:
    """Cheap check that a corpus was built to the end: its manifest exists and every shard has the right size."""
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        return False
    try:
        for shard in json.loads(path.read_text())["shards"]:
            _check_shard_file(Path(output_dir), shard, "in the manifest")
    except (CorpusError, ValueError, KeyError):
        return False
    return True


def _manifest(state: BuildProgress) -> dict:
    splits = {}
    for split in ("val", "train"):
        shards = [s for s in state.shards if s["split"] == split]
        splits[split] = {"shards": len(shards), "tokens": sum(s["tokens"] for s in shards),
                         "docs": sum(s["docs"] for s in shards)}
    return {**state.config, "splits": splits, "shards": state.shards}


@dataclass
class _Chunk:
    first_doc: int  # index of docs[0] in the whole stream
    docs: list[str]
    tokens: np.ndarray
    ends: np.ndarray  # cumulative token counts: document i is tokens[ends[i] - length_i : ends[i]]

    def position(self, pos: int) -> tuple[int, int, str]:
        """(docs_done, carry, last document's text) once tokens[:pos] of this chunk are written."""
        full = int(np.searchsorted(self.ends, pos, side="right"))
        carry = pos - (int(self.ends[full - 1]) if full else 0)
        return self.first_doc + full, carry, self.docs[full if carry else full - 1]


class _ShardWriter:
    """Cuts the token stream into val shards (the first val_tokens tokens), then train shards, saving progress."""

    def __init__(self, output_dir: Path, prefix: str, shard_size: int, val_tokens: int, state: BuildProgress):
        self.output_dir, self.prefix, self.state = output_dir, prefix, state
        self.shard_size, self.val_tokens = shard_size, val_tokens
        self.buffer = np.empty(shard_size, dtype=np.uint16)
        self.fill = 0
        self.written = sum(s["tokens"] for s in state.shards)

    def _room(self) -> int:
        # The last val shard stops at val_tokens, so train starts with a fresh shard.
        limit = min(self.shard_size, self.val_tokens - self.written) if self.written < self.val_tokens \
            else self.shard_size
        return limit - self.fill

    def add(self, chunk: _Chunk, start: int = 0, progress=None) -> None:
        """Add chunk's tokens from `start` on, writing each shard as it fills; progress (a tqdm bar) moves by the
        tokens added, after each shard written, so it moves while a chunk fills many small shards."""
        pos = start
        while pos < len(chunk.tokens):
            n = min(self._room(), len(chunk.tokens) - pos)
            self.buffer[self.fill:self.fill + n] = chunk.tokens[pos:pos + n]
            self.fill += n
            pos += n
            if self._room() == 0:
                self._flush(*chunk.position(pos))
            if progress is not None:
                progress.update(n)
                progress.set_postfix(shards=len(self.state.shards), refresh=False)

    def finish(self, last_chunk: _Chunk | None) -> None:
        if self.fill:
            self._flush(*last_chunk.position(len(last_chunk.tokens)))

    def _flush(self, docs_done: int, carry: int, last_doc: str) -> None:
        state = self.state
        split = "val" if self.written < self.val_tokens else "train"
        index = sum(s["split"] == split for s in state.shards)
        name = f"{self.prefix}_{split}_{index:06d}.bin"
        write_shard(self.output_dir / name, self.buffer[:self.fill])
        with open(self.output_dir / name, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        docs_before = state.docs_started
        state.docs_done, state.carry, state.last_doc_sha256 = docs_done, carry, sha256_text(last_doc)
        state.shards.append({"name": name, "split": split, "tokens": self.fill,
                             "docs": state.docs_started - docs_before, "sha256": digest})
        self.written += self.fill
        self.fill = 0
        state.save(self.output_dir)


def _skip_written(docs: Iterator[str], state: BuildProgress) -> Iterator[str]:
    """The documents from docs_done on, skipping the written ones untokenized and checking the input is the same."""
    if not state.shards:
        return docs
    last = None
    skipped = 0
    for skipped, last in enumerate(itertools.islice(docs, state.docs_done), 1):
        pass
    if skipped < state.docs_done:
        raise CorpusError(f"the input now has {skipped} documents, fewer than the {state.docs_done} already in "
                          "shards: it changed since the interrupted run; delete the output directory to start again")
    if state.carry:
        last = next(docs, None)
        docs = itertools.chain([last] if last is not None else [], docs)
    if last is None or sha256_text(last) != state.last_doc_sha256:
        raise CorpusError(f"document {state.docs_started - 1} of the input differs from the one the interrupted run "
                          "wrote: the input changed; delete the output directory to start again")
    return docs


def _opened(docs: Iterator[str]) -> Iterator[str]:
    """docs, with its first document already fetched (streams open lazily: this surfaces their errors now)."""
    first = next(docs, None)
    return docs if first is None else itertools.chain([first], docs)


@contextlib.contextmanager
def _locked(output_dir: Path):
    """Hold an exclusive lock on the output directory: a second build of it waits, then sees it complete."""
    with open(output_dir / LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# ----------------------------------------------------------------------------------------------------------------
# The pipeline


@dataclass(frozen=True)
class BuildResult:
    output_dir: Path
    manifest: dict
    resumed_tokens: int  # tokens already in shards when this run started (0: a fresh build)
    new_tokens: int  # tokens written by this run
    seconds: float
    already_complete: bool = False


def build_corpus(source: Source, output_dir: str | Path, *, prefix: str, shard_size: int = DEFAULT_SHARD_SIZE,
                 val_tokens: int = DEFAULT_VAL_TOKENS, workers: int | None = None, chunk_chars: int = CHUNK_CHARS,
                 show_progress: bool = True) -> BuildResult:
    """Tokenize source's documents into shards in output_dir, continuing an interrupted build of the same config."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", prefix):
        raise CorpusError(f"shard prefix {prefix!r} must be letters, digits, '.' and '-' (no '_': the loader finds "
                          "shards by '_train_' and '_val_')")
    if shard_size < 1 or val_tokens < 0:
        raise CorpusError(f"shard size must be >= 1 and val tokens >= 0, got {shard_size} and {val_tokens}")
    workers = workers or available_cpus()
    output_dir = Path(output_dir)
    config = _normalized({"source": source.describe(), "tokenizer": {"name": "gpt2", "ranks_sha256": RANKS_SHA256,
                          "eot_id": EOT_ID}, "prefix": prefix, "shard_size": shard_size, "val_tokens": val_tokens,
                          INPUT_STAT: input_stat(source)})
    created = _make_output_dir(output_dir)
    t0 = time.perf_counter()
    try:
        with _locked(output_dir):
            _check_no_foreign_shards(output_dir, prefix)
            if (output_dir / MANIFEST).exists():
                manifest = _checked_manifest(output_dir, config)
                return BuildResult(output_dir, manifest, sum(s["tokens"] for s in manifest["shards"]), 0, 0.0, True)
            state = _load_progress(output_dir, config, prefix)
            for pattern in (f".{prefix}_*.bin.tmp.*", f".{PROGRESS}.tmp.*", f".{MANIFEST}.tmp.*"):
                for stale in output_dir.glob(pattern):  # left by a killed write (atomic_path's temporary names)
                    stale.unlink()
            state.save(output_dir)  # from now on the directory says how its shards were made
            writer = _ShardWriter(output_dir, prefix, shard_size, val_tokens, state)
            resumed = writer.written
            try:
                _tokenize_into_shards(source, writer, workers, chunk_chars, show_progress)
            except BaseException:
                if not state.shards:  # nothing written (e.g. the source could not be reached): leave no trace
                    (output_dir / PROGRESS).unlink(missing_ok=True)
                raise
            manifest = _manifest(state)
            atomic_write_text(output_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            (output_dir / PROGRESS).unlink()
    except BaseException:
        if created:  # a failed first build leaves no directory behind (nor its lock file)
            _remove_if_only_lock(output_dir)
        raise
    return BuildResult(output_dir, manifest, resumed, writer.written - resumed, time.perf_counter() - t0)


def _tokenize_into_shards(source: Source, writer: _ShardWriter, workers: int, chunk_chars: int,
                          show_progress: bool) -> None:
    state, output_dir = writer.state, writer.output_dir
    resumed = writer.written
    # The pool first, to fork before the source or tqdm start threads; the source next, so that a dataset
    # which cannot be reached fails before a progress bar is drawn.
    with maybe_pool(workers) as pool:
        if state.shards and show_progress:
            print(f"continuing after {len(state.shards)} shards: reading past the {state.docs_done:,} "
                  "documents already in them (without tokenizing them)")
        docs = _opened(_skip_written(iter(source), state))
        with tqdm(desc=f"tokenizing -> {output_dir}", unit="tok", unit_scale=True, initial=resumed,
                  disable=not show_progress) as bar:
            next_doc, start, chunk = state.docs_done, state.carry, None
            text_tokens = 0  # tokens other than the <|endoftext|> before each document
            for docs_, tokens, lengths in tokenized(chunks(docs, chunk_chars), pool, 2 * workers):
                chunk = _Chunk(next_doc, docs_, tokens, np.cumsum(lengths))
                writer.add(chunk, start, progress=bar)
                text_tokens += len(tokens) - len(lengths)
                next_doc, start = next_doc + len(docs_), 0
                bar.set_postfix(docs=next_doc, shards=len(state.shards), refresh=False)
            if resumed == 0 and text_tokens == 0:
                _forget_shards(writer)
                raise CorpusError(f"the input ({source.describe()['kind']}) holds no text ({next_doc} documents, all "
                                  "empty): nothing to tokenize")
            writer.finish(chunk)


def _forget_shards(writer: _ShardWriter) -> None:
    """Delete the shards written so far (a build that turned out to hold no text)."""
    for shard in writer.state.shards:
        (writer.output_dir / shard["name"]).unlink(missing_ok=True)
    writer.state.shards.clear()


def _make_output_dir(output_dir: Path) -> bool:
    """Create the output directory if needed; True when this call created it."""
    if output_dir.exists() and not output_dir.is_dir():
        raise CorpusError(f"output {output_dir} is a file; expected a directory for the shards")
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CorpusError(f"cannot create the output directory {output_dir}: {e.strerror}") from None
    return created


def _remove_if_only_lock(output_dir: Path) -> None:
    if {p.name for p in output_dir.iterdir()} <= {LOCK}:
        (output_dir / LOCK).unlink(missing_ok=True)
        output_dir.rmdir()


# ---- The offline demo corpus ---------------------------------------------------------------------------------


def build_demo_corpus(output_dir: str | Path = DEMO_DIR, workers: int | None = None, files: list[Path] | None = None,
                      shard_size: int = DEMO_SHARD_SIZE, val_tokens: int = DEMO_VAL_TOKENS,
                      show_progress: bool = True) -> Path:
    """A small corpus that needs no network (the stdlib's sources: 5.6M tokens on 3.11); returns at once if built."""
    output_dir = Path(output_dir)
    if not is_complete(output_dir):
        _check_demo_dir(output_dir)
        build_corpus(demo_source(files), output_dir, prefix="demo", shard_size=shard_size, val_tokens=val_tokens,
                     workers=workers, show_progress=show_progress)
    return output_dir


def _belongs_to_demo(name: str) -> bool:
    """A file the demo build writes: its shards, manifest, progress and lock, and their temporary names."""
    return name in (MANIFEST, PROGRESS, LOCK) or name.startswith(("demo_", ".demo_", f".{PROGRESS}.", f".{MANIFEST}."))


def _check_demo_dir(output_dir: Path) -> None:
    """The demo corpus goes only into a missing or empty directory, or one that holds (part of) the demo already:
    built beside a user's own shards, training would mix the two."""
    if not output_dir.is_dir():
        return
    others = sorted(p.name for p in output_dir.iterdir() if not _belongs_to_demo(p.name))
    if others:
        raise CorpusError(f"{output_dir} holds files that are not the demo corpus ({others[0]}, ...): the demo is "
                          "built only into a missing or empty directory (with data.demo=true, choose another "
                          "data.dir, or set data.demo=false to train on the shards there)")
