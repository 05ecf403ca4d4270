"""Tokenize a text corpus into GPT-2 token shards for training.

    python fineweb.py                                  # FineWeb-Edu sample-10BT -> data/fineweb-edu-sample-10BT
    python fineweb.py --name sample-100BT              # another config
    python fineweb.py --dataset HuggingFaceFW/fineweb --name sample-10BT
    python fineweb.py --input 'docs/*.jsonl.gz' --output data/mydocs   # local files, no network
    python fineweb.py --demo                           # the offline demo corpus (stdlib sources) -> data/demo

Interrupted? Run the same command again: it continues after the last complete shard.
"""

import argparse
import math
import os
import re
import sys
from pathlib import Path

from pretrain import errors
from pretrain.shard_builder import (
    BYTES_PER_TOKEN,
    DEFAULT_SHARD_SIZE,
    DEFAULT_VAL_TOKENS,
    DEMO_DIR,
    DEMO_SHARD_SIZE,
    DEMO_VAL_TOKENS,
    BuildResult,
    available_cpus,
    build_corpus,
    local_val_tokens,
)
from pretrain.sources import CorpusError, HubDataset, LocalFiles, demo_source, resolve_inputs

DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_CONFIG = "sample-10BT"
SAMPLE_TOKENS = {"sample-10BT": 10e9, "sample-100BT": 100e9, "sample-350BT": 350e9}  # FineWeb-Edu's samples, roughly
MIN_SHARD_SIZE = 1_000  # tokens: below this a shard's 1 KB header outweighs its tokens
MAX_SHARDS = 10_000  # more files than this is a --shard-size typed wrong, not a corpus anyone wants
# build-nanogpt's shard names for the two FineWeb datasets; other datasets use their own name.
PREFIXES = {"fineweb-edu": "edufineweb", "fineweb": "fineweb"}
# Keep stderr for our own one-line errors: no retry warnings or progress bars from datasets/huggingface_hub.
# They read these when first imported (corpus imports datasets lazily); the user's own settings win.
QUIET_HUB = {"DATASETS_VERBOSITY": "error", "HF_HUB_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def token_count(text: str) -> int:
    """'100M', '250k', '1e8' or '100_000_000' -> an int."""
    match = re.fullmatch(r"([0-9_.eE+]+)([kKmMbB]?)", text.strip())
    try:
        value = float(match[1]) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[match[2].lower()]
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 100M, 250k, 1000000)") from None
    if value != int(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole, non-negative number of tokens")
    return int(value)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source (default: the Hugging Face dataset)")
    src.add_argument("--dataset",
                     help=f"Hugging Face dataset, or a local dataset directory (default {DEFAULT_DATASET})")
    src.add_argument("--name", "--config", dest="config", help=f"dataset config (default {DEFAULT_CONFIG})")
    src.add_argument("--split", default="train", help="dataset split (default train)")
    src.add_argument("--input", nargs="+", action="extend", metavar="FILE_OR_GLOB",
                     help="local files instead: .txt (one document per file), .jsonl, .jsonl.gz, .parquet")
    src.add_argument("--text-field", default="text", help="the text field of jsonl/parquet/dataset records")
    src.add_argument("--demo", action="store_true", help="build the offline demo corpus from the stdlib's sources")
    out = p.add_argument_group("output")
    out.add_argument("--output", type=Path, help="shard directory (default data/<dataset>-<config>, data/demo)")
    out.add_argument("--prefix", help="shard name prefix: <prefix>_val_000000.bin (default from the dataset)")
    out.add_argument("--shard-size", type=token_count, help=f"tokens per shard (default {DEFAULT_SHARD_SIZE:,}; "
                     f"--demo {DEMO_SHARD_SIZE:,})")
    out.add_argument("--val-tokens", type=token_count, help=f"first tokens that go to val shards (default "
                     f"{DEFAULT_VAL_TOKENS:,}; --demo {DEMO_VAL_TOKENS:,}; --input: about a tenth of a smaller input)")
    p.add_argument("--workers", type=int, default=available_cpus(), help="tokenizer processes (default: all cores)")
    args = p.parse_args(argv)
    if args.demo + bool(args.input) + bool(args.dataset or args.config) > 1:
        p.error("choose one source: --dataset/--name, --input or --demo")
    if args.input and args.output is None:
        p.error("--input needs --output (the shard directory)")
    if args.shard_size is not None and args.shard_size < MIN_SHARD_SIZE:  # the parser already refuses negatives
        p.error(f"--shard-size must be at least {MIN_SHARD_SIZE:,} tokens (default {DEFAULT_SHARD_SIZE:,})")
    if args.workers < 1:
        p.error(f"--workers must be at least 1 (default: all {available_cpus()} cores)")
    return args


def expected_tokens(args: argparse.Namespace, source) -> float | None:
    """About how many tokens the source holds: local files from their size, FineWeb's samples by name; else None."""
    if args.demo or args.input:
        return sum(p.stat().st_size for p in source.paths) / BYTES_PER_TOKEN
    return SAMPLE_TOKENS.get(source.config) if source.name == DEFAULT_DATASET else None


def check_shard_count(shard_size: int, tokens: float | None) -> None:
    """A shard size that would write more than MAX_SHARDS files is refused (before anything is written)."""
    if tokens is not None and tokens / shard_size > MAX_SHARDS:
        raise CorpusError(f"--shard-size {shard_size:,} would write about {tokens / shard_size:,.0f} shards for this "
                          f"input (~{tokens:,.0f} tokens): use at least {math.ceil(tokens / MAX_SHARDS):,} tokens per "
                          f"shard (the default is {DEFAULT_SHARD_SIZE:,})")


def make_source(args: argparse.Namespace):
    """The document source, the output directory and the shard prefix the arguments ask for."""
    if args.demo:
        return demo_source(), args.output or DEMO_DIR, args.prefix or "demo"
    if args.input:
        return LocalFiles(tuple(resolve_inputs(args.input)), args.text_field), args.output, args.prefix or "corpus"
    dataset, config = args.dataset or DEFAULT_DATASET, args.config
    if not args.dataset:
        config = config or DEFAULT_CONFIG
    base = Path(dataset.rstrip("/")).name
    output = args.output or Path("data") / (f"{base}-{config}" if config else base)
    prefix = args.prefix or PREFIXES.get(base.lower(), re.sub(r"[^A-Za-z0-9.-]", "", base.lower()) or "corpus")
    return HubDataset(dataset, config, args.split, args.text_field), output, prefix


def default_val_tokens(args: argparse.Namespace, source) -> int:
    if args.demo:
        return DEMO_VAL_TOKENS
    if args.input:  # a small local corpus gets a fraction for validation, not everything
        return local_val_tokens(source.paths)
    return DEFAULT_VAL_TOKENS


def print_summary(result: BuildResult) -> None:
    m = result.manifest
    if result.already_complete:
        print(f"{result.output_dir} is already complete")
    elif result.resumed_tokens:
        print(f"continued an interrupted build after {result.resumed_tokens:,} tokens")
    for split, s in m["splits"].items():
        print(f"{split:>5}: {s['shards']} shards, {s['tokens']:,} tokens, {s['docs']:,} docs")
    if not result.already_complete:
        rate = result.new_tokens / max(result.seconds, 1e-9)
        print(f"wrote {result.new_tokens:,} tokens in {result.seconds:.1f} s ({rate:,.0f} tokens/s) "
              f"to {result.output_dir} (manifest.json lists every shard)")
    if m["splits"]["train"]["shards"] == 0:
        print("warning: no train shards: the whole input fits in --val-tokens", file=sys.stderr)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    for var, value in QUIET_HUB.items():
        os.environ.setdefault(var, value)
    try:
        source, output, prefix = make_source(args)
        shard_size = args.shard_size
        if shard_size is None:
            shard_size = DEMO_SHARD_SIZE if args.demo else DEFAULT_SHARD_SIZE
        check_shard_count(shard_size, expected_tokens(args, source))
        val_tokens = args.val_tokens
        if val_tokens is None:
            val_tokens = default_val_tokens(args, source)
        print(f"source: {source.describe()}\noutput: {output} ({prefix}_*.bin, {shard_size:,} tokens per shard, "
              f"{val_tokens:,} val tokens, {args.workers} workers)")
        result = build_corpus(source, output, prefix=prefix, shard_size=shard_size, val_tokens=val_tokens,
                              workers=args.workers)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue after the last complete shard", file=sys.stderr)
        return 130
    print_summary(result)
    return 0


if __name__ == "__main__":
    errors.run(main)
