"""Export a training checkpoint as a Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer files).

    python export_hf.py --checkpoint runs/gpt2-124M --out exports/gpt2-124M    # a run folder: its newest checkpoint
    python export_hf.py --checkpoint runs/gpt2-124M/ckpt_019073.pt --out exports/gpt2-124M

The folder loads with transformers.GPT2LMHeadModel.from_pretrained / AutoTokenizer.from_pretrained (so
lm-evaluation-harness can evaluate it: --model hf --model_args pretrained=exports/gpt2-124M), and back into our
programs through load_model(folder).
"""

import argparse
from pathlib import Path

from pretrain import errors, hf_export
from pretrain.checkpoint import CheckpointError, find_latest, load_model
from pretrain.errors import UserError


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="export_hf.py", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a ckpt_<step>.pt file, or a run folder (its newest)")
    parser.add_argument("--out", required=True, help="the folder to write (created; our files in it are replaced)")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file; expected the folder to write the export into")
    source = Path(args.checkpoint)
    if not source.is_file() and find_latest(source) is None:  # load_model would look for it on the Hub
        raise CheckpointError(f"{source} is neither a checkpoint file nor a run folder holding one (ckpt_<step>.pt)")
    model, meta = load_model(args.checkpoint)
    out = hf_export.export(model, args.out)
    print(f"exported step {meta['step']} of {args.checkpoint} ({model.num_params() / 1e6:.1f}M parameters) to {out}")


if __name__ == "__main__":
    errors.run(main)
