"""CORE items as token sequences, by nanochat's rules (nanochat/core_eval.py): few-shot examples, prompts, the
tokens that are scored, and truncation to the model's context.

- Few-shot: item i of a task (its index after the shuffle and the max_per_task cut) takes num_fewshot other rows
  of that same list, random.Random(1234 + i).sample of the indices other than i.
- Prompts: each few-shot example as "<question><delimiter><answer>\n\n", then the item. multiple_choice: one prompt
  per choice, "<query><delimiter><choice>". schema: one per context option, "<option><delimiter><continuation>".
  language_modeling: "<context stripped><delimiter>" stripped, and the same with the continuation after it
  (few-shot contexts stripped too).
- Tokens: <|endoftext|> (GPT-2's BOS), then the prompt encoded as ordinary text. Scored: multiple_choice, the tokens
  after the candidates' common prefix; schema, the candidates' common suffix; language_modeling, the tokens after
  the prompt without the continuation, which must be a prefix of the prompt with it.
- Truncation: a sequence longer than the model's context keeps its last block_size tokens.
"""

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pretrain import tokenizer
from pretrain.core_bundle import CoreError, CoreTask

FEWSHOT_SEED = 1234  # plus the item's index
ENCODE_CHUNK = 256  # items tokenized at once: bounds the memory of their token lists


@dataclass(frozen=True)
class Prompt:
    """One item, ready to score: each candidate's tokens as the model reads them and the span of targets scored."""

    sequences: tuple[tuple[int, ...], ...]
    spans: tuple[tuple[int, int], ...]  # [start, end) token indices of each sequence whose prediction is scored
    gold: int  # the right candidate (multiple_choice, schema); 0 for language_modeling


class AllBut(Sequence):
    """The indices 0..n-1 without `skip`, as a sequence: random.sample picks from it by position exactly as from
    the list [i for i in range(n) if i != skip], without building that list for every item."""

    def __init__(self, n: int, skip: int):
        self.n, self.skip = n, skip

    def __len__(self) -> int:
        return self.n - 1

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n - 1:
            raise IndexError(i)
        return i if i < self.skip else i + 1


def fewshot_indices(n: int, index: int, k: int) -> list[int]:
    """The rows (of n) that item `index` shows as examples, in order."""
    if k == 0:
        return []
    return random.Random(FEWSHOT_SEED + index).sample(AllBut(n, index), k)


def render(task: CoreTask, index: int) -> list[str]:
    """The prompts of item `index` of a task (module docstring): one per candidate, or for language_modeling the
    prompt without and with the continuation."""
    item = task.rows[index]
    shots = [task.rows[i] for i in fewshot_indices(len(task.rows), index, task.num_fewshot)]
    d = task.delimiter
    if task.task_type == "multiple_choice":
        examples = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{examples}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        examples = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{examples}{option}{d}{item['continuation']}" for option in item["context_options"]]
    examples = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    stem = f"{examples}{item['context'].strip()}{d}"
    return [stem.strip(), stem + item["continuation"]]


def common_length(sequences, from_end: bool = False) -> int:
    """How many leading (or trailing) tokens all sequences share."""
    shortest = min(len(s) for s in sequences)
    for n in range(shortest):
        at = -1 - n if from_end else n
        if any(s[at] != sequences[0][at] for s in sequences):
            return n
    return shortest


def scored_spans(task: CoreTask, tokens: list[list[int]], where: str) -> tuple[list[list[int]], list[tuple]]:
    """The sequences the model reads and the span of each that is scored (module docstring)."""
    if task.task_type == "multiple_choice":
        start = common_length(tokens)
        return tokens, [(start, len(t)) for t in tokens]
    if task.task_type == "schema":
        suffix = common_length(tokens, from_end=True)
        return tokens, [(len(t) - suffix, len(t)) for t in tokens]
    without, with_continuation = tokens
    if len(without) >= len(with_continuation) or with_continuation[:len(without)] != without:
        raise CoreError(f"{where}: the prompt without its continuation does not tokenize to a proper prefix of the "
                        "prompt with it (an empty continuation, or one whose first token merges with the context)")
    return [with_continuation], [(len(without), len(with_continuation))]


def truncate(sequence: list[int], span: tuple[int, int], block_size: int, where: str) -> tuple[list[int], tuple]:
    """Keep the last block_size tokens, moving the span with them."""
    cut = len(sequence) - block_size
    if cut <= 0:
        return sequence, span
    start, end = span[0] - cut, span[1] - cut
    if start < 1:  # nanochat asserts start >= 0, and at 0 would score a slice from the end: neither is usable
        raise CoreError(f"{where}: its {span[1] - span[0]} scored tokens do not fit the model's context of "
                        f"{block_size} tokens with one token before them")
    return sequence[cut:], (start, end)


def build_prompts(task: CoreTask, indices: Sequence[int], block_size: int) -> Iterator[Prompt]:
    """Items `indices` of a task as Prompts, tokenized a chunk at a time."""
    enc = tokenizer.get_encoding()
    for lo in range(0, len(indices), ENCODE_CHUNK):
        chunk = indices[lo:lo + ENCODE_CHUNK]
        texts = [render(task, i) for i in chunk]
        flat = enc.encode_ordinary_batch([text for prompts in texts for text in prompts])
        at = 0
        for i, prompts in zip(chunk, texts):
            where = f"task {task.label!r}, {task.origins[i]}"
            tokens = [[tokenizer.EOT_ID, *ids] for ids in flat[at:at + len(prompts)]]
            at += len(prompts)
            sequences, spans = scored_spans(task, tokens, where)
            fitted = [truncate(s, span, block_size, where) for s, span in zip(sequences, spans)]
            yield Prompt(tuple(tuple(s) for s, _ in fitted), tuple(span for _, span in fitted),
                         task.rows[i].get("gold", 0))
