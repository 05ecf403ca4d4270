"""Benchmark: CORE items/s, nanochat's way against ours, same model, same items, same run, interleaved.

    python bench_core.py                                   # 4 layers, 128 wide, block_size 1024, a CORE-shaped bundle
    python bench_core.py --bundle ~/eval_bundle --items 20 --n-layer 12 --n-embd 768 --n-head 12

nanochat's way (nanochat/core_eval.py, written here from its rules): one forward per item, each candidate a row
padded with <|endoftext|>, the LM head and the cross-entropy at every position. Ours (pretrain/core_scoring.py): the
candidates' shared prefix once, the head only where a token is scored, rows of similar length batched. Both score the
same prompts (tokenized once, outside the timing) and must agree on every candidate's mean loss and every decision.

Without --bundle the items come from a synthetic bundle shaped like CORE's tasks (SHAPES: the type, few-shot count,
choices and rough token lengths of a few of its tasks, guessed from the task descriptions, not measured); the words
are random, one GPT-2 token each.
"""

import argparse
import random
import tempfile
import time

import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from pretrain import errors, runtime, tokenizer
from pretrain.core_bundle import read_tasks, write_bundle
from pretrain.core_eval import is_correct
from pretrain.core_prompts import build_prompts
from pretrain.core_scoring import pack, score

# label: (type, few-shot, choices, context tokens, answer tokens, delimiter)
SHAPES = {
    "hellaswag_zeroshot": ("multiple_choice", 0, 4, 60, 25, " "),
    "hellaswag": ("multiple_choice", 10, 4, 60, 25, " "),
    "arc_easy": ("multiple_choice", 10, 4, 25, 5, "\nAnswer: "),
    "piqa": ("multiple_choice", 10, 2, 15, 25, "\nAnswer: "),
    "boolq": ("multiple_choice", 10, 2, 120, 1, "\nAnswer: "),
    "winograd": ("schema", 0, 2, 15, 8, " "),
    "lambada_openai": ("language_modeling", 0, 1, 80, 1, " "),
    "bigbench_qa_wikidata": ("language_modeling", 10, 1, 10, 3, " "),
    "squad": ("language_modeling", 10, 1, 150, 4, " "),
}
WORDS = ("the man woman then she he is a to and of on in with her his it they them while uses water hand ball car "
         "floor wall brush cake table chair cloth street room door game yes no").split()


def synthetic_tasks(items: int, seed: int = 0) -> list[dict]:
    """Tasks of SHAPES for write_bundle: `items` rows each, and at least 50 to draw few-shot examples from."""
    rng = random.Random(seed)

    def words(mean: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, round(mean * rng.uniform(0.5, 1.5)))))

    tasks = []
    for label, (task_type, shots, choices, context, answer, delimiter) in SHAPES.items():
        rows = []
        for _ in range(max(items, 50)):
            if task_type == "multiple_choice":
                rows.append({"query": words(context), "choices": [words(answer) for _ in range(choices)],
                             "gold": rng.randrange(choices)})
            elif task_type == "schema":
                rows.append({"context_options": [words(context) for _ in range(choices)],
                             "continuation": words(answer), "gold": rng.randrange(choices)})
            else:
                rows.append({"context": words(context), "continuation": words(answer)})
        tasks.append({"label": label, "icl_task_type": task_type, "num_fewshot": shots, "rows": rows,
                      "baseline": 100 / choices if choices > 1 else 0, "continuation_delimiter": delimiter})
    return tasks


@torch.no_grad()
def nanochat_way(model: GPT, prompts, rt: runtime.Runtime) -> tuple[list[float], list[bool]]:
    """Each candidate's mean loss and whether greedy decoding gets all its tokens, one padded forward per item."""
    means, greedy = [], []
    for prompt in prompts:
        T = max(len(seq) for seq in prompt.sequences)
        ids = torch.full((len(prompt.sequences), T), tokenizer.EOT_ID, dtype=torch.long)  # padded with BOS
        for i, seq in enumerate(prompt.sequences):
            ids[i, :len(seq)] = torch.tensor(seq)
        ids = ids.to(rt.device)
        with rt.autocast():
            logits = model.logits(model.hidden_states(ids))
        logits = logits[..., :tokenizer.N_VOCAB].float()
        targets = torch.roll(ids, shifts=-1, dims=1)
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(ids.shape)
        predicted = logits.argmax(dim=-1)
        for i, (start, end) in enumerate(prompt.spans):
            means.append(losses[i, start - 1:end - 1].mean().item())
            greedy.append(bool((predicted[i, start - 1:end - 1] == ids[i, start:end]).all()))
    return means, greedy


def our_way(model: GPT, prompts, rt: runtime.Runtime, batch_size: int) -> tuple[list[float], list[bool]]:
    rows, first = [], 0
    for prompt in prompts:
        rows += pack(prompt, first, model.config.block_size)
        first += len(prompt.sequences)
    return score(model, rows, first, rt, batch_size)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="", help="a CORE eval bundle (default: a synthetic one, see above)")
    parser.add_argument("--items", type=int, default=12, help="items per task: the first after nanochat's shuffle")
    parser.add_argument("--rounds", type=int, default=3, help="the items are timed in this many interleaved parts")
    parser.add_argument("--batch-size", type=int, default=16, help="ours: rows of block_size tokens per forward")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)

    rt = runtime.resolve(args.device, args.dtype, compile=False)
    torch.manual_seed(0)
    config = GPTConfig(block_size=args.block_size, vocab_size=tokenizer.N_VOCAB, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).to(rt.device).eval()
    if args.bundle:
        tasks = read_tasks(args.bundle)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tasks = read_tasks(write_bundle(tmp, synthetic_tasks(args.items)))
    # The first --items items of each task (after nanochat's shuffle), few-shot examples drawn from all its rows
    labelled = [(task, prompt) for task in tasks
                for prompt in build_prompts(task, range(min(args.items, len(task.rows))), args.block_size)]
    random.Random(0).shuffle(labelled)  # every round gets a mix of the tasks
    prompts = [prompt for _, prompt in labelled]
    tokens = sum(len(seq) for prompt in prompts for seq in prompt.sequences)
    truncated = sum(any(len(seq) == args.block_size for seq in prompt.sequences) for prompt in prompts)
    print(f"model: {model.num_params() / 1e6:.1f}M parameters ({args.n_layer} layers, {args.n_embd} wide, block_size "
          f"{args.block_size}), random weights | {rt.describe()} | {torch.get_num_threads()} threads")
    print(f"{len(prompts)} items of {len(tasks)} tasks, {tokens / len(prompts):.0f} tokens per item over its "
          f"candidates, {truncated} truncated")

    nanochat_way(model, prompts[:1], rt)  # warm up both ways
    our_way(model, prompts[:2], rt, args.batch_size)
    seconds = {"nanochat": 0.0, "ours": 0.0}
    results = {"nanochat": ([], []), "ours": ([], [])}
    part = -(-len(prompts) // args.rounds)
    for round_index, start in enumerate(range(0, len(prompts), part)):
        chunk = prompts[start:start + part]
        ways = [("nanochat", lambda: nanochat_way(model, chunk, rt)),
                ("ours", lambda: our_way(model, chunk, rt, args.batch_size))]
        for name, run in ways if round_index % 2 == 0 else ways[::-1]:  # alternate which goes first
            t0 = time.perf_counter()
            means, greedy = run()
            seconds[name] += time.perf_counter() - t0
            results[name][0].extend(means)
            results[name][1].extend(greedy)
    rates = {name: len(prompts) / seconds[name] for name in seconds}
    (theirs, their_greedy), (ours, our_greedy) = results["nanochat"], results["ours"]
    gap = max(abs(a - b) for a, b in zip(theirs, ours))
    agree, at = 0, 0
    for (task, prompt) in labelled:
        n = len(prompt.sequences)
        agree += (is_correct(task.task_type, theirs[at:at + n], their_greedy[at:at + n], prompt.gold)
                  == is_correct(task.task_type, ours[at:at + n], our_greedy[at:at + n], prompt.gold))
        at += n
    print(f"nanochat's way (a padded row per candidate, head at every position): {rates['nanochat']:.2f} items/s")
    print(f"ours (shared prefix once, head where scored, {args.batch_size} rows per forward): "
          f"{rates['ours']:.2f} items/s")
    print(f"speed-up: {rates['ours'] / rates['nanochat']:.2f}x | largest mean-loss difference {gap:.2e} | "
          f"decisions agree on {agree}/{len(prompts)} items, greedy flags on "
          f"{sum(a == b for a, b in zip(their_greedy, our_greedy))}/{len(ours)} candidates")


if __name__ == "__main__":
    errors.run(main)
