"""fineweb.py and the shard builder: local files -> token shards, determinism, resuming, errors, the demo corpus."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, started

from pretrain import shard_builder, sources
from pretrain.loader import ShardLoader
from pretrain.shard_builder import build_corpus, build_demo_corpus, is_complete
from pretrain.shards import list_shards, read_shard
from pretrain.sources import CorpusError, HubDataset, LocalFiles, resolve_inputs
from pretrain.tokenizer import EOT_ID, decode, get_encoding

REPO = ROOT
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SHARD, VAL = 4000, 10_000  # small shards: val is 4000 + 4000 + 2000 tokens, then train shards


# ---- helpers ----------------------------------------------------------------------------------------------------

def expected_tokens(docs: list[str]) -> np.ndarray:
    """The stream the pipeline must produce, built one document at a time: EOT, then the document's tokens."""
    enc = get_encoding()
    return np.array([t for doc in docs for t in [EOT_ID] + enc.encode_ordinary(doc)], dtype=np.uint16)


def split_tokens(out: Path, split: str) -> np.ndarray:
    return np.concatenate([read_shard(p) for p in list_shards(out, split)])


def all_tokens(out: Path) -> np.ndarray:
    return np.concatenate([split_tokens(out, "val"), split_tokens(out, "train")])


def output_files(out: Path) -> dict[str, bytes]:
    """Every file a build leaves (shards and manifest), by name; the lock file is not output."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != shard_builder.LOCK}


def run_cli(*args, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "fineweb.py"), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def paragraphs(name: str, n: int) -> list[str]:
    return [p for p in (STDLIB / name).read_text(encoding="utf-8").split("\n\n") if p.strip()][:n]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[list[str], list[str]]:
    """(documents in order, --input arguments): .txt files, .jsonl, .jsonl.gz and .parquet."""
    d = tmp_path_factory.mktemp("inputs")
    txt_docs = ["héllo wörld ✓ 日本語\r\nkeeps its CRLF", "", (STDLIB / "textwrap.py").read_text(encoding="utf-8")]
    for i, doc in enumerate(txt_docs):
        (d / f"doc_{i:02d}.txt").write_bytes(doc.encode("utf-8"))
    jsonl_docs = paragraphs("argparse.py", 60) + ["a literal <|endoftext|> is plain text here"]
    lines = [json.dumps({"id": i, "text": doc}) for i, doc in enumerate(jsonl_docs)]
    (d / "b.jsonl").write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n")  # a blank line is skipped
    gz_docs = paragraphs("json/decoder.py", 30)
    with gzip.open(d / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in gz_docs)
    pq_docs = paragraphs("shutil.py", 40)
    pq.write_table(pa.table({"id": list(range(len(pq_docs))), "text": pq_docs}), d / "d.parquet", row_group_size=7)
    docs = txt_docs + jsonl_docs + gz_docs + pq_docs
    return docs, [str(d / "doc_*.txt"), str(d / "b.jsonl"), str(d / "c.jsonl.gz"), str(d / "d.parquet")]


@pytest.fixture(scope="module")
def cli_run(inputs, tmp_path_factory) -> Path:
    """The real CLI, 2 workers, on the local inputs."""
    out = tmp_path_factory.mktemp("cli") / "shards"
    _, args = inputs
    proc = run_cli("--input", *args, "--output", out, "--shard-size", SHARD, "--val-tokens", VAL, "--workers", 2,
                   "--prefix", "demo")
    assert "tokens/s" in proc.stdout and "train:" in proc.stdout
    return out


# ---- the pipeline -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_shards_hold_every_document_in_order(inputs, cli_run):
    docs, _ = inputs
    tokens = all_tokens(cli_run)
    assert tokens.dtype == np.uint16
    np.testing.assert_array_equal(tokens, expected_tokens(docs))
    assert (tokens == EOT_ID).sum() == len(docs)  # the literal "<|endoftext|>" text is not the special token
    assert decode(tokens) == "".join("<|endoftext|>" + doc for doc in docs)

    val = [len(read_shard(p)) for p in list_shards(cli_run, "val")]
    train = [len(read_shard(p)) for p in list_shards(cli_run, "train")]
    assert val == [SHARD, SHARD, VAL - 2 * SHARD]
    assert len(train) >= 2 and all(n == SHARD for n in train[:-1]) and 0 < train[-1] <= SHARD
    assert [p.name for p in list_shards(cli_run, "train")][:2] == ["demo_train_000000.bin", "demo_train_000001.bin"]


@pytest.mark.slow
def test_manifest_matches_the_files(inputs, cli_run):
    docs, _ = inputs
    manifest = json.loads((cli_run / "manifest.json").read_text())
    assert not (cli_run / shard_builder.PROGRESS).exists()
    shard_files = sorted(p.name for p in cli_run.glob("*.bin"))
    assert sorted(s["name"] for s in manifest["shards"]) == shard_files
    for shard in manifest["shards"]:
        path = cli_run / shard["name"]
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert shard["tokens"] == len(read_shard(path))
    stream = expected_tokens(docs)
    assert manifest["splits"]["val"] == {"shards": 3, "tokens": VAL, "docs": int((stream[:VAL] == EOT_ID).sum())}
    assert manifest["splits"]["train"]["tokens"] == len(stream) - VAL
    assert manifest["splits"]["val"]["docs"] + manifest["splits"]["train"]["docs"] == len(docs)
    ranks = (REPO / "pretrain/assets/gpt2.tiktoken").read_bytes()
    assert manifest["tokenizer"]["ranks_sha256"] == hashlib.sha256(ranks).hexdigest()
    assert manifest["shard_size"] == SHARD and manifest["source"]["kind"] == "files"


@pytest.mark.slow
def test_worker_count_does_not_change_the_output(inputs, cli_run, tmp_path):
    _, args = inputs
    source = LocalFiles(tuple(resolve_inputs(args)))
    for workers in (1, 2):  # tiny chunks: many tasks in flight, shard boundaries inside and across chunks
        build_corpus(source, tmp_path / str(workers), prefix="demo", shard_size=SHARD, val_tokens=VAL,
                     workers=workers, chunk_chars=3000, show_progress=False)
    assert output_files(tmp_path / "1") == output_files(tmp_path / "2") == output_files(cli_run)


@pytest.mark.slow
def test_spawned_workers_give_the_same_output(inputs, cli_run, tmp_path):
    _, args = inputs
    argv = ["--input", *args, "--output", str(tmp_path), "--shard-size", str(SHARD), "--val-tokens", str(VAL),
            "--workers", "2", "--prefix", "demo"]
    code = ("import multiprocessing, sys; multiprocessing.set_start_method('spawn'); import fineweb; "
            f"sys.exit(fineweb.main({argv!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert output_files(tmp_path) == output_files(cli_run)


@pytest.mark.slow
def test_shard_loader_reads_the_text_back(inputs, cli_run):
    docs, _ = inputs
    B, T = 2, 64
    loader = ShardLoader(cli_run, "train", B, T, shuffle=False)
    stream = expected_tokens(docs)[VAL:]
    steps = (len(stream) - 1) // (B * T)
    xs = []
    for _ in range(steps):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T)
        assert np.array_equal(x.numpy().ravel()[1:], y.numpy().ravel()[:-1])
        xs.append(x.numpy().ravel())
    got = np.concatenate(xs)
    np.testing.assert_array_equal(got, stream[:len(got)])
    assert decode(got) in "".join("<|endoftext|>" + doc for doc in docs)


# ---- resuming ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_killed_run_resumes_byte_identical(tmp_path):
    """SIGKILL a CLI run mid-stream (its input is a FIFO, so it cannot finish first), then run it again."""
    docs = [p.read_text(encoding="utf-8") for p in sources.stdlib_sources()[:300]]
    lines = [json.dumps({"text": doc}) + "\n" for doc in docs]
    sizes = np.cumsum([len(line) for line in lines])
    cut = int(np.searchsorted(sizes, 1_300_000))  # > 4 tasks in flight of CHUNK_CHARS: shards get written
    docs, lines = docs[:int(np.searchsorted(sizes, 2_000_000))], lines[:int(np.searchsorted(sizes, 2_000_000))]
    fifo, out = tmp_path / "in.jsonl", tmp_path / "out"
    os.mkfifo(fifo)
    args = ["--input", fifo, "--output", out, "--shard-size", 20_000, "--val-tokens", 50_000, "--workers", 2]
    errors = tmp_path / "stderr.txt"  # a file, not a pipe: reading a pipe of a live child could block forever
    with open(errors, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(REPO / "fineweb.py"), *map(str, args)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.time() + 60
        while True:  # open the FIFO once the reader has: O_NONBLOCK fails with ENXIO until then
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, errors.read_text()
                time.sleep(0.05)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "w") as f:
            f.writelines(lines[:cut])
            f.flush()
            while not (out / shard_builder.PROGRESS).exists() or \
                    len(json.loads((out / shard_builder.PROGRESS).read_text())["shards"]) < 4:
                assert proc.poll() is None and time.time() < deadline, errors.read_text()
                time.sleep(0.05)
            proc.kill()
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "manifest.json").exists()
    partial = json.loads((out / shard_builder.PROGRESS).read_text())
    assert partial["docs_done"] < cut

    fifo.unlink()
    fifo.write_text("".join(lines))
    (out / ".corpus_train_000099.bin.tmp.4242").write_bytes(b"half a shard")  # as a killed write leaves it
    resumed = run_cli(*args)
    assert "continued" in resumed.stdout
    reference = build_corpus(LocalFiles((fifo,)), tmp_path / "ref", prefix="corpus", shard_size=20_000,
                             val_tokens=50_000, workers=1, show_progress=False)
    assert output_files(out) == output_files(reference.output_dir)
    assert not list(out.glob(".*.tmp.*"))
    np.testing.assert_array_equal(all_tokens(out), expected_tokens(docs))


@pytest.mark.slow
def test_crash_between_shard_and_progress_resumes_byte_identical(inputs, cli_run, tmp_path, monkeypatch):
    _, args = inputs
    source = LocalFiles(tuple(resolve_inputs(args)))
    # Saves: the start, then shards 1-4; the 5th shard is written, then the crash comes before it is recorded.
    monkeypatch.setattr(shard_builder.BuildProgress, "save", _fail_after(5, shard_builder.BuildProgress.save))
    with pytest.raises(KeyboardInterrupt):
        build_corpus(source, tmp_path, prefix="demo", shard_size=SHARD, val_tokens=VAL, workers=2, chunk_chars=3000,
                     show_progress=False)
    monkeypatch.undo()
    assert len(json.loads((tmp_path / shard_builder.PROGRESS).read_text())["shards"]) == 4
    assert (tmp_path / "demo_train_000001.bin").exists()  # the 5th shard, on disk but not in the progress

    with pytest.raises(CorpusError, match="shard_size"):  # other arguments: refused, nothing touched
        build_corpus(source, tmp_path, prefix="demo", shard_size=SHARD * 2, val_tokens=VAL, show_progress=False)
    result = build_corpus(source, tmp_path, prefix="demo", shard_size=SHARD, val_tokens=VAL, workers=1,
                          show_progress=False)
    assert result.resumed_tokens == 4 * SHARD - 2000 and not result.already_complete
    assert output_files(tmp_path) == output_files(cli_run)

    again = build_corpus(source, tmp_path, prefix="demo", shard_size=SHARD, val_tokens=VAL, show_progress=False)
    assert again.already_complete
    with pytest.raises(CorpusError, match="val_tokens"):
        build_corpus(source, tmp_path, prefix="demo", shard_size=SHARD, val_tokens=VAL + 1, show_progress=False)


def test_resume_refuses_changed_input(tmp_path, monkeypatch):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " * 50}) + "\n" for i in range(40)))
    monkeypatch.setattr(shard_builder.BuildProgress, "save", _fail_after(3, shard_builder.BuildProgress.save))
    with pytest.raises(KeyboardInterrupt):
        build_corpus(LocalFiles((src,)), tmp_path / "out", prefix="x", shard_size=500, val_tokens=0,
                     show_progress=False, workers=1)
    monkeypatch.undo()
    src.write_text(src.read_text().replace("document", "Document"))
    with pytest.raises(CorpusError, match="input changed"):
        build_corpus(LocalFiles((src,)), tmp_path / "out", prefix="x", shard_size=500, val_tokens=0,
                     show_progress=False, workers=1)


def _fail_after(n: int, save):
    calls = []

    def failing(self, output_dir):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt
        save(self, output_dir)
    return failing


# ---- errors -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl, line 3: not valid JSON.*one JSON object per line"):
        list(LocalFiles((bad,)))
    proc = run_cli("--input", bad, "--output", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {bad}, line 3: not valid JSON (Expecting value at column "
                                                    "10); expected one JSON object per line")


def test_missing_field_names_file_and_line(tmp_path):
    gz = tmp_path / "docs.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(CorpusError, match=r"docs\.jsonl\.gz, line 2: expected a JSON object with a string 'text'"):
        list(LocalFiles((gz,)))
    other = tmp_path / "num.jsonl"
    other.write_text('{"content": 5}\n')
    with pytest.raises(CorpusError, match=r"num\.jsonl, line 1: field 'content' is int, expected a string"):
        list(LocalFiles((other,), text_field="content"))
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"]}), table)
    with pytest.raises(CorpusError, match=r"t\.parquet: no column 'text'; it has \['body'\]"):
        list(LocalFiles((table,)))


def test_unmatched_glob_and_missing_file_are_named(tmp_path):
    with pytest.raises(CorpusError, match=r"nothing-\*\.jsonl' matches no files"):
        resolve_inputs([str(tmp_path / "nothing-*.jsonl")])
    with pytest.raises(CorpusError, match=r"absent\.txt' does not exist"):
        resolve_inputs([str(tmp_path / "absent.txt")])
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"notes\.csv: unsupported input type"):
        resolve_inputs([str(tmp_path / "*.csv")])


@pytest.mark.slow
def test_offline_hub_is_one_sentence(tmp_path):
    proc = run_cli("--output", tmp_path / "out", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
                   check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "could not reach the Hugging Face Hub" in lines[0] and "HuggingFaceFW/fineweb-edu" in lines[0]
    assert "--input" in lines[0]
    # Nothing was written, so nothing is left to stand in the way of the next run with other arguments.
    assert not list((tmp_path / "out").glob("*.bin")) and not list((tmp_path / "out").glob("*.json"))


def test_hub_source_streams_a_local_dataset(tmp_path):
    """The datasets code path, offline: load_dataset streams a local parquet directory like a Hub dataset."""
    docs = [f"row {i} " * (i % 7 + 1) for i in range(30)]
    pq.write_table(pa.table({"id": list(range(30)), "text": docs}), tmp_path / "train-00000.parquet",
                   row_group_size=8)
    assert list(HubDataset(str(tmp_path), None, "train")) == docs
    with pytest.raises(CorpusError, match="'content'"):
        next(iter(HubDataset(str(tmp_path), None, "train", text_field="content")))


# ---- the demo corpus --------------------------------------------------------------------------------------------

def test_demo_corpus_from_a_few_files(tmp_path, monkeypatch):
    everything = [p.relative_to(STDLIB) for p in sources.stdlib_sources()]
    assert len(everything) > 500 and everything == sorted(everything, key=Path.as_posix)
    assert not [p for p in everything if {"test", "tests", "site-packages"} & set(p.parts[:-1])
                or p.name.startswith("_sysconfigdata") or p.parts[0].startswith("config-")]
    files = sources.stdlib_sources()[:12]
    out = build_demo_corpus(tmp_path / "demo", workers=1, files=files, shard_size=5000, val_tokens=3000,
                            show_progress=False)
    assert is_complete(out)
    docs = [p.read_text(encoding="utf-8") for p in files]
    np.testing.assert_array_equal(all_tokens(out), expected_tokens(docs))
    assert len(read_shard(list_shards(out, "val")[0])) == 3000

    monkeypatch.setattr(shard_builder, "build_corpus", lambda *a, **k: pytest.fail("rebuilt a complete corpus"))
    assert build_demo_corpus(out, files=files) == out  # complete: returns without building
    list_shards(out, "train")[0].unlink()
    assert not is_complete(out)


@pytest.mark.slow
def test_full_demo_corpus(tmp_path):
    """The real --demo build (about 5 s here): the stdlib sources, a few million tokens."""
    out = build_demo_corpus(tmp_path / "demo", show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert 3_000_000 < sum(s["tokens"] for s in manifest["shards"]) < 10_000_000
    assert manifest["splits"]["val"]["tokens"] == shard_builder.DEMO_VAL_TOKENS
    assert manifest["splits"]["train"]["docs"] > 500
    train = [s["tokens"] for s in manifest["shards"] if s["split"] == "train"]
    assert all(n == shard_builder.DEMO_SHARD_SIZE for n in train[:-1])
    assert 0 < train[-1] <= shard_builder.DEMO_SHARD_SIZE


# ---- interrupting a build never hangs -----------------------------------------------------------------------------

@pytest.mark.slow
def test_interrupting_a_multi_worker_build_always_finishes(inputs, tmp_path, monkeypatch):
    """An error or Ctrl-C while the workers are busy shuts the pool down promptly, every time, at any point."""
    _, args = inputs
    source = LocalFiles(tuple(resolve_inputs(args)))
    add = shard_builder._ShardWriter.add
    for attempt in range(12):
        calls = 0

        def interrupted_add(self, chunk, start=0, progress=None, after=attempt % 6):
            nonlocal calls
            calls += 1
            if calls > after:
                raise KeyboardInterrupt
            add(self, chunk, start, progress)

        monkeypatch.setattr(shard_builder._ShardWriter, "add", interrupted_add)
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            build_corpus(source, tmp_path / str(attempt), prefix="demo", shard_size=SHARD, val_tokens=VAL, workers=2,
                         chunk_chars=500, show_progress=False)
        assert time.monotonic() - started < 30, f"attempt {attempt}: the interrupted build took too long to stop"


@pytest.mark.slow
def test_ctrl_c_during_a_cli_build_exits_promptly(tmp_path):
    """SIGINT to a running 2-worker build, several times: each exits 130 with one line, no traceback."""
    # ~70M tokens of random letters: ~9 s of tokenizing on a quiet machine, so every signal lands mid-build (the
    # demo corpus took 1.5 s there, and a signal after it had finished found nothing to interrupt)
    rng = np.random.default_rng(0)
    docs = [json.dumps({"text": "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz    "), 12000))}) for _ in range(20)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(docs * 500) + "\n")
    for attempt in range(4):
        log = tmp_path / f"out{attempt}.txt"
        with started("fineweb.py", "--input", corpus, "--output", tmp_path / str(attempt), "--workers", "2",
                     "--shard-size", "200000", log=log) as proc:
            deadline = time.monotonic() + 60
            while "docs=" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.15 * attempt)  # interrupt at different points of the build
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=30)
        text = log.read_text()
        assert code == 130, text
        assert "run the same command again" in text
        assert "Traceback" not in text
