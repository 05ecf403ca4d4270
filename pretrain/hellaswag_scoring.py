"""HellaSwag scoring, fast: each example is one row holding its context once and its four endings after it.

The anchors run an example as four padded rows (context + ending each) and apply the 50k-wide LM head at every
position. Here the endings' positions restart where the context ends and an attention mask lets each ending see
the context and itself only, so the context is computed once; the head runs only where the next token is scored
(one position per ending token); examples of similar length share a forward. The losses are the same as scoring
each ending alone with a full forward. Under torch.distributed the examples are split over ranks and the counts
summed, so every rank gets the result one process would.
"""

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from pretrain import distributed, parallel, tokenizer
from pretrain.config import TrainConfig
from pretrain.hellaswag import Example, HellaSwagData, HellaSwagError, HellaSwagUnavailable, load
from pretrain.runtime import Runtime

PADDING = -1  # segment id of padding; the context is segment 0, ending j is segment j + 1


@dataclass(frozen=True)
class HellaSwagResult:
    style: str
    count: int  # examples scored, over all ranks
    correct: int  # by summed loss (acc)
    correct_norm: int  # by normalised loss (acc_norm)

    @property
    def acc(self) -> float:
        return self.correct / self.count

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.count

    def metrics(self) -> dict:
        """The record training logs to metrics.jsonl."""
        return {"hellaswag_acc_norm": self.acc_norm, "hellaswag_acc": self.acc, "hellaswag_style": self.style,
                "hellaswag_count": self.count}

    def __str__(self) -> str:
        return (f"hellaswag ({self.style} style, {self.count} examples): acc {self.acc:.4f} | "
                f"acc_norm {self.acc_norm:.4f}")


@dataclass
class PackedExample:
    """One example as one row: context, then each ending without its last token (a target only, never an input)."""

    tokens: list[int]
    positions: list[int]  # position ids: each ending continues from the end of the context
    segments: list[int]
    scored_at: list[int]  # row indices whose next-token prediction is scored
    targets: list[int]  # the token each of those predicts
    ending_of: list[int]  # which ending (0-3) each scored prediction belongs to


def fit_context(example: Example, block_size: int) -> tuple[int, ...]:
    """The context, shortened from the left when context + ending would not fit the model's positions (only for
    models with a short block_size: GPT-2's 1024 holds every HellaSwag example); lm-evaluation-harness also keeps
    the end."""
    longest = max(len(ending) for ending in example.endings)
    room = block_size + 1 - longest  # the last ending token is never an input
    if room < 1:
        raise HellaSwagError(f"a HellaSwag ending of {longest} tokens does not fit block_size {block_size}")
    return example.context[-room:]


def pack(example: Example, block_size: int) -> PackedExample:
    context = list(fit_context(example, block_size))
    n = len(context)
    packed = PackedExample(tokens=list(context), positions=list(range(n)), segments=[0] * n, scored_at=[],
                           targets=[], ending_of=[])
    for j, ending in enumerate(example.endings):
        start = len(packed.tokens)
        fed = ending[:-1]
        packed.tokens += fed
        packed.positions += range(n, n + len(fed))
        packed.segments += [j + 1] * len(fed)
        # The ending's first token is predicted at the context's last position, each later one at its predecessor.
        packed.scored_at += [n - 1, *range(start, start + len(fed))]
        packed.targets += ending
        packed.ending_of += [j] * len(ending)
    return packed


def attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T), True where a query may see a key: earlier or same position, and the key is in the context
    or in the query's own ending (padding sees the context and padding, so no row of the softmax is empty)."""
    T = segments.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    keys, queries = segments[:, None, :], segments[:, :, None]
    same_or_context = (keys == queries) | (keys == 0)
    return (causal & same_or_context).unsqueeze(1)


def score_batch(body, head, batch: list[PackedExample], rt: Runtime) -> torch.Tensor:
    """Summed loss of each ending, (len(batch), 4), from one forward over the packed rows."""
    device = rt.device
    T = max(len(p.tokens) for p in batch)
    tokens = torch.zeros(len(batch), T, dtype=torch.long)
    positions = torch.zeros(len(batch), T, dtype=torch.long)
    segments = torch.full((len(batch), T), PADDING, dtype=torch.long)
    rows, cols, targets, buckets = [], [], [], []
    for b, p in enumerate(batch):
        tokens[b, :len(p.tokens)] = torch.tensor(p.tokens)
        positions[b, :len(p.tokens)] = torch.tensor(p.positions)
        segments[b, :len(p.tokens)] = torch.tensor(p.segments)
        rows += [b] * len(p.scored_at)
        cols += p.scored_at
        targets += p.targets
        buckets += [4 * b + j for j in p.ending_of]
    tokens, positions, segments = tokens.to(device), positions.to(device), segments.to(device)
    rows, cols, targets, buckets = (torch.tensor(x, device=device) for x in (rows, cols, targets, buckets))
    with rt.autocast():
        hidden = body(tokens, positions, attention_mask(segments))
        logits = head(hidden[rows, cols])
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    sums = torch.zeros(4 * len(batch), device=device).index_add_(0, buckets, losses)
    return sums.view(len(batch), 4)


@torch.no_grad()
def ending_losses(model: torch.nn.Module, examples: list[Example], rt: Runtime, batch_size: int = 16,
                  progress: bool = False) -> torch.Tensor:
    """Summed loss over each ending's tokens, (len(examples), 4), on this process. model may be wrapped in DDP or
    torch.compile (the body then runs compiled too); its train/eval mode is restored afterwards."""
    raw, body = parallel.scoring_body(model, rt)
    # Only the tokenizer's ids: the padded vocabulary rows (50257 -> 50304) are never real tokens.
    head = functools.partial(raw.logits, n_vocab=min(tokenizer.N_VOCAB, raw.config.vocab_size))
    packed = [pack(example, raw.config.block_size) for example in examples]
    # Longest first, so a batch too large for memory fails at once; similar lengths together waste little padding.
    order = sorted(range(len(packed)), key=lambda i: len(packed[i].tokens), reverse=True)
    losses = torch.zeros(len(examples), 4, device=rt.device)
    was_training = raw.training
    raw.eval()
    try:
        with tqdm(total=len(examples), desc="hellaswag", unit="ex", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                losses[chunk] = score_batch(body, head, [packed[i] for i in chunk], rt)
                bar.update(len(chunk))
    finally:
        raw.train(was_training)
    return losses.cpu()


def predictions(losses: torch.Tensor, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen ending of each example by summed loss (acc) and by normalised loss (acc_norm); ties go to the
    first, as argmax does in both anchors."""
    norm_lengths = torch.tensor([example.norm_lengths for example in examples], dtype=losses.dtype).view(-1, 4)
    return losses.argmin(dim=1), (losses / norm_lengths).argmin(dim=1)


def evaluate(model: torch.nn.Module, data: HellaSwagData, rt: Runtime, batch_size: int = 16,
             progress: bool = False) -> HellaSwagResult:
    """acc and acc_norm over data's examples. Under torch.distributed every rank must call it: each scores every
    world_size-th example and the counts are summed, so all ranks return the result of one process."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = data.examples[rank::world_size]
    losses = ending_losses(model, mine, rt, batch_size, progress=progress and rank == 0)
    pred, pred_norm = predictions(losses, mine)
    labels = torch.tensor([example.label for example in mine], dtype=torch.long)
    counts = torch.tensor([len(mine), (pred == labels).sum().item(), (pred_norm == labels).sum().item()],
                          dtype=torch.long, device=rt.device)
    count, correct, correct_norm = distributed.all_reduce_sum(counts).tolist()
    if count == 0:
        raise HellaSwagError("no HellaSwag examples to evaluate")
    return HellaSwagResult(data.style, count, correct, correct_norm)


def load_for_training(train: TrainConfig, is_master: bool) -> HellaSwagData | None:
    """The examples training evaluates every train.hellaswag_interval steps, loaded once at startup. None when off,
    or when the Hub dataset cannot be reached (said once): training goes on without it. All ranks agree."""
    if train.hellaswag_interval == 0:
        return None
    try:
        data, reason = load(train.hellaswag_data, train.hellaswag_limit, train.hellaswag_style), ""
    except HellaSwagUnavailable as e:
        data, reason = None, str(e)
    if not distributed.all_ranks_agree(data is not None):
        if is_master:
            print(f"hellaswag: off for this run: {reason or 'another rank could not load the data'}; set "
                  "train.hellaswag_data=FILE.jsonl to evaluate from a local copy")
        return None
    return data
