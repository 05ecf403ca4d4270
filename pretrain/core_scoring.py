"""CORE scoring, fast: an item's candidates share one row, their common prefix computed once, the LM head applied
only where a token is scored, and rows of similar length batched.

nanochat runs an item as one padded row per candidate and the head at every position. Here a row holds the tokens
all candidates share (segment 0), then each candidate's own tokens (segments 1, 2, ...), whose positions continue
where the shared part ends; an attention mask lets each token see the shared part and its own candidate only
(hellaswag_scoring.attention_mask). So every scored prediction is the one a full forward of that candidate alone
gives. Rows stay within block_size tokens: the candidates that do not fit go into another row that repeats the
shared part (after truncation, candidates of different lengths share nothing, and take a row each).
"""

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pretrain import parallel, tokenizer
from pretrain.core_prompts import Prompt, common_length
from pretrain.hellaswag_scoring import PADDING, attention_mask
from pretrain.runtime import Runtime


@dataclass(frozen=True)
class Row:
    """One row of a forward: shared tokens, then candidates' own tokens, and the predictions scored in it."""

    tokens: np.ndarray  # int32
    shared: int  # the first `shared` tokens are every candidate's (segment 0)
    own: tuple[int, ...]  # how many tokens of its own each candidate in this row has (segments 1, 2, ...)
    scored_at: np.ndarray  # int32: indices into tokens whose next-token prediction is scored
    targets: np.ndarray  # int32: the token each of those must predict
    candidate: np.ndarray  # int32: which candidate (numbered over everything scored together) each belongs to

    def positions(self) -> np.ndarray:
        parts = [np.arange(self.shared)] + [np.arange(self.shared, self.shared + n) for n in self.own]
        return np.concatenate(parts)

    def segments(self) -> np.ndarray:
        parts = [np.zeros(self.shared, dtype=np.int64)] + [np.full(n, j + 1) for j, n in enumerate(self.own)]
        return np.concatenate(parts)


def pack(prompt: Prompt, first_candidate: int, block_size: int) -> list[Row]:
    """The rows that score a prompt's candidates, numbered from first_candidate. Candidate j's target t is
    predicted at its token t-1: in the shared part when t-1 < shared, else among its own tokens."""
    sequences, spans = prompt.sequences, prompt.spans
    # Tokens after the last scored target's predecessor are never inputs (a lone sequence shares all the rest).
    shared = min(common_length(sequences), max(end - 1 for _, end in spans))
    groups, used = [[]], shared
    for j, (_, end) in enumerate(spans):
        own = max(0, end - 1 - shared)
        if groups[-1] and used + own > block_size:
            groups.append([])
            used = shared
        groups[-1].append(j)
        used += own
    rows = []
    for group in groups:
        tokens, own_lengths, scored_at, targets, candidate = list(sequences[group[0]][:shared]), [], [], [], []
        for j in group:
            sequence, (start, end) = sequences[j], spans[j]
            offset = len(tokens)
            tokens += sequence[shared:end - 1]
            own_lengths.append(max(0, end - 1 - shared))
            scored_at += [t - 1 if t - 1 < shared else offset + t - 1 - shared for t in range(start, end)]
            targets += sequence[start:end]
            candidate += [first_candidate + j] * (end - start)
        if targets:  # candidates with nothing to score (a choice that is a prefix of the others) need no row
            rows.append(Row(np.array(tokens, dtype=np.int32), shared, tuple(own_lengths),
                            np.array(scored_at, dtype=np.int32), np.array(targets, dtype=np.int32),
                            np.array(candidate, dtype=np.int32)))
    return rows


def score_batch(body, head, batch: list[Row], rt: Runtime) -> tuple[torch.Tensor, ...]:
    """Loss and whether the greedy prediction is right, for every scored prediction of the batch (in order)."""
    T = max(len(row.tokens) for row in batch)
    tokens = np.zeros((len(batch), T), dtype=np.int64)
    positions = np.zeros((len(batch), T), dtype=np.int64)
    segments = np.full((len(batch), T), PADDING, dtype=np.int64)
    for b, row in enumerate(batch):
        n = len(row.tokens)
        tokens[b, :n], positions[b, :n], segments[b, :n] = row.tokens, row.positions(), row.segments()
    which_row = np.concatenate([np.full(len(row.scored_at), b) for b, row in enumerate(batch)])
    scored_at = np.concatenate([row.scored_at for row in batch])
    targets = np.concatenate([row.targets for row in batch])
    tokens, positions, segments, which_row, scored_at, targets = (
        torch.from_numpy(x.astype(np.int64)).to(rt.device)
        for x in (tokens, positions, segments, which_row, scored_at, targets))
    with rt.autocast():
        hidden = body(tokens, positions, attention_mask(segments))
        logits = head(hidden[which_row, scored_at])
    logits = logits.float()
    return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(dim=1) == targets


@torch.no_grad()
def score(model: torch.nn.Module, rows: list[Row], n_candidates: int, rt: Runtime, batch_size: int = 16,
          progress: bool = False) -> tuple[list[float], list[bool]]:
    """Each candidate's mean loss over its scored tokens (nan when it has none) and whether greedy decoding
    predicts every one of them. A forward holds up to batch_size rows of block_size tokens' worth (more when
    shorter). model may be wrapped in DDP or torch.compile; its train/eval mode is restored afterwards."""
    raw, body = parallel.scoring_body(model, rt)
    # Only the tokenizer's ids: the padded vocabulary rows (50257 -> 50304) are never real tokens.
    head = functools.partial(raw.logits, n_vocab=min(tokenizer.N_VOCAB, raw.config.vocab_size))
    budget = batch_size * raw.config.block_size
    # Longest first, so a batch too large for memory fails at once; similar lengths together waste little padding.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].tokens), reverse=True)
    loss_sums = torch.zeros(n_candidates, device=rt.device)
    counts = torch.zeros(n_candidates, device=rt.device)
    misses = torch.zeros(n_candidates, device=rt.device)
    was_training = raw.training
    raw.eval()
    try:
        with tqdm(total=len(rows), desc="core", unit="row", disable=not progress) as bar:
            start = 0
            while start < len(order):
                per_batch = max(1, budget // len(rows[order[start]].tokens))
                batch = [rows[i] for i in order[start:start + per_batch]]
                losses, hits = score_batch(body, head, batch, rt)
                candidate = torch.from_numpy(np.concatenate([row.candidate for row in batch]).astype(np.int64))
                candidate = candidate.to(rt.device)
                loss_sums.index_add_(0, candidate, losses)
                counts.index_add_(0, candidate, torch.ones_like(losses))
                misses.index_add_(0, candidate, (~hits).float())
                start += len(batch)
                bar.update(len(batch))
    finally:
        raw.train(was_training)
    return (loss_sums / counts).tolist(), (misses == 0).tolist()
