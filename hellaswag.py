"""HellaSwag accuracy of a checkpoint of this codebase or of OpenAI's GPT-2, in either published style.

    python hellaswag.py --checkpoint runs/gpt2-124M                 # a run folder (its newest checkpoint) or a .pt
    python hellaswag.py --model gpt2 --style harness                # OpenAI's weights, lm-evaluation-harness style
    python hellaswag.py --model gpt2 --data hellaswag_val.jsonl     # rows from a local file instead of the Hub
    torchrun --nproc_per_node=8 hellaswag.py --model gpt2-xl        # examples split over ranks

Published figures for GPT-2 124M: completion style acc 0.2859, acc_norm 0.2955 (build-nanogpt, llm.c); harness style
0.2892 / 0.3114 (lm-evaluation-harness). See pretrain/hellaswag.py for the two styles.
"""

import argparse
import json

from pretrain import checkpoint, distributed, errors, runtime
from pretrain.fileio import atomic_write_text
from pretrain.hellaswag import DATASET, STYLES, HellaSwagUnavailable, load
from pretrain.hellaswag_scoring import evaluate


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hellaswag.py", description=__doc__.split("\n")[0])
    checkpoint.add_model_arguments(parser)
    parser.add_argument("--style", choices=STYLES, default="completion",
                        help="completion: build-nanogpt/llm.c; harness: lm-evaluation-harness (default: completion)")
    parser.add_argument("--data", default="", help=f"a local jsonl of HellaSwag rows (default: the Hugging Face "
                                                   f"dataset {DATASET}, validation split)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N examples only (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward (default: 16)")
    runtime.add_arguments(parser)
    parser.add_argument("--output", help="write the result and the settings to this JSON file")
    args = parser.parse_args(argv)
    if args.limit < 0 or args.batch_size < 1:
        parser.error("--limit must be at least 0 and --batch-size at least 1")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device = runtime.pick_device(args.device, distributed.local_rank())
    dist_info = distributed.setup(device)
    rt = runtime.resolve(device, args.dtype, args.compile, agree=distributed.from_master)
    try:
        data = load(args.data, args.limit, args.style)
    except HellaSwagUnavailable as e:
        raise HellaSwagUnavailable(f"{e}: pass a local copy of its rows with --data FILE.jsonl") from None
    model, meta = checkpoint.load_model(args.checkpoint or args.model, device)
    result = evaluate(rt.maybe_compile(model), data, rt, args.batch_size, progress=dist_info.is_master)
    if dist_info.is_master:
        step = f" at step {meta['step']}" if "step" in meta else ""
        print(f"{args.checkpoint or args.model}{step} | {rt.describe()} x {dist_info.world_size}")
        print(result)
        if args.output:
            settings = {"checkpoint": args.checkpoint, "model": args.model, "step": meta.get("step"),
                        "style": args.style, "data": args.data or DATASET, "limit": args.limit,
                        "batch_size": args.batch_size, "device": str(rt.device),
                        "dtype": str(rt.dtype).removeprefix("torch."), "compile": rt.compile,
                        "world_size": dist_info.world_size}
            record = {"acc": result.acc, "acc_norm": result.acc_norm, "count": result.count, **settings}
            atomic_write_text(args.output, json.dumps(record, indent=2) + "\n")
    distributed.teardown()


if __name__ == "__main__":
    errors.run(main)
