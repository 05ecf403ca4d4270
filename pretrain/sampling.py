"""Text in, text out: prompts through the tokenizer and GPT.generate. Training's samples and sample.py use it."""

import torch

from model import GPT
from pretrain import tokenizer


@torch.no_grad()
def generate_text(model: GPT, prompt: str, num_samples: int = 1, max_new_tokens: int = 32, temperature: float = 1.0,
                  top_k: int | None = 50, seed: int = 0, device: torch.device | str = "cpu") -> list[str]:
    """num_samples continuations of prompt (the prompt included), reproducible for a given seed. The model may be
    compiled; its train/eval mode is restored afterwards."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty: give at least one character of text to continue")
    was_training = model.training
    model.eval()
    try:
        generator = torch.Generator(device=device).manual_seed(seed)
        idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, n_vocab=tokenizer.N_VOCAB,
                             generator=generator, forward=model)  # a compiled model's own forward, not the eager one
    finally:
        model.train(was_training)
    return [tokenizer.decode(row.tolist()) for row in out]
