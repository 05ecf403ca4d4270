"""Text in, text out: prompts through the tokenizer and GPT.generate. Training's samples and sample.py use it."""

import codecs
import sys
from collections.abc import Callable

import torch
from tqdm import tqdm

from model import GPT
from pretrain import tokenizer
from pretrain.errors import UserError


@torch.no_grad()
def generate_text(model: GPT, prompt: str, num_samples: int = 1, max_new_tokens: int = 32, temperature: float = 1.0,
                  top_k: int | None = 50, seed: int = 0, device: torch.device | str = "cpu",
                  on_text: Callable[[str], None] | None = None, progress: bool = False) -> list[str]:
    """num_samples continuations of prompt (the prompt included), reproducible for a given seed. The model may be
    compiled; its train/eval mode is restored afterwards.

    With on_text, tokens are generated one call at a time and on_text receives the first sample as it grows: the
    prompt, then each new piece of text as soon as it is complete UTF-8 (a character can span tokens). With
    progress, a bar on stderr counts the tokens. Either way tokens are generated one call at a time, and every call
    draws from the same generator, so the text is exactly what one call for all tokens would produce."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError("the prompt is empty: give at least one character of text to continue")
    was_training = model.training
    model.eval()
    try:
        generator = torch.Generator(device=device).manual_seed(seed)
        idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
        sample_args = dict(temperature=temperature, top_k=top_k, n_vocab=tokenizer.N_VOCAB, generator=generator,
                           forward=model)  # a compiled model's own forward, not the eager one
        if on_text is not None:
            out = _generate_streaming(model, idx, max_new_tokens, sample_args, on_text, prompt)
        elif progress:
            out = idx
            for _ in tqdm(range(max_new_tokens), desc="sampling", unit="tok", file=sys.stderr, leave=False):
                out = model.generate(out, 1, **sample_args)
        else:
            out = model.generate(idx, max_new_tokens, **sample_args)
    finally:
        model.train(was_training)
    return [tokenizer.decode(row.tolist()) for row in out]


def _generate_streaming(model: GPT, idx: torch.Tensor, max_new_tokens: int, sample_args: dict,
                        on_text: Callable[[str], None], prompt: str) -> torch.Tensor:
    encoding = tokenizer.get_encoding()
    # tiktoken's decode replaces broken UTF-8 with U+FFFD; the incremental decoder does the same, byte for byte.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    on_text(prompt)
    for _ in range(max_new_tokens):
        idx = model.generate(idx, 1, **sample_args)
        piece = utf8.decode(encoding.decode_single_token_bytes(idx[0, -1].item()))
        if piece:
            on_text(piece)
    tail = utf8.decode(b"", final=True)
    if tail:
        on_text(tail)
    return idx
