"""HellaSwag (Zellers et al. 2019): pick the right one of four endings, scored the two ways published numbers use.

completion style (build-nanogpt, llm.c): context = ctx as it is, each ending tokenized as " " + ending; acc picks
    the ending with the lowest summed loss over its tokens, acc_norm the lowest mean loss per token.
harness style (lm-evaluation-harness): context = activity_label + ": " + ctx_a + " " + ctx_b.capitalize() and the
    endings, all cleaned of WikiHow's [title]/[step] marks (harness_preprocess); acc picks the highest summed
    log-likelihood, acc_norm the highest log-likelihood per character of the ending.
OpenAI's GPT-2 124M on the 10,042 validation rows: completion 0.2859 / 0.2955, harness 0.2892 / 0.3114 (acc /
acc_norm). The scoring itself (the fast path, and the split over ranks) is in hellaswag_scoring.py.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from pretrain import tokenizer
from pretrain.errors import UserError
from pretrain.fileio import located_rows
from pretrain.sources import _network_errors

DATASET = "Rowan/hellaswag"
SPLIT = "validation"
STYLES = ("completion", "harness")
TEXT_FIELDS = ("ctx", "ctx_a", "ctx_b", "activity_label")
NUM_ENDINGS = 4


class HellaSwagError(UserError):
    """A HellaSwag file or row that cannot be used; the message names it and says what was expected."""


class HellaSwagUnavailable(HellaSwagError):
    """The Hub dataset cannot be reached and is not cached (no network)."""


@dataclass(frozen=True)
class Example:
    """One row, rendered in one style and tokenized."""

    context: tuple[int, ...]
    endings: tuple[tuple[int, ...], ...]  # the scored tokens of each ending, in order
    norm_lengths: tuple[int, ...]  # acc_norm divides each ending's loss by this: tokens (completion), chars (harness)
    label: int


@dataclass(frozen=True)
class HellaSwagData:
    style: str
    examples: list[Example]


# ---- Rows: from the Hub or a jsonl file, checked -------------------------------------------------------------


def check_row(row, where: str) -> dict:
    """The fields scoring needs, with the label as an int; a HellaSwagError naming `where` if the row is unusable."""
    if not isinstance(row, dict):
        raise HellaSwagError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [name for name in (*TEXT_FIELDS, "endings", "label") if name not in row]
    if missing:
        raise HellaSwagError(f"{where}: missing field(s) {', '.join(missing)} (a HellaSwag row has "
                             f"{', '.join(TEXT_FIELDS)}, endings and label)")
    for name in TEXT_FIELDS:
        if not isinstance(row[name], str):
            raise HellaSwagError(f"{where}: {name} must be a string, got {type(row[name]).__name__}")
    if not row["ctx"].strip():
        raise HellaSwagError(f"{where}: ctx is empty; there is nothing to continue")
    endings = row["endings"]
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS:
        got = f"{len(endings)} endings" if isinstance(endings, list) else type(endings).__name__
        raise HellaSwagError(f"{where}: expected a list of {NUM_ENDINGS} endings, got {got}")
    for i, ending in enumerate(endings):
        if not isinstance(ending, str) or not ending.strip():
            raise HellaSwagError(f"{where}: ending {i} must be a non-empty string, got {ending!r}")
    label = row["label"]
    is_index = isinstance(label, int) and not isinstance(label, bool)
    if isinstance(label, str) and label.strip().isdigit():
        label, is_index = int(label), True
    if not is_index or not 0 <= label < NUM_ENDINGS:
        raise HellaSwagError(f"{where}: label {row['label']!r} is out of range: expected 0-{NUM_ENDINGS - 1} "
                             "(an int or a string)")
    return {**{name: row[name] for name in TEXT_FIELDS}, "endings": list(endings), "label": label}


def read_rows(path: str | Path) -> list[tuple[str, object]]:
    """The rows of a local HellaSwag jsonl file, each with where it came from ("FILE line N"), for error messages."""
    return located_rows(path, HellaSwagError, "HellaSwag data file")


def download_rows(limit: int = 0) -> list[tuple[str, object]]:
    """The validation rows of the Hub dataset (cached by `datasets` after the first download)."""
    import datasets  # slow to import; only the Hub path needs it

    try:
        dataset = datasets.load_dataset(DATASET, split=SPLIT)
    except _network_errors():
        raise HellaSwagUnavailable(f"could not download the HellaSwag {SPLIT} set ({DATASET}) from the Hugging Face "
                                   "Hub (no network?) and no cached copy exists") from None
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [(f"{DATASET} {SPLIT} row {i}", row) for i, row in enumerate(dataset)]


def load_rows(data: str | Path = "", limit: int = 0) -> list[dict]:
    """Checked rows from a local jsonl file (data), or from the Hub dataset when data is empty; the first `limit`
    rows only when limit > 0."""
    named = read_rows(data) if data else download_rows(limit)
    if limit:
        named = named[:limit]
    return [check_row(row, where) for where, row in named]


# ---- Rendering: the published prompts -----------------------------------------------------------------------


def harness_preprocess(text: str) -> str:
    """lm-evaluation-harness's cleaning: WikiHow's " [title]" ends a sentence, other [marks] go, and the double
    spaces that leaves become one."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def split_tokens(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokens of context and continuation as lm-evaluation-harness makes them: the context's trailing spaces move to
    the continuation, and the continuation's tokens are the whole text's tokens after the context's own."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer.encode(stripped)
    whole_ids = tokenizer.encode(stripped + continuation)
    return context_ids, whole_ids[len(context_ids):]


def render(row: dict, style: str) -> Example:
    """A checked row as tokens in the given style (module docstring)."""
    if style == "completion":
        context = tokenizer.encode(row["ctx"])
        endings = [tokenizer.encode(" " + ending) for ending in row["endings"]]
        norm_lengths = [len(ids) for ids in endings]
    elif style == "harness":
        query = harness_preprocess(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
        choices = [harness_preprocess(ending) for ending in row["endings"]]
        pairs = [split_tokens(query, " " + choice) for choice in choices]
        context = pairs[0][0]  # the same for every ending: it depends on the query alone
        endings = [ending_ids for _, ending_ids in pairs]
        norm_lengths = [len(choice) for choice in choices]
    else:
        raise ValueError(f"HellaSwag style {style!r}: expected one of {', '.join(STYLES)}")
    return Example(tuple(context), tuple(tuple(ids) for ids in endings), tuple(norm_lengths), row["label"])


def load(data: str | Path = "", limit: int = 0, style: str = "completion") -> HellaSwagData:
    """Rows (module docstring: where from) checked and rendered in `style`."""
    if style not in STYLES:
        raise HellaSwagError(f"HellaSwag style {style!r}: expected one of {', '.join(STYLES)}")
    return HellaSwagData(style, [render(row, style) for row in load_rows(data, limit)])
