"""Training health: update-to-data ratios, gradient norms, activation statistics and attention entropy.

Every `train.health_interval` steps (0, the default, turns it off: no hooks, no copies, no device syncs) the
training step is watched and one JSON record goes to <out_dir>/health.jsonl:

    {"step": 40, "grad_norm": 0.83, "clipped": false,
     "layers": {"h.0": {"update_ratio": 2.1e-3, "grad_norm": 0.21,
                        "params": {"attn.c_attn.weight": {"update_ratio": ..., "grad_norm": ...}, ...}}, ...},
     "activations": {"residual_norm": [...n_layer+1], "block_mean": [...], "block_std": [...],
                     "gelu_mean": [...], "gelu_std": [...], "gelu_near_zero": [...]},
     "attention_entropy": [[...n_head] ...n_layer], "attention_entropy_uniform": 3.2, "warnings": [...]}

The update-to-data ratio is |parameter after the optimizer step - before| / |before|: the update the optimizer
actually applied (Adam's normalisation, weight decay, clipping and the learning rate included). About 1e-3 is the
classic healthy value; a layer that stays above 1e-1 or below 1e-5 for WARN_AFTER recordings, or a non-finite
gradient norm, prints a warning naming the layer. Parameters are grouped by block ("h.3") or by their top-level
module ("wte", "ln_f"); a group's ratio is over its weight matrices together, its gradient norm over all its
tensors, and each tensor's own figures are kept under "params". Gradient norms are taken before clipping, after
the gradients are averaged over ranks, so rank 0's replica stands for the model under DDP.

Under optim.name=muon the blocks' matrices take Muon's steps, whose size is set by the learning rate and the matrix's
shape, not by the gradient (the update is orthogonalised: its singular values are about 1). A block's ratio then
says how large the weights have grown against a fixed step, not whether the layer learns, and the zero-initialised
projections start at ratios far above 1e-1: the blocks' ratio warnings are off. What still means something: the
non-finite gradient warning, and the ratios of the AdamW layers (wte, lm_head, ln_f), warned about as before.

Activations and attention entropy come from one extra forward pass (no gradients, eval mode) of the uncompiled
model over the step's first micro-batch (at most PROBE_SEQUENCES sequences), with hooks that exist only for that
pass: the training forward itself is never hooked, so torch.compile'd and DDP-wrapped models are left as they are.
SDPA does not return attention weights, so each layer's are recomputed from its input and its c_attn weights.
"""

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from model import GPT
from pretrain.fileio import JsonlWriter

# Update-to-data ratio bounds for warnings. Adam's normalised steps put a healthy GPT at 1e-2..1e-1 while the
# learning rate peaks (the demo config: blocks 2-3e-2, the token embedding 7e-2), so the high bound is 1e-1: a layer
# rewritten by a tenth of its norm at every step, recording after recording, is being thrashed, not trained.
HIGH_RATIO = 1e-1
LOW_RATIO = 1e-5  # updates this small: the layer has stopped learning
WARN_AFTER = 3  # consecutive recordings out of range before a layer is warned about (one bad step is noise)
GELU_NEAR_ZERO = 1e-2  # |GELU output| below this counts as an inactive unit (GELU's kink is at unit scale)
PROBE_SEQUENCES = 8  # sequences of the micro-batch the activation pass uses: statistics, not training


def layer_of(name: str) -> str:
    """The group a parameter is reported under: its block ("h.3") or its top-level module ("wte", "ln_f")."""
    parts = name.removeprefix("transformer.").split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity; an undefined figure is written as null."""
    return value if math.isfinite(value) else None


def _ratio(update: float, norm: float) -> float | None:
    """|update| / |parameter|; undefined (None) for a parameter that is all zeros (a bias at initialisation)."""
    return _finite_or_none(update / norm) if norm > 0 else None


def _combined(norms: list[float], indices: list[int]) -> float:
    """The norm of several tensors taken together, from their norms."""
    return math.sqrt(sum(norms[i] ** 2 for i in indices))


class UpdateProbe:
    """What one health step measures around the optimizer: train_step calls before_update() after the gradients
    are complete (and averaged over ranks) and before clipping; finish() runs after the optimizer step."""

    def __init__(self, model: torch.nn.Module):
        self.names, self.params = zip(*model.named_parameters())
        self.grad_norms: torch.Tensor | None = None
        self.before: list[torch.Tensor] = []

    @torch.no_grad()
    def before_update(self) -> None:
        self.grad_norms = torch.stack([torch.zeros((), device=p.device) if p.grad is None
                                       else torch.linalg.vector_norm(p.grad.float()) for p in self.params])
        self.before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def finish(self, grad_clip: float) -> dict:
        """Per-layer and per-tensor update-to-data ratios and gradient norms, and whether clipping was active."""
        if self.grad_norms is None:
            raise RuntimeError("UpdateProbe.finish() without before_update(): train_step did not call the probe")
        # one difference at a time: never a second copy of the whole model
        update_norms = torch.stack([torch.linalg.vector_norm((after - before).float())
                                    for after, before in zip(self.params, self.before)])
        param_norms = torch.stack([torch.linalg.vector_norm(b.float()) for b in self.before])
        # one transfer (and so one device sync) for all three
        grads, updates, norms = torch.stack([self.grad_norms, update_norms, param_norms]).double().tolist()
        self.before = []
        members: dict[str, list[int]] = {}  # layer -> indices of its tensors
        for i, name in enumerate(self.names):
            members.setdefault(layer_of(name), []).append(i)
        layers = {}
        for layer, indices in members.items():
            # The layer's ratio is over its weight matrices, as in the classic plot: gains (~1) and biases (0 at
            # init) would otherwise dominate the norms of narrow layers. A layer without matrices (ln_f) uses all.
            matrices = [i for i in indices if self.params[i].dim() >= 2] or indices
            params = {}
            for i in indices:
                short_name = self.names[i].removeprefix("transformer.").removeprefix(layer + ".")
                params[short_name] = {"update_ratio": _ratio(updates[i], norms[i]),
                                      "grad_norm": _finite_or_none(grads[i])}
            layers[layer] = {"update_ratio": _ratio(_combined(updates, matrices), _combined(norms, matrices)),
                             "grad_norm": _finite_or_none(_combined(grads, indices)), "params": params}
        total = _combined(grads, list(range(len(grads))))
        # clip_grad_norm_ scales the gradients exactly when their total norm exceeds grad_clip (0: never)
        clipped = grad_clip > 0 and total > grad_clip
        nonfinite = [layer for layer in layers if layers[layer]["grad_norm"] is None]
        return {"grad_norm": _finite_or_none(total), "clipped": clipped, "layers": layers, "nonfinite": nonfinite}


def attention_probs(attn: torch.nn.Module, seq: torch.Tensor, rotary=None) -> torch.Tensor:
    """The causal attention weights (n_head, T, T) of one sequence seq (T, C) at the attention module `attn`'s
    input: what its SDPA call computes internally, recomputed from its queries and keys (attn.heads)."""
    T, C = seq.shape
    head_dim = C // attn.n_head
    q, k, _ = (t[0].float() for t in attn.heads(seq.unsqueeze(0), rotary))  # (n_head, T, head_dim)
    scores = (q @ k.transpose(1, 2)) / math.sqrt(head_dim)  # SDPA's default scale
    causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()
    return F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def attention_entropy(attn: torch.nn.Module, x: torch.Tensor, rotary=None) -> torch.Tensor:
    """Each head's mean attention entropy (nats) over the query positions and sequences of x (B, T, C); one
    sequence at a time, so (n_head, T, T) is the largest tensor."""
    total = torch.zeros(attn.n_head, device=x.device)
    for seq in x:
        probs = attention_probs(attn, seq, rotary)
        p_log_p = probs * torch.log(probs.clamp_min(1e-30))  # masked keys: p = 0 contributes 0, not 0 * -inf
        total += -p_log_p.sum(-1).mean(-1)
    return total / x.size(0)


def uniform_entropy(seq_len: int) -> float:
    """The mean entropy of heads that attend uniformly to every visible position: the ceiling for comparison."""
    return sum(math.log(i + 1) for i in range(seq_len)) / seq_len


@torch.no_grad()
def measure_activations(model: GPT, idx: torch.Tensor, autocast: contextlib.AbstractContextManager) -> dict:
    """Activation statistics and attention entropy from one forward pass of `model` (the uncompiled GPT) over idx,
    with hooks that are removed before returning. The model's train/eval mode is restored."""
    stats: dict[str, list[torch.Tensor]] = {key: [] for key in
                                           ("residual_norm", "block_mean", "block_std", "gelu_mean", "gelu_std",
                                            "gelu_near_zero", "attention_entropy")}

    def residual(_module, _inputs, out):
        stats["residual_norm"].append(out.float().norm(dim=-1).mean())

    def block_output(module, inputs, out):
        residual(module, inputs, out)
        stats["block_mean"].append(out.float().mean())
        stats["block_std"].append(out.float().std())

    def gelu_output(_module, _inputs, out):
        stats["gelu_mean"].append(out.float().mean())
        stats["gelu_std"].append(out.float().std())
        stats["gelu_near_zero"].append((out.abs() < GELU_NEAR_ZERO).float().mean())

    def attention_input(module, inputs):  # inputs: (x, attn_mask, rotary tables or None), as Block passes them
        stats["attention_entropy"].append(attention_entropy(module, inputs[0], inputs[2]))

    handles = [model.transformer.drop.register_forward_hook(residual)]  # the embeddings: depth 0
    for block in model.transformer.h:
        handles.append(block.register_forward_hook(block_output))
        handles.append(block.mlp.gelu.register_forward_hook(gelu_output))
        handles.append(block.attn.register_forward_pre_hook(attention_input))
    was_training = model.training
    model.eval()  # no dropout: the statistics of the model itself, and no random numbers drawn
    try:
        with autocast:
            model(idx)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    entropy = torch.stack(stats.pop("attention_entropy")).tolist()
    activations = {key: torch.stack(values).tolist() for key, values in stats.items()}
    return {"activations": activations, "attention_entropy": entropy,
            "attention_entropy_uniform": uniform_entropy(idx.size(1))}


def peek_batch(loader) -> torch.Tensor:
    """The inputs of the loader's next batch, without moving it on (the step will read the same batch)."""
    state = loader.state_dict()
    x, _ = loader.next_batch()
    loader.load_state_dict(state)
    return x


class HealthMonitor:
    """Records training health every `interval` steps to `path` and warns about layers out of range.

        health = HealthMonitor(raw_model, out_dir / "health.jsonl", interval, grad_clip, rt.autocast, master)
        with health.recording(step, train_loader) as probe:   # probe is None on other steps
            train_step(..., probe)                              # calls probe.before_update() before clipping
    """

    def __init__(self, model: GPT, path: str | Path, interval: int, grad_clip: float, autocast=contextlib.nullcontext,
                 enabled: bool = True, log=print, muon: bool = False):
        self.model = model
        self.muon = muon  # the blocks step with Muon: their ratios are recorded, not warned about
        self.path = Path(path)
        self.interval = interval if enabled else 0
        self.grad_clip = grad_clip
        self.autocast = autocast
        self.log = log
        self.streaks: dict[str, tuple[str, int]] = {}  # layer -> ("above" or "below", consecutive recordings)
        self.writer: JsonlWriter | None = None  # opened at the first record: a run without health writes no file

    def due(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0

    @contextlib.contextmanager
    def recording(self, step: int, loader):
        """Around one training step: yields an UpdateProbe on health steps (None otherwise); on leaving, the step's
        record is written and checked. A step that raises writes nothing."""
        if not self.due(step):
            yield None
            return
        device = next(self.model.parameters()).device
        idx = peek_batch(loader)[:PROBE_SEQUENCES].to(device)
        # measured before the step, so the activations are those of the weights the step's gradients come from
        forward = measure_activations(self.model, idx, self.autocast())
        probe = UpdateProbe(self.model)
        yield probe
        update = probe.finish(self.grad_clip)
        nonfinite = update.pop("nonfinite")
        record = {"step": step, **update, **forward}
        record["warnings"] = self.check(step, record["layers"], nonfinite)
        for warning in record["warnings"]:
            self.log(f"warning: {warning}")
        self.write(record)

    def check(self, step: int, layers: dict[str, dict], nonfinite: list[str]) -> list[str]:
        """Warnings for this recording: non-finite gradient norms at once, out-of-range update-to-data ratios
        once a layer has been out of range for WARN_AFTER recordings in a row (then again after it recovers)."""
        warnings = []
        if nonfinite:
            warnings.append(f"non-finite gradient norm at step {step} in {', '.join(nonfinite)}")
        for layer, entry in layers.items():
            if self.muon and layer.startswith("h."):
                continue
            ratio = entry["update_ratio"]
            if ratio is None:
                side = None
            elif ratio > HIGH_RATIO:
                side = "above"
            elif ratio < LOW_RATIO:
                side = "below"
            else:
                side = None
            previous_side, count = self.streaks.get(layer, (None, 0))
            if side is None:
                count = 0
            elif side == previous_side:
                count += 1
            else:
                count = 1
            self.streaks[layer] = (side, count)
            if count == WARN_AFTER:
                if side == "above":
                    bound, advice = HIGH_RATIO, "the learning rate may be too high"
                else:
                    bound, advice = LOW_RATIO, "the layer may have stopped learning"
                warnings.append(f"{layer}: update-to-data ratio {side} {bound:.0e} for {count} recordings in a row "
                                f"(now {ratio:.2e} at step {step}); {advice}")
        return warnings

    def write(self, record: dict) -> None:
        if self.writer is None:
            self.writer = JsonlWriter(self.path)
        self.writer.write(record)  # a diverged model's NaNs as nulls

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
