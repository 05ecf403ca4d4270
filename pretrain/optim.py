"""The optimizer built from the config, and the learning-rate schedule.

adamw (GPT-2's): AdamW with weight decay on the matrices and embeddings (parameters of 2+ dims) only, never on
biases or norm gains (GPT-3).
muon (the modern recipe): torch.optim.Muon for the 2-D weight matrices inside the blocks, AdamW as above for the
rest (embeddings, the head, biases and gains). Muon steps each matrix along its momentum orthogonalised by a few
Newton-Schulz iterations, its learning rate scaled to the matrix's shape (optim.muon_adjust_lr).

The learning rate is derived from the step alone, so a resumed run recomputes it instead of storing it: linear
warmup to the peak, then either cosine decay to min_lr at max_steps (GPT-2's), or wsd: constant at the peak, then
a linear decay to min_lr over the last optim.decay_frac of the steps (the speedruns'). Every group follows the same
curve, each from its own peak (Muon's is optim.muon_lr).
"""

import math

import torch

from pretrain.config import OptimConfig
from pretrain.errors import UserError

# torch 2.13's Muon orthogonalises in bfloat16 always, through this module function; Muon below swaps it for its
# own during step() where that is not what the run wants (float32 on a CPU whose bfloat16 matmuls are slow, or c_attn
# per q, k, v). Checked when a Muon is built, so a torch that renames it fails at startup, not silently.
_TORCH_MUON = torch.optim._muon
_TORCH_NEWTON_SCHULZ = "_zeropower_via_newtonschulz"


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, device_type: str, fused: bool | None = None,
                    muon_dtype: torch.dtype = torch.bfloat16):
    """The optimizer optim.name says, over model's trainable parameters. fused (AdamW; default on CUDA and CPU): one
    kernel pass over each tensor instead of a dozen elementwise ones. muon_dtype: Newton-Schulz's matmul dtype
    (float32 where the run's autocast dtype is, because bfloat16 matmuls are slow there)."""
    if fused is None:
        fused = device_type in ("cuda", "cpu")
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if optim.name == "adamw":
        return _adamw([p for _, p in params], optim, fused)
    hidden = [p for name, p in params if p.dim() == 2 and ".h." in f".{name}"]  # transformer.h.<i>...
    hidden_ids = {id(p) for p in hidden}
    muon = Muon(hidden, optim, muon_dtype)
    adamw = _adamw([p for _, p in params if id(p) not in hidden_ids], optim, fused)
    return MuonWithAdamW(muon, adamw)


def _adamw(params: list[torch.nn.Parameter], optim: OptimConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW in two groups, decayed (2+ dims) and not."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused)


def newton_schulz(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """The matrix nearest-orthogonal to `update` (singular values pushed near 1: about 0.7 to 1.1 on random
    matrices), by `steps` iterations of the quintic X <- aX + (bA + cA^2)X with A = XX^T, on the wide orientation
    (fewer rows than columns: A is the smaller square). Muon's iteration, as Keller Jordan published it, in
    `dtype`."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # Frobenius >= spectral norm: every singular value starts at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon: its momentum, Nesterov step, decoupled weight decay, shape-scaled learning rate and state
    dict, with the orthogonalisation done by newton_schulz() above (the same iteration) in `dtype`, and c_attn's
    (3C, C) matrix orthogonalised as three (C, C) ones for q, k and v when optim.muon_split_qkv is set."""

    def __init__(self, params: list[torch.nn.Parameter], optim: OptimConfig, dtype: torch.dtype):
        if not callable(getattr(_TORCH_MUON, _TORCH_NEWTON_SCHULZ, None)):
            raise UserError(f"optim.name=muon needs torch.optim._muon.{_TORCH_NEWTON_SCHULZ} (torch 2.13's Muon); "
                            f"this torch {torch.__version__} has none: install torch 2.13")
        super().__init__(params, lr=optim.muon_lr, weight_decay=optim.weight_decay, momentum=optim.muon_momentum,
                         nesterov=True, adjust_lr_fn=optim.muon_adjust_lr)
        self.dtype, self.split_qkv = dtype, optim.muon_split_qkv
        for group in self.param_groups:
            group["lr_scale"] = optim.muon_lr / optim.lr  # set_lr keeps Muon's peak in this ratio to AdamW's

    def orthogonalise(self, update: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
        rows, cols = update.shape
        if self.split_qkv and rows == 3 * cols:  # c_attn, q k v stacked: no other matrix of a block has this shape
            # Each third alone; 1/sqrt(3) keeps the update's RMS what torch's LR adjustment assumes for (3C, C).
            parts = [newton_schulz(part, coefficients, steps, eps, self.dtype) for part in update.chunk(3)]
            return torch.cat(parts) / math.sqrt(3)
        return newton_schulz(update, coefficients, steps, eps, self.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        torch_newton_schulz = getattr(_TORCH_MUON, _TORCH_NEWTON_SCHULZ)
        setattr(_TORCH_MUON, _TORCH_NEWTON_SCHULZ, self.orthogonalise)
        try:
            return super().step(closure)
        finally:
            setattr(_TORCH_MUON, _TORCH_NEWTON_SCHULZ, torch_newton_schulz)


class MuonWithAdamW:
    """Muon for the blocks' matrices and AdamW for the rest, as one optimizer: the interface training uses
    (param_groups, step, zero_grad, state_dict, load_state_dict). Muon's groups come first."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("the checkpoint's optimizer state is not Muon with AdamW's")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of a max_steps run (AdamW's; Muon's is in proportion)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps  # step 0 already moves, at lr / warmup_steps
    if step >= max_steps:
        return optim.min_lr
    if optim.schedule == "wsd":
        decay_steps = max(1, round(optim.decay_frac * max_steps))
        left = max_steps - step  # max_steps - decay_steps + 1 .. 1: the last step is one decay step above min_lr
        if left > decay_steps:
            return optim.lr
        return optim.min_lr + (optim.lr - optim.min_lr) * left / decay_steps
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


def set_lr(optimizer, lr: float) -> None:
    """Every parameter group steps at lr, times its lr_scale where it has one (Muon's groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
