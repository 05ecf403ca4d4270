"""The learning-rate schedule: linear warmup to the peak, then cosine decay to min_lr at max_steps.

Derived from the step alone, so a resumed run recomputes it instead of storing it.
"""

import math


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps  # step 0 already moves, at lr / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
