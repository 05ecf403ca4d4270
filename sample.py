"""Sample text from a training checkpoint or from OpenAI's GPT-2, with the same generate code as training.

    python sample.py --checkpoint runs/demo                      # the run's newest checkpoint and its own prompt
    python sample.py --checkpoint runs/demo/ckpt_000300.pt --prompt "class Parser:" --num-samples 3
    python sample.py --model gpt2 --prompt "Hello, I'm a language model," --seed 7    # needs transformers

One sample is printed as it is generated; several are printed when all are done. The same seed gives the same
text. Messages about the model go to stderr, so stdout holds only the samples.
"""

import argparse
import math
import sys

from pretrain import errors, runtime
from pretrain.checkpoint import add_model_arguments, load_model
from pretrain.sampling import generate_text

DEFAULT_PROMPT = "Hello, I'm a language model,"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--prompt", help="the text to continue (default: the checkpoint's train.sample_prompt, "
                                         f"else {DEFAULT_PROMPT!r})")
    parser.add_argument("--num-samples", type=int, default=1, help="how many continuations (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens generated per sample (default 100)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="below 1 sharper, above 1 more random; 0 always takes the likeliest token (default 1)")
    parser.add_argument("--top-k", type=int, default=50,
                        help="sample among the k likeliest tokens; 0: all (default 50)")
    parser.add_argument("--seed", type=int, default=1337, help="the same seed gives the same samples (default 1337)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error("--num-samples must be at least 1")
    if args.max_new_tokens < 0:
        parser.error("--max-new-tokens must be 0 or more")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        parser.error(f"--temperature must be a number, 0 or more (0: the likeliest token), got {args.temperature}")
    if args.top_k < 0:
        parser.error("--top-k must be 0 or more")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device = runtime.pick_device(args.device)
    model, meta = load_model(args.checkpoint or args.model, device)
    prompt = args.prompt
    if prompt is None:
        prompt = meta.get("config", {}).get("train", {}).get("sample_prompt", DEFAULT_PROMPT)
    step_text = f"step {meta['step']}, " if "step" in meta else ""
    source = meta.get("path", args.model)  # for a run folder, the checkpoint file read
    print(f"{source}: {step_text}{model.num_params() / 1e6:.1f}M parameters, on {device}", file=sys.stderr)

    sample_args = dict(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k or None, seed=args.seed, device=device)
    if args.num_samples == 1:
        generate_text(model, prompt, on_text=lambda text: print(text, end="", flush=True), **sample_args)
        print()
        return
    # several samples are printed when all are done: a bar on stderr shows the tokens generated meanwhile
    for i, text in enumerate(generate_text(model, prompt, progress=True, **sample_args)):
        print(f"--- sample {i + 1} of {args.num_samples} ---")
        print(text)


if __name__ == "__main__":
    errors.run(main)
