"""GPT-2: the model and nothing else (no files, ranks or config files).

Token + learned position embeddings, pre-LayerNorm transformer blocks with fused causal SDPA attention and a
tanh-GELU MLP, a final LayerNorm and an LM head tied to the token embedding.

The modern recipe's changes are flags of GPTConfig, each off by default (so the default is exactly GPT-2): rotary
positions, RMSNorm, QK-norm, ReLU², an untied zero-initialised head, zero-initialised output projections and
tanh soft-capped logits (configs/demo-modern.toml, docs/modern.md).
"""

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn import functional as F

DEFAULT_LOSS_CHUNK = 1024  # tokens per chunk of the head's loss in training (see ChunkedHeadLoss)
ROPE_BASE = 10000.0  # rotary embeddings: the slowest pair of channels turns once per 2 pi * 10000 positions
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "relu2")
# The Linear weights Hugging Face's GPT-2 stores as Conv1D: transposed relative to nn.Linear.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def option(default, help: str, valid: str | None = None, choices: tuple | None = None):
    """A config field with its --help line and its valid values: an interval for numbers ("[1, inf)": "[" includes
    the end, "(" excludes it) or a tuple of choices. pretrain/config.py reads them, so each key is declared once."""
    return field(default=default, metadata={"help": help, "valid": valid, "choices": choices})


@dataclass
class GPTConfig:
    block_size: int = option(1024, "longest sequence the position embedding covers", "[1, inf)")
    vocab_size: int = option(50304, "GPT-2's 50257 padded up to a multiple of 64: faster matmuls, padded ids never "
                                    "targets", "[50257, inf)")
    n_layer: int = option(12, "transformer blocks", "[1, inf)")
    n_head: int = option(12, "attention heads per block; n_embd must divide by it", "[1, inf)")
    n_embd: int = option(768, "width of the residual stream", "[1, inf)")
    bias: bool = option(True, "GPT-2 has biases in every Linear and LayerNorm")
    dropout: float = option(0.0, "dropout on embeddings, attention and residual branches (0 for pretraining)",
                            "[0, 1)")
    # The modern recipe, each off by default (GPT-2 as published):
    position: str = option("learned", "positions: learned (GPT-2's table of block_size vectors) or rope (rotary: "
                                      "queries and keys turned by their position, no table)", choices=POSITIONS)
    norm: str = option("layernorm", "layernorm (GPT-2) or rmsnorm (scale by the root mean square only: no mean, "
                                    "no bias)", choices=NORMS)
    qk_norm: bool = option(False, "RMS-normalise each head's queries and keys before attention (bounded logits)")
    activation: str = option("gelu", "the MLP's nonlinearity: gelu (GPT-2's tanh approximation) or relu2 (ReLU "
                                     "squared)", choices=ACTIVATIONS)
    tie_head: bool = option(True, "the LM head is the token embedding's matrix (GPT-2); false: its own matrix, zero "
                                  "at init")
    zero_init_proj: bool = option(False, "the attention and MLP output projections start at zero (each block "
                                         "starts as the identity)")
    logit_softcap: float = option(0.0, "logits become c * tanh(logits / c), bounded by c; 0: off", "[0, inf)")

    def is_gpt2(self) -> bool:
        """Whether this is GPT-2's architecture (every modern flag off): what Hugging Face's GPT-2 layout holds."""
        return not self.modern_flags()

    def modern_flags(self) -> list[str]:
        """The flags that differ from GPT-2, as a reader would name them."""
        flags = [self.position if self.position != "learned" else "", self.norm if self.norm != "layernorm" else "",
                 "qk-norm" if self.qk_norm else "", self.activation if self.activation != "gelu" else "",
                 "untied head" if not self.tie_head else "", "zero-init projections" if self.zero_init_proj else "",
                 f"logit soft-cap {self.logit_softcap:g}" if self.logit_softcap else ""]
        return [flag for flag in flags if flag]


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap) in float32 (no-op when cap is 0): close to the identity for small logits, never
    beyond +-cap. Computed as 2 cap sigmoid(2 logits / cap) - cap, the same function: on a CPU tanh costs four
    times an exp, sigmoid about one."""
    if not cap:
        return logits
    return torch.sigmoid(logits.float() * (2 / cap)) * (2 * cap) - cap


def rotary_tables(pos: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's angles, (*pos.shape, head_dim // 2), in float32: channel pair i turns by
    pos * ROPE_BASE ** (-2i / head_dim)."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angles = pos.float().unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn x (B, n_head, T, head_dim) by the angles of its positions; channel pairs are (i, i + head_dim / 2).
    cos, sin: (T, head_dim / 2) for every row alike, or (B, T, head_dim / 2) for positions per row."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # one table per row, shared by the heads
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class ReLUSquared(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of logits = x @ weight.T (soft-capped when cap > 0) against targets (-1 ignored), `chunk`
    rows at a time.

    The plain head materialises (tokens x vocab) float32 logits, and cross-entropy, its backward and the head's
    backward read and write arrays of that size some eight times: at small widths this dominates the step, and at
    124M x 64 x 1024 one such array is 13 GB. Here each chunk's logits become the loss AND its gradient
    (softmax - one-hot) in place, in one buffer; forward saves only grad_x and grad_weight, backward scales them.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk, cap):
        # Under autocast the matmuls run in the autocast dtype and the softmax in float32, as in the plain path.
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        softmax_dtype = torch.promote_types(dtype, torch.float32)
        with torch.autocast(device_type, enabled=False):
            w = weight.to(dtype)
            n_valid = (targets != -1).sum().clamp(min=1)
            loss = torch.zeros((), device=x.device, dtype=softmax_dtype)
            grad_x = torch.empty_like(x)
            grad_w = torch.zeros_like(weight, dtype=softmax_dtype)
            for lo in range(0, x.size(0), chunk):
                x_c, t_c = x[lo:lo + chunk].to(dtype), targets[lo:lo + chunk]
                rows = torch.arange(len(t_c), device=x.device)
                safe_t = t_c.clamp(min=0)
                if cap:
                    # logits = cap tanh(raw / cap) = 2 cap s - cap with s = sigmoid(2 raw / cap) (softcap); the
                    # constant -cap changes neither the softmax nor the loss, so it is left out. The slope
                    # d(logits)/d(raw) = 1 - tanh**2 = 4 s (1 - s); the 4 goes into the row factor below.
                    s = ((x_c * (2 / cap)) @ w.t()).to(softmax_dtype).sigmoid_()  # 2 raw / cap: narrow operand
                    slope = torch.addcmul(s, s, s, value=-1)
                    logits = s.mul_(2 * cap)
                else:
                    logits = (x_c @ w.t()).to(softmax_dtype)
                target_logits = logits[rows, safe_t]
                # softmax with one exp pass, in place in the logits' memory: e = exp(logits - max), p = e / sum(e)
                row_max = logits.amax(dim=1, keepdim=True)
                e = logits.sub_(row_max).exp_()
                e_sum = e.sum(dim=1, keepdim=True)
                row_scale = (t_c != -1).to(softmax_dtype).unsqueeze(1) / n_valid  # 0 for an ignored target
                loss += ((row_max + e_sum.log() - target_logits.unsqueeze(1)) * row_scale).sum()
                # d(loss)/d(logits) = (e / e_sum - one_hot) * row_scale = (e - e_sum * one_hot) * (row_scale / e_sum):
                # the row factor is applied to the narrow (chunk x n_embd) operands, not the wide one
                e[rows, safe_t] -= e_sum.squeeze(1)
                if cap:
                    e.mul_(slope)  # back through the soft-cap
                e = e.to(dtype)
                row_factor = row_scale / e_sum
                if cap:
                    row_factor = row_factor * 4
                grad_x[lo:lo + chunk] = (e @ w) * row_factor
                if grad_w.dtype == e.dtype:
                    grad_w.addmm_(e.t(), x_c * row_factor)
                else:
                    grad_w += e.t() @ (x_c * row_factor).to(dtype)
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None


# Run eagerly even inside a compiled model: on CUDA, inductor (torch 2.11) compiled this function's gradients,
# computed in its forward, to zeros (seen on an H200; CPU was right). Eager, it is exact, and the body stays compiled.
@torch.compiler.disable
def chunked_head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                      cap: float = 0.0) -> torch.Tensor:
    return ChunkedHeadLoss.apply(x, weight, targets, chunk, cap)


class GeluProjection(torch.autograd.Function):
    """c_proj(gelu(h)) that keeps h but not gelu(h) for backward, where gelu(h) is recomputed: one elementwise pass
    instead of holding 4 x n_embd more values per token in every block, a quarter of an eager block's activations.
    Gradients are the plain path's, bit for bit in float32 (the same matmuls in the same layouts)."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(F.gelu(h, approximate="tanh"), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        # Under autocast the forward's matmul ran in grad_out's dtype; parameter gradients go back in their own.
        g = F.gelu(h, approximate="tanh").flatten(0, -2).to(grad_out.dtype)
        grad_out_2d = grad_out.flatten(0, -2)
        grad_g = (grad_out @ weight.to(grad_out.dtype)).to(h.dtype)
        grad_h = torch.ops.aten.gelu_backward(grad_g, h, approximate="tanh")
        grad_weight = (grad_out_2d.t() @ g).to(weight.dtype)
        grad_bias = None if ctx.bias_dtype is None else grad_out_2d.sum(0).to(ctx.bias_dtype)
        return grad_h, grad_weight, grad_bias


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled_init = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def heads(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Queries, keys and values of x (B, T, C), each (B, n_head, T, head_dim), as attention uses them
        (normalised and turned where the config says so)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        return q, k, v

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.heads(x, rotary)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 used GELU's tanh approximation. (The attribute keeps its name for either: health hooks it.)
        self.gelu = nn.GELU(approximate="tanh") if config.activation == "gelu" else ReLUSquared()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled_init = True
        self.dropout = nn.Dropout(config.dropout)
        self.recompute_gelu = config.activation == "gelu"  # set by GPT.set_training_memory; GELU's only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        # Eager training recomputes the GELU in backward to save memory; a compiled graph decides what to keep on its
        # own (inductor's partitioner recomputes cheap elementwise ops), and without gradients nothing is kept.
        if self.recompute_gelu and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self.dropout(GeluProjection.apply(h, self.c_proj.weight, self.c_proj.bias))
        return self.dropout(self.c_proj(self.gelu(h)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, rotary)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.position == "learned":
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **layers,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_head:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying: one matrix embeds and un-embeds
        self.apply(self._init_weights)
        # Zero-initialised layers start as no-ops: a head that predicts uniformly, blocks that pass the residual on.
        # Their gradients are not zero, so they move at the first step.
        zeroed = [] if config.tie_head else [self.lm_head.weight]
        if config.zero_init_proj:
            zeroed += [m.weight for m in self.modules() if getattr(m, "residual_scaled_init", False)]
        for weight in zeroed:
            nn.init.zeros_(weight)
        self.loss_chunk = DEFAULT_LOSS_CHUNK  # set by set_training_memory

    def set_training_memory(self, loss_chunk: int = DEFAULT_LOSS_CHUNK, recompute_gelu: bool = True) -> None:
        """How training computes, not what the model is (the weights and outputs are the same either way):
        loss_chunk > 0 runs the head and its loss that many tokens at a time (ChunkedHeadLoss) instead of holding
        every logit; recompute_gelu makes eager training recompute each GELU in backward instead of keeping it."""
        self.loss_chunk = loss_chunk
        for block in self.transformer.h:
            block.mlp.recompute_gelu = recompute_gelu and self.config.activation == "gelu"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            # Each block adds two residual branches; scaling their output projections keeps the residual
            # stream's variance from growing with depth (GPT-2 paper).
            if getattr(module, "residual_scaled_init", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, the tied embedding counted once; non_embedding leaves out the tables that are looked up,
        not multiplied: the position embedding, and the token embedding when the head has its own matrix (tied, it
        is the head and does compute work)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_head:
                n -= self.transformer.wte.weight.numel()
        return n

    def hidden_states(self, idx: torch.Tensor, pos: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final LayerNorm's output (B, T, n_embd), where the LM head would apply. By default one causal
        sequence per row at positions 0..T-1. pos (B, T) and attn_mask (B, 1, T, T; True where a query may see a
        key) let one row hold several sequences that share a prefix, computed once (HellaSwag scoring puts a context
        and its four endings in one row)."""
        B, T = idx.size()
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx)
        rotary = None
        if self.config.position == "rope":
            rotary = rotary_tables(pos, self.config.n_embd // self.config.n_head)  # computed once for every block
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, attn_mask, rotary)
        return self.transformer.ln_f(x)

    def logits(self, x: torch.Tensor, n_vocab: int | None = None) -> torch.Tensor:
        """The head on hidden states x: logits over the first n_vocab ids (all by default), soft-capped if the
        config says so. The scorers apply it only where a token is scored."""
        weight = self.lm_head.weight if n_vocab is None else self.lm_head.weight[:n_vocab]
        return softcap(F.linear(x, weight), self.config.logit_softcap)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx, targets: (B, T) token ids. Returns (logits, loss): with targets, logits for every position
        and the mean cross-entropy (targets of -1 are ignored); without, logits for the last position only.
        When gradients are on and self.loss_chunk is set, the loss comes from ChunkedHeadLoss and logits is None."""
        x = self.hidden_states(idx)
        if targets is None:
            return self.logits(x[:, [-1], :]), None  # generation needs only the next token's logits
        if self.loss_chunk and torch.is_grad_enabled():
            loss = chunked_head_loss(x.view(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                     self.loss_chunk, self.config.logit_softcap)
            return None, loss  # the logits never existed all at once
        logits = self.logits(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, n_vocab: int | None = None,
                 generator: torch.Generator | None = None, forward=None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T). temperature 0 means greedy; n_vocab limits
        sampling to the tokenizer's ids when vocab_size is padded. forward computes the logits: this model by
        default, or its torch.compile'd wrapper (whose .generate lands here with self the plain model)."""
        n_real = n_vocab or self.config.vocab_size
        forward = self if forward is None else forward
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = forward(idx_cond)
            logits = logits[:, -1, :n_real].float()
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                # the largest logit becomes 0 before dividing, in float64: a temperature near 0 then sends the others
                # to -inf (the greedy choice) instead of overflowing to inf - inf or dividing by a float32 zero
                logits = (logits.double() - logits.amax(dim=-1, keepdim=True)) / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_dir: str) -> "GPT":
        """OpenAI GPT-2 weights through `transformers`: a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a
        directory written by GPT2LMHeadModel.save_pretrained. The vocabulary is kept at the checkpoint's size."""
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            raise ImportError("loading pretrained GPT-2 weights needs the `transformers` package: "
                              "pip install transformers") from None
        try:
            hf_model = GPT2LMHeadModel.from_pretrained(name_or_dir)
        except OSError as e:
            if os.path.isdir(name_or_dir):
                raise
            raise OSError(f"could not load GPT-2 weights '{name_or_dir}' from the Hugging Face Hub (no network, or "
                          "no such model): pass a directory written by save_pretrained instead "
                          f"({e.__class__.__name__})") from None
        hf_config = hf_model.config
        if getattr(hf_config, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{name_or_dir}: activation {hf_config.activation_function} is not GPT-2's tanh GELU")
        config = GPTConfig(block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size,
                           n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd, bias=True)
        model = cls(config)
        hf_state = hf_model.state_dict()
        state = model.state_dict()
        for key in state:
            if key == "lm_head.weight":
                continue  # tied to transformer.wte.weight
            src = hf_state[key]
            if key.endswith(CONV1D_WEIGHTS):
                src = src.t()
            if src.shape != state[key].shape:
                raise ValueError(f"{name_or_dir}: {key} has shape {tuple(src.shape)}, "
                                 f"expected {tuple(state[key].shape)}")
            with torch.no_grad():
                state[key].copy_(src)
        return model
