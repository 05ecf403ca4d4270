"""The optimizer built from the config, and the learning-rate schedule.

AdamW with weight decay on the matrices and embeddings (parameters of 2+ dims) only, never on biases or LayerNorm
gains (GPT-3). The learning rate is derived from the step alone, so a resumed run recomputes it instead of storing
it: linear warmup to the peak, then cosine decay to min_lr at max_steps.
"""

import math

import torch

from pretrain.config import OptimConfig


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, device_type: str,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over model's trainable parameters in two groups, decayed (2+ dims) and not. fused (default on CUDA and
    CPU): one kernel pass over each tensor instead of a dozen elementwise ones."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if fused is None:
        fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused)


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of a max_steps run."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps  # step 0 already moves, at lr / warmup_steps
    if step >= max_steps:
        return optim.min_lr
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group steps at lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr
