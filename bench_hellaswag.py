"""Benchmark: HellaSwag examples/s, the anchors' way against ours, same model, same dtype, same run, interleaved.

    python bench_hellaswag.py                                  # 124M-shaped GPT-2, random weights, synthetic rows
    python bench_hellaswag.py --data hellaswag_val.jsonl --examples 200 --dtype float32

The anchors' way (build-nanogpt, llm.c): each example as four padded rows (context + one ending each) through the
whole model and the 50k-wide head at every position, then the cross-entropy of the ending tokens. Ours
(pretrain/hellaswag_scoring.py): the context once per example, the head only where a token is scored, several
examples per forward. Both score the same examples and must agree on every ending's loss.

Synthetic rows (when --data is not given) have HellaSwag's lengths: the validation split is 68% WikiHow rows
(long contexts and endings) and 32% ActivityNet rows (short), about 1,000 characters of ctx + ctx_a + ctx_b +
endings a row (11.2 MB for 10,042 rows on the Hub); we take contexts of ~67 and ~30 tokens and endings of ~32 and
~16 tokens for the two, spread +-50%: on average a 55-token context and 27-token endings.
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from pretrain import errors, runtime, tokenizer
from pretrain.hellaswag import load
from pretrain.hellaswag_scoring import ending_losses

# (share of rows, mean context tokens, mean ending tokens)
KINDS = {"wikihow": (0.68, 67, 32), "activitynet": (0.32, 30, 16)}
WORDS = ("the man woman then she he is a to and of on in with her his it they them while uses water hand hands ball "
         "car floor wall brush cake table chair cloth street room door game").split()


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """n HellaSwag-shaped rows of random words, each word one GPT-2 token, at the lengths of the docstring."""
    rng = random.Random(seed)

    def words(mean: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, round(mean * rng.uniform(0.5, 1.5)))))

    names = list(KINDS)
    rows = []
    for _ in range(n):
        _, ctx_mean, ending_mean = KINDS[rng.choices(names, weights=[KINDS[k][0] for k in names])[0]]
        ctx = words(ctx_mean)
        rows.append({"activity_label": "Synthetic", "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                     "endings": [words(ending_mean) for _ in range(4)], "label": rng.randrange(4)})
    return rows


@torch.no_grad()
def anchors_losses(model: GPT, examples, rt: runtime.Runtime) -> torch.Tensor:
    """Summed loss of each ending, one example (four padded rows, full head) per forward, as the anchors do."""
    losses = torch.zeros(len(examples), 4)
    for i, example in enumerate(examples):
        rows = [list(example.context) + list(ending) for ending in example.endings]
        T = max(len(row) for row in rows)
        tokens = torch.zeros(4, T, dtype=torch.long)
        scored = torch.zeros(4, T, dtype=torch.bool)
        for j, row in enumerate(rows):
            tokens[j, :len(row)] = torch.tensor(row)
            scored[j, len(example.context):len(row)] = True
        tokens, scored = tokens.to(rt.device), scored.to(rt.device)
        with rt.autocast():
            logits = model.logits(model.hidden_states(tokens))
        token_losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(),
                                       reduction="none").view(4, T - 1)
        losses[i] = (token_losses * scored[:, 1:]).sum(dim=1).cpu()
    return losses


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="", help="a HellaSwag jsonl (default: synthetic rows, see above)")
    parser.add_argument("--examples", type=int, default=48, help="examples timed each way")
    parser.add_argument("--rounds", type=int, default=3, help="the examples are timed in this many interleaved parts")
    # Small by default: among only --examples examples a batch of 16 mixes very different lengths (16% padding at
    # 48); over the 10,042 rows, sorted neighbours have near-equal lengths at any batch size.
    parser.add_argument("--batch-size", type=int, default=4, help="examples per forward, ours")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=runtime.DTYPES)
    args = parser.parse_args(argv)

    rt = runtime.resolve(args.device, args.dtype, compile=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.N_VOCAB)).to(rt.device).eval()  # GPT-2 124M's shape
    if args.data:
        data = load(args.data, args.examples)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "synthetic.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in synthetic_rows(args.examples)))
            data = load(path)
    examples = data.examples
    mean_context = sum(len(e.context) for e in examples) / len(examples)
    mean_ending = sum(len(ending) for e in examples for ending in e.endings) / (4 * len(examples))
    print(f"model: {model.num_params() / 1e6:.1f}M parameters, random weights | {rt.describe()} | "
          f"{torch.get_num_threads()} threads | {len(examples)} examples, context {mean_context:.1f} tokens, "
          f"endings {mean_ending:.1f} tokens on average")

    ending_losses(model, examples[:2], rt, args.batch_size)  # warm up both paths
    anchors_losses(model, examples[:1], rt)
    seconds = {"anchors": 0.0, "ours": 0.0}
    results = {"anchors": [], "ours": []}
    part = -(-len(examples) // args.rounds)
    for round_index, start in enumerate(range(0, len(examples), part)):
        chunk = examples[start:start + part]
        ways = [("anchors", lambda: anchors_losses(model, chunk, rt)),
                ("ours", lambda: ending_losses(model, chunk, rt, args.batch_size))]
        for name, run in ways if round_index % 2 == 0 else ways[::-1]:  # alternate which goes first
            t0 = time.perf_counter()
            results[name].append(run())
            seconds[name] += time.perf_counter() - t0
    rates = {name: len(examples) / seconds[name] for name in seconds}
    anchors, ours = torch.cat(results["anchors"]), torch.cat(results["ours"])
    lengths = torch.tensor([[len(ending) for ending in e.endings] for e in examples])
    per_token_gap = ((anchors - ours).abs() / lengths).max().item()
    print(f"anchors' way (4 padded rows, head at every position): {rates['anchors']:.2f} examples/s")
    print(f"ours (context once, head where scored, {args.batch_size} examples per forward): "
          f"{rates['ours']:.2f} examples/s")
    print(f"speed-up: {rates['ours'] / rates['anchors']:.2f}x | largest per-token loss difference {per_token_gap:.2e}")


if __name__ == "__main__":
    errors.run(main)
