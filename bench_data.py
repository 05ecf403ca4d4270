"""Benchmark the data path: the tokenize-and-shard pipeline, and the training loader.

    python bench_data.py                      # the stdlib sources (~5.6M tokens), ~30 s on 2 cores
    python bench_data.py --files 200 --batches 50   # smaller and quicker
    python bench_data.py --shards data/demo         # only the loader, on shards you already have

Both parts print a ratio of two things measured in the same run, since absolute numbers on a shared machine
drift from one minute to the next:
  1. pipeline tokens/s (build_corpus: read, tokenize in --workers processes, write shards) against a plain
     one-document-at-a-time enc.encode_ordinary(doc) loop in one process over the same documents (in memory);
  2. ShardLoader batches/s at the 124M micro-batch shape (B=64, T=1024), shuffled (documents over the whole split,
     each row from its own lane), against the same loader reading the shards in order; and against what one GPU
     of an 8xH100 124M run consumes (~0.5M tokens/s).
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from pretrain import errors
from pretrain.loader import ShardLoader
from pretrain.shard_builder import available_cpus, build_corpus
from pretrain.sources import demo_source, stdlib_sources
from pretrain.tokenizer import get_encoding


def bench_pipeline(files: list[Path], workers: int, repeats: int, out_dir: Path) -> Path:
    """Print the rates (best of `repeats`, the runs interleaved so that load from others hits all alike)."""
    docs = [p.read_bytes().decode("utf-8") for p in files]
    enc = get_encoding()
    n_tokens = sum(len(doc) + 1 for doc in enc.encode_ordinary_batch(docs))  # +1: each document's <|endoftext|>
    best = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        for doc in docs:
            enc.encode_ordinary(doc)
        best["plain"] = max(best.get("plain", 0.0), n_tokens / (time.perf_counter() - t0))
        for n in sorted({1, workers}):  # 1 worker: the pipeline's own overhead; all: its parallel speed-up
            shutil.rmtree(out_dir / str(n), ignore_errors=True)
            result = build_corpus(demo_source(files), out_dir / str(n), prefix="bench", shard_size=1_000_000,
                                  val_tokens=0, workers=n, show_progress=False)
            assert result.new_tokens == n_tokens, "the pipeline and the plain loop disagree on the token count"
            best[n] = max(best.get(n, 0.0), result.new_tokens / result.seconds)
    print(f"[pipeline] {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} M chars, {n_tokens:,} tokens, "
          f"best of {repeats}")
    print(f"  plain encode_ordinary loop, 1 process: {best['plain']:12,.0f} tokens/s")
    for n in sorted({1, workers}):
        print(f"  build_corpus, {n:2d} worker(s), with I/O: {best[n]:12,.0f} tokens/s  "
              f"({best[n] / best['plain']:.2f}x the loop)")
    return out_dir / str(workers)


GPU_NEED = 3.7e6 / 8  # tokens/s one GPU of an 8xH100 124M run consumes at most (~0.14 s per 2**19-token step)


def loader_rate(data_dir: Path, batch_size: int, seq_len: int, shuffle: bool, batches: int) -> tuple[float, float]:
    """Batches/s after the first batch, and the seconds the first batch took (for a shuffled loader, finding
    every document of the split and laying out the epoch)."""
    loader = ShardLoader(data_dir, "train", batch_size, seq_len, shuffle=shuffle)
    t0 = time.perf_counter()
    loader.next_batch()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return batches / (time.perf_counter() - t0), first


def bench_loader(data_dir: Path, batch_size: int, seq_len: int, batches: int, repeats: int) -> None:
    best = {True: (0.0, float("inf")), False: (0.0, float("inf"))}  # (highest rate, shortest first batch)
    for _ in range(repeats):  # interleaved, the best counts: load from others hits both alike
        for shuffle in (True, False):
            rate, first = loader_rate(data_dir, batch_size, seq_len, shuffle, batches)
            best[shuffle] = (max(best[shuffle][0], rate), min(best[shuffle][1], first))
    (shuffled, index_s), (ordered, _) = best[True], best[False]
    tokens = batch_size * seq_len
    print(f"[loader] B={batch_size}, T={seq_len}, {batches} batches, best of {repeats}")
    print(f"  shuffled:  {shuffled:8.1f} batches/s  {shuffled * tokens:14,.0f} tokens/s  "
          f"({shuffled * tokens / GPU_NEED:.0f}x what one GPU of an 8xH100 124M run needs)")
    print(f"  in order:  {ordered:8.1f} batches/s  {ordered * tokens:14,.0f} tokens/s")
    print(f"  shuffled / in order: {shuffled / ordered:.2f}")
    print(f"  shuffled, first batch (index the split's documents, lay out the epoch): {index_s:.2f} s")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=None, help="use the first N stdlib files (default: all)")
    p.add_argument("--workers", type=int, default=available_cpus(), help="pipeline workers (default: all cores)")
    p.add_argument("--repeats", type=int, default=3, help="runs per variant (pipeline and loader); the best counts")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batches", type=int, default=200, help="loader batches timed per mode")
    p.add_argument("--shards", type=Path, default=None, help="time only the loader, on this folder's train shards")
    args = p.parse_args(argv)
    if args.shards:
        bench_loader(args.shards, args.batch_size, args.seq_len, args.batches, args.repeats)
        return
    files = stdlib_sources()[:args.files]
    with tempfile.TemporaryDirectory() as tmp:
        shards = bench_pipeline(files, args.workers, args.repeats, Path(tmp))
        bench_loader(shards, args.batch_size, args.seq_len, args.batches, args.repeats)


if __name__ == "__main__":
    errors.run(main)
