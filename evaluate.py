"""Evaluate a checkpoint of this codebase or OpenAI's GPT-2: the DCLM CORE metric, HellaSwag and bits per byte.

    python evaluate.py --checkpoint runs/gpt2-124M                   # CORE; the eval bundle downloads once
    python evaluate.py --model gpt2 --bundle ~/eval_bundle           # a bundle unzipped by hand (no network)
    python evaluate.py --model gpt2 --tasks core,bpb --data-dir data/fineweb-edu-sample-10BT --output gpt2.json
    torchrun --nproc_per_node=8 evaluate.py --model gpt2-xl          # items split over ranks, counts summed

CORE is computed as nanochat computes it (docs/eval.md); its figure for GPT-2 124M is 0.1139.
"""

import argparse
import json

from pretrain import bpb, checkpoint, distributed, errors, runtime
from pretrain.core_bundle import EVAL_BUNDLE_URL
from pretrain.core_eval import evaluate_core, load_core
from pretrain.fileio import atomic_write_text
from pretrain.hellaswag import DATASET, HellaSwagUnavailable
from pretrain.hellaswag import load as load_hellaswag
from pretrain.hellaswag_scoring import evaluate as evaluate_hellaswag

TASKS = ("core", "hellaswag", "bpb")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    checkpoint.add_model_arguments(parser)
    parser.add_argument("--tasks", default="core", help=f"comma-separated, any of {', '.join(TASKS)} (default: core)")
    parser.add_argument("--max-per-task", type=int, default=0,
                        help="CORE: the first N items of each task after nanochat's shuffle; HellaSwag: the first N "
                             "examples (default: all)")
    parser.add_argument("--bundle", default="", help="the unzipped CORE eval bundle (the folder holding core.yaml); "
                                                     "default: a cached download")
    parser.add_argument("--bundle-url", default=EVAL_BUNDLE_URL, help="where the bundle downloads from (default: "
                                                                      "nanochat's)")
    parser.add_argument("--hellaswag-data", default="", help=f"a local jsonl of HellaSwag rows (default: the Hugging "
                                                             f"Face dataset {DATASET}); completion style")
    parser.add_argument("--data-dir", default="", help="bpb: the folder of the token shards (its val split)")
    parser.add_argument("--bpb-tokens", type=int, default=1 << 20,
                        help="bpb: this many val tokens, from the start of the split (default: 1,048,576)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="rows of block_size tokens per forward (CORE packs more of shorter rows); HellaSwag: "
                             "examples per forward (default: 16)")
    runtime.add_arguments(parser)
    parser.add_argument("--output", help="write the results and the settings to this JSON file")
    args = parser.parse_args(argv)
    args.tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    unknown = [task for task in args.tasks if task not in TASKS]
    if unknown or not args.tasks:
        parser.error(f"--tasks {','.join(unknown) or '(none)'}: expected any of {', '.join(TASKS)}")
    if "bpb" in args.tasks and not args.data_dir:
        parser.error("--tasks bpb needs --data-dir, the folder of the token shards")
    if args.max_per_task < 0 or args.batch_size < 1 or args.bpb_tokens < 1:
        parser.error("--max-per-task must be at least 0, --batch-size and --bpb-tokens at least 1")
    return args


def core_record(result) -> dict:
    tasks = {task.label: {"type": task.task_type, "num_fewshot": task.num_fewshot, "count": task.count,
                          "accuracy": task.accuracy, "centered": task.centered, "baseline": task.baseline}
             for task in result.tasks}
    return {"core": result.core, "tasks": tasks}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device = runtime.pick_device(args.device, distributed.local_rank())
    dist_info = distributed.setup(device)
    rt = runtime.resolve(device, args.dtype, args.compile, agree=distributed.from_master)
    # Data before the model: a missing bundle or file fails in a second, not after loading weights.
    core_data = load_core(args.bundle or None, args.max_per_task, args.bundle_url) if "core" in args.tasks else None
    hellaswag_data = None
    if "hellaswag" in args.tasks:
        try:
            hellaswag_data = load_hellaswag(args.hellaswag_data, args.max_per_task, "completion")
        except HellaSwagUnavailable as e:
            raise HellaSwagUnavailable(f"{e}: pass a local copy of its rows with --hellaswag-data FILE.jsonl") \
                from None
    model, meta = checkpoint.load_model(args.checkpoint or args.model, device)
    model = rt.maybe_compile(model)
    master = dist_info.is_master
    if master:
        step = f" at step {meta['step']}" if "step" in meta else ""
        print(f"{args.checkpoint or args.model}{step} | {rt.describe()} x {dist_info.world_size}")
    record = {}
    if core_data is not None:
        result = evaluate_core(model, core_data, rt, args.batch_size, progress=master)
        record["core"] = core_record(result)
        if master:
            print(f"CORE ({core_data.bundle}):\n{result.table()}")
    if hellaswag_data is not None:
        result = evaluate_hellaswag(model, hellaswag_data, rt, args.batch_size, progress=master)
        record["hellaswag"] = {"acc": result.acc, "acc_norm": result.acc_norm, "count": result.count,
                               "style": result.style}
        if master:
            print(result)
    if "bpb" in args.tasks:
        result = bpb.measure(model, args.data_dir, args.bpb_tokens, rt, args.batch_size)
        record["bpb"] = {"bpb": result.bpb, "tokens": result.tokens, "bytes": result.bytes, "loss": result.loss}
        if master:
            print(result)
    if master and args.output:
        record["settings"] = {
            "checkpoint": args.checkpoint, "model": args.model, "step": meta.get("step"), "tasks": args.tasks,
            "max_per_task": args.max_per_task, "bundle": str(core_data.bundle) if core_data else None,
            "hellaswag_data": (args.hellaswag_data or DATASET) if hellaswag_data else None,
            "data_dir": args.data_dir or None, "bpb_tokens": args.bpb_tokens if "bpb" in args.tasks else None,
            "batch_size": args.batch_size, "device": str(rt.device),
            "dtype": str(rt.dtype).removeprefix("torch."), "compile": rt.compile,
            "world_size": dist_info.world_size}
        atomic_write_text(args.output, json.dumps(record, indent=2) + "\n")
    distributed.teardown()


if __name__ == "__main__":
    errors.run(main)
