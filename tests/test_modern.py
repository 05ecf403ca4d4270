"""The modern recipe (model flags, Muon, the wsd schedule) against independent references written here: every flag
off against GPT-2's parameter layout written out; rotary embeddings against a rotation of complex numbers and the
relative-position property; packed HellaSwag rows against a forward per ending; RMSNorm, QK-norm, ReLU² and the
soft-cap (also inside the chunked head's loss and gradient) against their formulas; the zero initialisations against
what they imply (a uniform prediction, blocks that pass their input on); Muon's update against torch's documented
algorithm worked out by hand with Newton-Schulz written here; the wsd schedule against numbers worked out by hand; the
refusals (fsdp with Muon, exporting a modern model, resuming across flags or optimizers). The slow tests train, resume,
evaluate, sample and export the modern model through the programs.
"""

import copy
import dataclasses
import json
import math

import pytest
import torch
from helpers import read_metrics, run_script, save_model_checkpoint, tiny_run, torchrun, train_args
from torch.nn import functional as F

import train_gpt2
from hellaswag import main as hellaswag_main
from model import GPT, GPTConfig, apply_rotary, rotary_tables
from pretrain import hf_export, optim, run_dir, runtime, tokenizer
from pretrain.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from pretrain.config import Config, ConfigError, OptimConfig, load_config, to_dict
from pretrain.errors import UserError
from pretrain.health import HIGH_RATIO, WARN_AFTER, HealthMonitor
from pretrain.hellaswag import Example, load
from pretrain.hellaswag_scoring import attention_mask, ending_losses, evaluate, pack
from pretrain.optim import Muon, MuonWithAdamW, build_optimizer, lr_at, newton_schulz, set_lr
from pretrain.sampling import generate_text

SHAPE = dict(block_size=32, vocab_size=96, n_layer=2, n_head=2, n_embd=32)
GPT2_FLAGS = dict(position="learned", norm="layernorm", qk_norm=False, activation="gelu", tie_head=True,
                  zero_init_proj=False, logit_softcap=0.0)
MODERN_FLAGS = dict(position="rope", norm="rmsnorm", qk_norm=True, activation="relu2", tie_head=False,
                    zero_init_proj=True, logit_softcap=15.0)
MODERN = GPTConfig(**SHAPE, **MODERN_FLAGS)
FLOAT32 = runtime.resolve("cpu", "float32", False)
# Keller Jordan's quintic Newton-Schulz coefficients and steps, as torch 2.13's Muon defaults to.
NS_COEFFICIENTS, NS_STEPS, NS_EPS = (3.4445, -4.7750, 2.0315), 5, 1e-7


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def working_model(config: GPTConfig, seed: int = 0, scale: float = 0.1) -> GPT:
    """A GPT with every weight random and well away from its init (the zero-initialised ones too, norm gains around
    1): every flag's arithmetic then shows in the outputs."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, scale)
            if ("ln_" in name or "norm" in name) and name.endswith(".weight"):
                param.add_(1.0)
    return model


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference relative to b's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- every flag off is GPT-2; each flag alone works ---------------------------------------------------------------

def gpt2_layout(n_layer: int) -> list[str]:
    """GPT-2's parameters by name, written out (the head is tied: lm_head.weight is wte's matrix)."""
    block = [f"{part}.{kind}" for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
             for kind in ("weight", "bias")]
    return ["transformer.wte.weight", "transformer.wpe.weight",
            *(f"transformer.h.{i}.{key}" for i in range(n_layer) for key in block),
            "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]


def shapes(model: GPT) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def test_every_flag_off_is_gpt2():
    assert GPTConfig().is_gpt2() and GPTConfig().modern_flags() == []
    assert {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name in GPT2_FLAGS} == GPT2_FLAGS
    torch.manual_seed(0)
    default = GPT(GPTConfig(**SHAPE))
    torch.manual_seed(0)
    explicit = GPT(GPTConfig(**SHAPE, **GPT2_FLAGS))
    assert explicit.config.is_gpt2()
    assert shapes(default) == shapes(explicit)
    assert list(shapes(default)) == gpt2_layout(SHAPE["n_layer"])
    assert shapes(default)["transformer.wpe.weight"] == (32, 32)
    assert default.lm_head.weight is default.transformer.wte.weight
    assert all(torch.equal(value, explicit.state_dict()[key]) for key, value in default.state_dict().items())


# Each flag alone: the flag, its value, and the parameters it removes from GPT-2's layout.
ALONE = [("position", "rope", {"transformer.wpe.weight"}),
         ("norm", "rmsnorm", {key for key in gpt2_layout(2) if "ln_" in key and key.endswith(".bias")}),
         ("qk_norm", True, set()), ("activation", "relu2", set()), ("tie_head", False, set()),
         ("zero_init_proj", True, set()), ("logit_softcap", 3.0, set())]


@pytest.mark.parametrize("flag, value, removed", ALONE, ids=[flag for flag, _, _ in ALONE])
def test_each_flag_alone_trains(flag, value, removed):
    config = GPTConfig(**SHAPE, **{flag: value})
    assert not config.is_gpt2() and len(config.modern_flags()) == 1
    torch.manual_seed(0)
    model = GPT(config)
    model.loss_chunk = 0  # the plain head: logits at every position
    assert list(shapes(model)) == [key for key in gpt2_layout(2) if key not in removed]  # no new weights either
    idx, targets = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 16, 96) and torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model(idx)[0].shape == (2, 1, 96)
    if flag == "position":
        assert "wpe" not in model.transformer
    if flag == "tie_head":
        assert model.lm_head.weight is not model.transformer.wte.weight
        assert model.num_params() == GPT(GPTConfig(**SHAPE)).num_params() + 96 * 32
        assert model.lm_head.weight.grad.abs().max() > 0  # the zero head learns from the first step


# ---- rotary positions -------------------------------------------------------------------------------------------

def rotated(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The reference, in float64: channels i and i + D/2 as the complex number x_i + j x_{i+D/2}, multiplied by
    exp(j pos 10000^(-2i/D)). x (B, H, T, D); pos (T,) or (B, T)."""
    D = x.size(-1)
    i = torch.arange(D // 2, dtype=torch.float64)
    angle = pos.double().unsqueeze(-1) * 10000.0 ** (-2 * i / D)
    if angle.dim() == 3:
        angle = angle.unsqueeze(1)  # the same angles for every head
    z = torch.complex(x[..., :D // 2].double(), x[..., D // 2:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


def test_rotary_turns_each_channel_pair_by_its_angle():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 16)
    pos = torch.arange(30, 39)
    assert max_rel_diff(apply_rotary(x, *rotary_tables(pos, 16)).double(), rotated(x, pos)) <= 2e-6
    per_row = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 2, 3, 4, 5, 6]])  # a packed row's restart
    assert max_rel_diff(apply_rotary(x, *rotary_tables(per_row, 16)).double(), rotated(x, per_row)) <= 2e-6


def test_rotary_attention_scores_depend_on_the_distance_only():
    torch.manual_seed(0)
    T, D = 24, 16
    q, k = torch.randn(D).expand(1, 1, T, D), torch.randn(D).expand(1, 1, T, D)  # one query and one key, everywhere
    cos, sin = rotary_tables(torch.arange(T), D)
    scores = (apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-2, -1))[0, 0]  # (query m, key n)
    for shift in (1, 5, 17):
        assert (scores[shift:, shift:] - scores[:-shift, :-shift]).abs().max() <= 1e-5  # (m+s, n+s) is (m, n)
    assert scores[0].std() > 0.1  # and the distance does matter


def test_rope_model_is_the_same_at_every_offset_and_learned_positions_are_not():
    idx = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    rope = working_model(MODERN)
    learned = working_model(GPTConfig(**SHAPE))
    with torch.no_grad():
        for offset in (7, 100):
            pos = torch.arange(20) + offset
            assert max_rel_diff(rope.hidden_states(idx, pos), rope.hidden_states(idx)) <= 1e-4
        pos = torch.arange(20) + 7
        assert max_rel_diff(learned.hidden_states(idx, pos), learned.hidden_states(idx)) > 0.1


def test_packed_row_with_restarting_positions_is_each_ending_alone():
    """A HellaSwag row: context, then each ending at positions restarting after the context, each seeing the context
    and itself only. Every row's hidden state equals that of a separate forward of context + that ending."""
    model = working_model(MODERN).eval()
    g = torch.Generator().manual_seed(2)
    context = tuple(torch.randint(0, 96, (9,), generator=g).tolist())
    endings = tuple(tuple(torch.randint(0, 96, (n,), generator=g).tolist()) for n in (3, 5, 2, 4))
    packed = pack(Example(context, endings, norm_lengths=(3, 5, 2, 4), label=0), block_size=32)
    tokens, positions, segments = (torch.tensor([x]) for x in (packed.tokens, packed.positions, packed.segments))
    assert packed.positions[9:13] == [9, 10, 9, 10]  # ending 0 (2 tokens fed), then ending 1 from 9 again
    with torch.no_grad():
        hidden = model.hidden_states(tokens, positions, attention_mask(segments))[0]
        wrong = model.hidden_states(tokens, torch.arange(len(packed.tokens))[None], attention_mask(segments))[0]
        for j, ending in enumerate(endings):
            alone = model.hidden_states(torch.tensor([list(context) + list(ending[:-1])]))[0]
            rows = (segments[0] == j + 1).nonzero().squeeze(1)
            assert max_rel_diff(hidden[rows], alone[9:]) <= 1e-5, j
            assert max_rel_diff(hidden[:9], alone[:9]) <= 1e-5
            if j > 0:  # positions that do not restart put this ending further from its context
                assert max_rel_diff(wrong[rows], alone[9:]) > 1e-2, j


def test_hellaswag_scorer_on_the_modern_model_equals_a_forward_per_ending():
    """ending_losses (packed rows, the head applied only where scored, through GPT.logits) against each ending's
    loss from the plain forward: soft-capped logits, rotary positions."""
    model = working_model(MODERN, scale=0.3).eval()
    g = torch.Generator().manual_seed(3)
    examples = []
    for n in (11, 4, 20, 7):
        context = tuple(torch.randint(0, 96, (n,), generator=g).tolist())
        endings = tuple(tuple(torch.randint(0, 96, (m,), generator=g).tolist()) for m in (2, 6, 3, 5))
        examples.append(Example(context, endings, norm_lengths=(2, 6, 3, 5), label=1))
    expected = torch.zeros(len(examples), 4)
    for i, example in enumerate(examples):
        for j, ending in enumerate(example.endings):
            idx = torch.tensor([list(example.context) + list(ending)])[:, :-1]
            targets = torch.full_like(idx, -1)
            targets[0, len(example.context) - 1:] = torch.tensor(ending)
            with torch.no_grad():
                _, loss = model(idx, targets)
            expected[i, j] = loss * len(ending)
    assert expected.std() > 0.5  # sharp enough that a missing soft-cap or wrong position would show
    got = ending_losses(model, examples, FLOAT32, batch_size=3)
    assert (got - expected).abs().max() <= 1e-4


# ---- RMSNorm, QK-norm, ReLU² ------------------------------------------------------------------------------------

def test_rmsnorm_divides_by_the_root_mean_square_only():
    model = working_model(GPTConfig(**SHAPE, norm="rmsnorm"))
    norm = model.transformer.h[0].ln_1
    torch.manual_seed(0)
    x = torch.randn(4, 5, 32) + 3.0  # a mean far from 0, which LayerNorm would remove
    x[1] *= 1e-3  # mean(x^2) ~ 1e-5: the epsilon matters
    x64 = x.double()
    expected = x64 / torch.sqrt(x64.square().mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    assert max_rel_diff(norm(x).double(), expected) <= 1e-6
    assert max_rel_diff(norm(x[1]).double(), expected[1]) <= 1e-6


def explicit_qk_norm_attention(attn, x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Causal attention with each head's queries and keys divided by their root mean square, written out."""
    B, T, C = x.shape
    D = C // n_head
    q, k, v = (t.view(B, T, n_head, D).transpose(1, 2).double() for t in attn.c_attn(x).split(C, dim=2))
    q = q / q.square().mean(-1, keepdim=True).sqrt()
    k = k / k.square().mean(-1, keepdim=True).sqrt()
    att = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    y = (att @ v.double()).transpose(1, 2).reshape(B, T, C)
    return F.linear(y, attn.c_proj.weight.double(), attn.c_proj.bias.double())


def test_qk_norm_normalises_each_heads_queries_and_keys():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 32)
    on, off = (working_model(GPTConfig(**SHAPE, qk_norm=flag), scale=0.3) for flag in (True, False))
    attn = on.transformer.h[0].attn
    with torch.no_grad():
        assert max_rel_diff(attn(x).double(), explicit_qk_norm_attention(attn, x, 2)) <= 1e-5
        for model in (on, off):
            attn = model.transformer.h[0].attn
            before = attn(x)
            # a different factor for each head's queries and keys: only a per-head norm undoes them all
            for rows, factor in ((slice(0, 16), 7.0), (slice(16, 32), 0.2), (slice(32, 48), 3.0),
                                 (slice(48, 64), 0.5)):
                attn.c_attn.weight[rows] *= factor
                attn.c_attn.bias[rows] *= factor
            after = attn(x)
            if model is on:
                assert max_rel_diff(after, before) <= 1e-5
            else:
                assert max_rel_diff(after, before) > 1e-2


def test_relu2_mlp_and_no_gelu_recompute():
    model = working_model(GPTConfig(**SHAPE, activation="relu2"), scale=0.3)
    model.set_training_memory(recompute_gelu=True)
    mlp = model.transformer.h[0].mlp
    assert mlp.recompute_gelu is False
    torch.manual_seed(0)
    x = torch.randn(3, 7, 32, requires_grad=True)
    expected = F.linear(F.relu(F.linear(x, mlp.c_fc.weight, mlp.c_fc.bias)) ** 2, mlp.c_proj.weight,
                        mlp.c_proj.bias)
    grads_expected = torch.autograd.grad(expected.square().sum(), [x, mlp.c_fc.weight, mlp.c_proj.weight])
    out = mlp(x)
    assert max_rel_diff(out, expected) <= 1e-6
    grads = torch.autograd.grad(out.square().sum(), [x, mlp.c_fc.weight, mlp.c_proj.weight])
    for got, want in zip(grads, grads_expected):
        assert max_rel_diff(got, want) <= 1e-5
    # a GELU model keeps its recompute (the same call)
    gelu = GPT(GPTConfig(**SHAPE))
    gelu.set_training_memory(recompute_gelu=True)
    assert all(block.mlp.recompute_gelu for block in gelu.transformer.h)


# ---- zero initialisations ---------------------------------------------------------------------------------------

def test_untied_zero_head_predicts_uniformly_at_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPE, tie_head=False))
    assert model.lm_head.weight.abs().max() == 0 and model.transformer.wte.weight.std() > 0.01
    idx = torch.randint(0, 96, (2, 16))
    _, loss = model(idx, idx)
    assert loss.item() == pytest.approx(math.log(96), abs=1e-6)
    torch.manual_seed(0)
    _, tied_loss = GPT(GPTConfig(**SHAPE))(idx, idx)
    assert abs(tied_loss.item() - math.log(96)) > 1e-3  # a tied head does not start uniform


def test_zero_init_projections_make_every_block_pass_its_input_on():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPE, zero_init_proj=True))
    x = torch.randn(2, 8, 32)
    for block in model.transformer.h:
        assert block.attn.c_attn.weight.std() > 0.01 and block.mlp.c_fc.weight.std() > 0.01  # only the outputs
        assert torch.equal(block(x), x)
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**SHAPE))
    assert not torch.equal(plain.transformer.h[0](x), x)


# ---- soft-capped logits -----------------------------------------------------------------------------------------

CAP = 2.0


def capped_model() -> GPT:
    model = working_model(GPTConfig(**SHAPE, tie_head=False, logit_softcap=CAP), scale=0.1)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)  # raw logits of 10 and more: deep in tanh's saturation
    return model


def test_soft_cap_bounds_the_logits():
    model = capped_model()
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = model.hidden_states(idx) @ model.lm_head.weight.T
        logits, _ = model(idx, idx)
        last, _ = model(idx)
    assert raw.abs().max() > 5 * CAP
    assert logits.abs().max() <= CAP
    assert max_rel_diff(logits.double(), CAP * torch.tanh(raw.double() / CAP)) <= 1e-6
    assert max_rel_diff(last, logits[:, -1:]) <= 1e-6  # generation's last position, capped alike
    uncapped = GPT(GPTConfig(**SHAPE))
    x = torch.randn(3, 32)
    assert torch.equal(uncapped.logits(x), F.linear(x, uncapped.lm_head.weight))  # cap 0: the raw logits


@pytest.mark.parametrize("chunk", [5, 1024])
def test_chunked_head_loss_and_gradients_are_the_soft_capped_cross_entropys(chunk):
    model = capped_model()
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 96, (3, 13), generator=g), torch.randint(0, 96, (3, 13), generator=g)
    targets[0, :4] = -1  # ignored, as a packed or masked batch has them
    targets[2, 7] = -1
    model.loss_chunk = chunk
    logits, loss = model(idx, targets)
    assert logits is None  # the chunked path
    loss.backward()
    chunked = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    raw = model.hidden_states(idx) @ model.lm_head.weight.T
    expected = F.cross_entropy((CAP * torch.tanh(raw.float() / CAP)).view(-1, 96), targets.view(-1), ignore_index=-1)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # measured 8e-8
    for name, param in model.named_parameters():
        assert max_rel_diff(chunked[name], param.grad) <= 1e-5, name  # measured 3e-7


# ---- Muon: which parameters, which learning rate ----------------------------------------------------------------

MUON = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1)


def names_in(model: GPT, params: list) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("config", [MODERN, GPTConfig(**SHAPE)], ids=["modern", "gpt2"])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(config):
    model = GPT(config)
    optimizer = build_optimizer(model, MUON, "cpu")
    assert isinstance(optimizer, MuonWithAdamW)
    (muon_group,), (decayed, undecayed) = optimizer.muon.param_groups, optimizer.adamw.param_groups
    assert [id(group) for group in optimizer.param_groups] == [id(muon_group), id(decayed), id(undecayed)]
    matrices = {f"transformer.h.{i}.{m}.weight" for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    tables = {"transformer.wte.weight"} | ({"transformer.wpe.weight"} if config.position == "learned" else set()) \
        | ({"lm_head.weight"} if not config.tie_head else set())
    named = dict(model.named_parameters())
    assert names_in(model, muon_group["params"]) == matrices
    assert names_in(model, decayed["params"]) == tables
    assert names_in(model, undecayed["params"]) == {n for n, p in named.items() if p.dim() == 1}
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(named)  # each once
    assert (muon_group["weight_decay"], decayed["weight_decay"], undecayed["weight_decay"]) == (0.1, 0.1, 0.0)
    assert muon_group["lr"] == 0.02 and decayed["lr"] == undecayed["lr"] == 1e-3
    assert muon_group["lr_scale"] == pytest.approx(20.0)
    assert muon_group["nesterov"] and muon_group["momentum"] == 0.95 and muon_group["adjust_lr_fn"] == "original"
    set_lr(optimizer, 5e-4)
    assert muon_group["lr"] == pytest.approx(0.02 * 5e-4 / 1e-3, rel=1e-12)
    assert decayed["lr"] == undecayed["lr"] == 5e-4
    assert isinstance(build_optimizer(model, OptimConfig(), "cpu"), torch.optim.AdamW)  # adamw: unchanged


# ---- Newton-Schulz and Muon's step ------------------------------------------------------------------------------

def reference_newton_schulz(g: torch.Tensor) -> torch.Tensor:
    """Keller Jordan's quintic iteration in float64: X <- aX + (bA + cA^2)X, A = XX^T, on the wide orientation,
    from X = G / ||G||_F."""
    a, b, c = NS_COEFFICIENTS
    x = g.double()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=NS_EPS)
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(32, 32), (24, 64), (96, 32)], ids=["square", "wide", "tall"])
def test_newton_schulz_approximately_orthogonalises(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g, NS_COEFFICIENTS, NS_STEPS, NS_EPS, torch.float32)
    assert out.dtype == torch.float32 and out.shape == shape
    singular = torch.linalg.svdvals(out)
    assert 0.6 <= singular.min() and singular.max() <= 1.3  # what 5 quintic steps give: about 0.68 to 1.13
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    polar = U @ Vh  # the exact orthogonal factor
    assert F.cosine_similarity(out.flatten(), polar.flatten(), dim=0) > 0.95  # measured 0.985
    assert max_rel_diff(out.double(), reference_newton_schulz(g)) <= 1e-5
    in_bf16 = newton_schulz(g, NS_COEFFICIENTS, NS_STEPS, NS_EPS, torch.bfloat16)
    assert in_bf16.dtype == torch.bfloat16
    torchs = torch.optim._muon._zeropower_via_newtonschulz(g, NS_COEFFICIENTS, NS_STEPS, NS_EPS)
    torch.testing.assert_close(in_bf16, torchs)  # bfloat16 tolerance
    assert max_rel_diff(out, torchs.float()) <= 0.03  # float32 against bfloat16: measured 0.007


def muon_by_hand(weight: torch.Tensor, grads: list[torch.Tensor], lr: float, weight_decay: float, momentum: float,
                 split: bool) -> torch.Tensor:
    """torch's Muon, worked out (float64): the buffer moves towards each gradient (lerp by 1 - momentum), Nesterov
    takes the gradient towards the buffer by momentum, the update is orthogonalised (c_attn's three parts each,
    over sqrt(3), when split), decoupled weight decay multiplies by 1 - lr wd, and the step is
    lr sqrt(max(1, rows / cols)) ("original")."""
    w, buf = weight.double(), torch.zeros_like(weight, dtype=torch.float64)
    rows, cols = weight.shape
    for g in grads:
        g = g.double()
        buf = momentum * buf + (1 - momentum) * g
        update = (1 - momentum) * g + momentum * buf
        if split:
            ortho = torch.cat([reference_newton_schulz(part) for part in update.chunk(3)]) / math.sqrt(3)
        else:
            ortho = reference_newton_schulz(update)
        w = w * (1 - lr * weight_decay) - lr * math.sqrt(max(1, rows / cols)) * ortho
    return w


@pytest.mark.parametrize("split", [True, False], ids=["split_qkv", "whole"])
def test_muon_step_is_torchs_algorithm_with_qkv_orthogonalised_apart(split):
    C = 8
    g = torch.Generator().manual_seed(0)
    qkv, fc = torch.randn(3 * C, C, generator=g), torch.randn(4 * C, C, generator=g)
    grads = [(torch.randn(3 * C, C, generator=g), torch.randn(4 * C, C, generator=g)) for _ in range(3)]
    params = [torch.nn.Parameter(qkv.clone()), torch.nn.Parameter(fc.clone())]
    config = OptimConfig(name="muon", lr=1e-3, muon_lr=0.05, weight_decay=0.1, muon_momentum=0.9,
                         muon_split_qkv=split)
    muon = Muon(params, config, torch.float32)
    for grad_qkv, grad_fc in grads:
        params[0].grad, params[1].grad = grad_qkv.clone(), grad_fc.clone()
        muon.step()
    expected_qkv = muon_by_hand(qkv, [q for q, _ in grads], 0.05, 0.1, 0.9, split)
    expected_fc = muon_by_hand(fc, [f for _, f in grads], 0.05, 0.1, 0.9, False)  # (4C, C): never split
    # compared on the change, so the tolerance is on the updates (float32 Newton-Schulz against float64)
    assert max_rel_diff((params[0].detach() - qkv).double(), expected_qkv - qkv.double()) <= 1e-5
    assert max_rel_diff((params[1].detach() - fc).double(), expected_fc - fc.double()) <= 1e-5
    other = muon_by_hand(qkv, [q for q, _ in grads], 0.05, 0.1, 0.9, not split)
    assert max_rel_diff(other - qkv.double(), expected_qkv - qkv.double()) > 0.05  # the split matters


def test_muon_step_swaps_in_its_orthogonalisation_and_always_puts_torchs_back(monkeypatch):
    torchs = torch.optim._muon._zeropower_via_newtonschulz
    real = optim.newton_schulz
    calls = []

    def spy(update, *args):
        calls.append((tuple(update.shape), torch.optim._muon._zeropower_via_newtonschulz))
        return real(update, *args)
    monkeypatch.setattr(optim, "newton_schulz", spy)
    C = 8
    params = [torch.nn.Parameter(torch.randn(3 * C, C)), torch.nn.Parameter(torch.randn(C, 4 * C))]
    muon = Muon(params, OptimConfig(name="muon"), torch.float32)
    for p in params:
        p.grad = torch.randn_like(p)
    muon.step()
    assert [shape for shape, _ in calls] == [(C, C)] * 3 + [(C, 4 * C)]
    assert all(during == muon.orthogonalise for _, during in calls)  # torch's step called ours
    assert torch.optim._muon._zeropower_via_newtonschulz is torchs

    def fails(update, *args):
        raise RuntimeError("planted failure inside Newton-Schulz")
    monkeypatch.setattr(optim, "newton_schulz", fails)
    with pytest.raises(RuntimeError, match="planted failure"):
        muon.step()
    assert torch.optim._muon._zeropower_via_newtonschulz is torchs


def train_steps(model: GPT, optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 96, (2, 16), generator=g)
        optimizer.zero_grad()
        model(idx, idx.roll(-1, dims=1))[1].backward()
        optimizer.step()


def test_muon_with_adamw_state_round_trip_gives_identical_next_steps():
    model = GPT(MODERN)
    model.loss_chunk = 0
    optimizer = build_optimizer(model, MUON, "cpu", muon_dtype=torch.float32)
    train_steps(model, optimizer, 3, seed=0)  # from the third on every gradient is non-zero (zero-init head)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    assert set(saved_optimizer) == {"muon", "adamw"}

    resumed, fresh = GPT(MODERN), GPT(MODERN)
    for other in (resumed, fresh):
        other.load_state_dict(saved_model)
        other.loss_chunk = 0
    resumed_optimizer = build_optimizer(resumed, MUON, "cpu", muon_dtype=torch.float32)
    resumed_optimizer.load_state_dict(saved_optimizer)
    assert resumed_optimizer.muon.param_groups[0]["lr_scale"] == pytest.approx(20.0)
    fresh_optimizer = build_optimizer(fresh, MUON, "cpu", muon_dtype=torch.float32)
    for m, o in ((model, optimizer), (resumed, resumed_optimizer), (fresh, fresh_optimizer)):
        train_steps(m, o, 1, seed=5)
    after = model.state_dict()
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in after.items())
    # without the state (momentum buffers, Adam moments) the step is another one: the check above has teeth
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"):
        assert not torch.equal(fresh.state_dict()[name], after[name]), name

    adamw_state = torch.optim.AdamW(GPT(MODERN).parameters()).state_dict()
    with pytest.raises(ValueError, match="not Muon with AdamW"):
        resumed_optimizer.load_state_dict(adamw_state)


# ---- the wsd schedule -------------------------------------------------------------------------------------------

def test_wsd_schedule_by_hand():
    """lr 1e-3 to 1e-4, 3 warmup steps, 20 steps of which round(0.4 x 20) = 8 decay: flat at 1e-3 while more than 8
    steps are left, then min_lr + 9e-4 x left / 8."""
    wsd = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=3, schedule="wsd", decay_frac=0.4)
    expected = {0: 1e-3 / 3, 1: 2e-3 / 3, 2: 1e-3, 3: 1e-3, 8: 1e-3, 11: 1e-3,
                12: 1e-3,  # 8 steps left: the decay's first value is the peak itself
                13: 1e-4 + 9e-4 * 7 / 8, 16: 1e-4 + 9e-4 * 4 / 8, 19: 1e-4 + 9e-4 / 8,  # the last step, above min_lr
                20: 1e-4, 35: 1e-4}
    for step, lr in expected.items():
        assert lr_at(step, wsd, 20) == pytest.approx(lr, rel=1e-12), step
    lrs = [lr_at(step, wsd, 20) for step in range(20)]
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # never rises after warmup
    cosine = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=3)
    assert cosine.schedule == "cosine"
    for step in (0, 2, 3, 9, 19, 20):
        progress = (step - 3) / 17
        by_hand = 1e-3 * (step + 1) / 3 if step < 3 else 1e-4 + 0.5 * (1 + math.cos(math.pi * progress)) * 9e-4
        assert lr_at(step, cosine, 20) == pytest.approx(by_hand, rel=1e-12), step


# ---- refusals ---------------------------------------------------------------------------------------------------

def test_muon_with_fsdp_is_refused_at_load(tmp_path):
    with pytest.raises(ConfigError, match="optim.name=muon needs train.parallel=ddp"):
        load_config(["--optim.name=muon", "--train.parallel=fsdp", f"--train.out_dir={tmp_path / 'run'}"])
    cfg = load_config(["--config", "configs/demo-modern.toml", f"--train.out_dir={tmp_path / 'run'}"])
    assert cfg.optim.name == "muon" and cfg.train.parallel == "ddp"
    assert cfg.model.modern_flags() == ["rope", "rmsnorm", "qk-norm", "relu2", "zero-init projections"]


def test_export_of_a_modern_model_is_refused_before_writing(tmp_path):
    with pytest.raises(UserError, match=r"not GPT-2's architecture \(rope\)"):
        hf_export.export(GPT(GPTConfig(**SHAPE, position="rope")), tmp_path / "hf")
    with pytest.raises(UserError, match="logit soft-cap 15"):
        hf_export.export(GPT(MODERN), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    hf_export.refuse_modern(GPT(GPTConfig(**SHAPE)))  # GPT-2 itself passes


def test_model_differences_reads_a_config_without_the_new_keys_as_gpt2s():
    old = {"model": {**SHAPE, "bias": True, "dropout": 0.0}}  # a checkpoint from before the modern recipe
    gpt2 = dataclasses.asdict(GPTConfig(**SHAPE))
    assert run_dir.model_differences(old, gpt2) == []
    assert run_dir.model_differences(old, dataclasses.asdict(GPTConfig(**SHAPE, position="rope"))) == [
        "model.position 'learned' -> 'rope'"]
    assert run_dir.model_differences(old, dataclasses.asdict(MODERN)) == [
        "model.position 'learned' -> 'rope'", "model.norm 'layernorm' -> 'rmsnorm'", "model.qk_norm False -> True",
        "model.activation 'gelu' -> 'relu2'", "model.tie_head True -> False", "model.logit_softcap 0.0 -> 15.0"]
    # zero_init_proj is how the weights started, not what they are: a run may resume with it changed
    assert run_dir.model_differences(old, dataclasses.asdict(GPTConfig(**SHAPE, zero_init_proj=True))) == []


def resumable_checkpoint(folder, config: dict) -> None:
    """A checkpoint with every key resuming needs (their contents are not read before the refusals)."""
    save_checkpoint(folder / "ckpt_000002.pt", {"model": {}, "optimizer": {}, "step": 2, "tokens_seen": 0,
                                                 "train_loader": {}, "rng": [], "config": config, "world_size": 1})


def choose(folder, config: dict) -> run_dir.Start:
    run = run_dir.RunDir(folder)
    try:
        return run_dir.choose_start(run, "auto", config)
    finally:
        run.release()


def test_resuming_across_model_flags_or_optimizers_is_refused(tmp_path):
    cfg = Config(model=GPTConfig(**SHAPE))
    cfg.train.max_steps = 4
    old = to_dict(cfg)
    del old["optim"]["name"]  # a checkpoint from before optim.name: it trained with AdamW
    for key in GPT2_FLAGS:
        del old["model"][key]
    resumable_checkpoint(tmp_path, old)
    assert choose(tmp_path, to_dict(cfg)).step == 2  # read as GPT-2's, trained with AdamW: it resumes
    muon = copy.deepcopy(cfg)
    muon.optim.name = "muon"
    with pytest.raises(CheckpointError, match="trained with optim.name=adamw"):
        choose(tmp_path, to_dict(muon))
    rope = copy.deepcopy(cfg)
    rope.model.position = "rope"
    with pytest.raises(CheckpointError, match=r"the model differs \(model.position 'learned' -> 'rope'\)"):
        choose(tmp_path, to_dict(rope))


# ---- slow: the programs with the modern recipe ------------------------------------------------------------------

MODERN_ARGS = [f"--model.{key}={str(value).lower()}" for key, value in MODERN_FLAGS.items()] + [
    "--optim.name=muon", "--optim.schedule=wsd"]
# As tests/test_resume.py: dropout on, a warmup longer than the runs (each step's learning rate is then the same in a
# run of N steps and in one stopped at N/2), validation every 3 steps.
STEADY = ["--model.dropout=0.1", "--optim.warmup_steps=100", "--train.eval_interval=3", "--train.val_steps=1"]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def assert_same_run(out, ref, steps: int) -> None:
    """Bit-identical losses at every step and final weights."""
    assert losses(out) == losses(ref)
    assert list(losses(out)) == list(range(steps))
    final, expected = (load_checkpoint(run / f"ckpt_{steps:06d}.pt") for run in (out, ref))
    assert final["model"].keys() == expected["model"].keys()
    assert all(torch.equal(final["model"][k], v) for k, v in expected["model"].items())


@pytest.mark.slow
def test_modern_muon_run_resumes_exactly_on_one_process(tiny_shards, tmp_path):
    ref, split = tmp_path / "ref", tmp_path / "split"
    train_gpt2.main(tiny_run(tiny_shards, ref, *MODERN_ARGS, *STEADY, "--train.max_steps=6"))
    train_gpt2.main(tiny_run(tiny_shards, split, *MODERN_ARGS, *STEADY, "--train.max_steps=3"))
    train_gpt2.main(tiny_run(tiny_shards, split, *MODERN_ARGS, *STEADY, "--train.max_steps=6"))
    assert_same_run(split, ref, 6)
    saved = load_checkpoint(split / "ckpt_000006.pt")
    assert set(saved["optimizer"]) == {"muon", "adamw"}
    assert saved["config"]["model"]["position"] == "rope" and saved["config"]["optim"]["name"] == "muon"
    assert "transformer.wpe.weight" not in saved["model"]


@pytest.mark.slow
def test_modern_muon_run_resumes_exactly_on_two_ranks(tiny_shards, tmp_path):
    ref, split = tmp_path / "ref", tmp_path / "split"
    launch = ["--standalone", "--nproc_per_node=2"]
    run_script(*torchrun(*launch, *train_args(tiny_shards, ref, *MODERN_ARGS, *STEADY, "--train.max_steps=6")))
    run_script(*torchrun(*launch, *train_args(tiny_shards, split, *MODERN_ARGS, *STEADY, "--train.max_steps=3")))
    second = run_script(*torchrun(*launch, *train_args(tiny_shards, split, *MODERN_ARGS, *STEADY,
                                                       "--train.max_steps=6")))
    assert f"resuming from {split / 'ckpt_000003.pt'}: step 3" in second.stdout
    assert_same_run(split, ref, 6)
    assert len(load_checkpoint(split / "ckpt_000006.pt")["rng"]) == 2


@pytest.mark.slow
def test_modern_recipe_compiled_on_two_ranks_matches_one_eager_process(tiny_shards, tmp_path):
    """DDP and torch.compile with every modern flag and Muon: two compiled ranks (aot_eager: inductor's graphs, run
    eagerly) take the steps one eager process takes with twice the accumulation. Each rank orthogonalises the same
    all-reduced gradient; what differs is the float32 sum of the two halves."""
    common = [*MODERN_ARGS, "--train.max_steps=3", "--train.eval_interval=0"]
    run_script(*train_args(tiny_shards, tmp_path / "single", *common))
    result = run_script(*torchrun("--standalone", "--nproc_per_node=2", *train_args(
        tiny_shards, tmp_path / "ddp", *common, "--train.compile=true", "--train.compile_backend=aot_eager")))
    assert "compiled (aot_eager) x 2" in result.stdout
    single, ddp = (read_metrics(tmp_path / name) for name in ("single", "ddp"))
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [0, 1, 2]
    for record, expected in zip(ddp, single):
        assert record["loss"] == pytest.approx(expected["loss"], abs=1e-5)
        assert record["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
    final, expected = (load_checkpoint(tmp_path / name / "ckpt_000003.pt")["model"] for name in ("ddp", "single"))
    assert max((final[k] - v).abs().max().item() for k, v in expected.items()) <= 1e-5


def hellaswag_rows(n: int) -> list[dict]:
    """n HellaSwag rows short enough for a 32-token model: contexts of 5 to 10 words, endings of 1 to 4."""
    words = "the man woman then ball car floor wall cake table chair door game water hand".split()
    g = torch.Generator().manual_seed(0)

    def text(lo: int, hi: int) -> str:
        k = int(torch.randint(lo, hi + 1, (), generator=g))
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g))
    rows = []
    for i in range(n):
        context = text(5, 10)
        rows.append({"activity_label": "Synthetic", "ctx_a": context, "ctx_b": "", "ctx": context,
                     "endings": [text(1, 4) for _ in range(4)], "label": i % 4})
    return rows


@pytest.mark.slow
def test_hellaswag_of_a_modern_model_in_training_and_by_the_program_agree(tiny_shards, tmp_path):
    rows, out = tmp_path / "rows.jsonl", tmp_path / "run"
    rows.write_text("".join(json.dumps(row) + "\n" for row in hellaswag_rows(24)))
    train_gpt2.main(tiny_run(tiny_shards, out, *MODERN_ARGS, "--train.max_steps=4", "--train.eval_interval=0",
                             "--optim.lr=3e-3", "--train.hellaswag_interval=2", f"--train.hellaswag_data={rows}"))
    logged = [r for r in read_metrics(out) if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in logged] == [0, 2, 4]
    assert all(r["hellaswag_count"] == 24 and r["hellaswag_style"] == "completion" for r in logged)
    # the last evaluation is of the final weights: the checkpoint's, through the program and through evaluate()
    hellaswag_main(["--checkpoint", str(out), "--data", str(rows), "--dtype", "float32", "--compile", "false",
                    "--output", str(tmp_path / "result.json")])
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["step"] == 4 and written["count"] == 24
    assert written["acc"] == logged[-1]["hellaswag_acc"]
    assert written["acc_norm"] == logged[-1]["hellaswag_acc_norm"]
    model, _ = load_model(out)
    assert model.config.position == "rope" and model.config.logit_softcap == 15.0
    expected = evaluate(model, load(rows, style="completion"), FLOAT32)
    assert (expected.acc, expected.acc_norm) == (written["acc"], written["acc_norm"])


@pytest.fixture(scope="module")
def modern_run(tmp_path_factory):
    """A random modern model (weights away from their zero init, so its samples vary) saved as a run's
    checkpoint."""
    cfg = Config()
    cfg.train.sample_prompt = "import os"
    model = working_model(GPTConfig(block_size=32, vocab_size=tokenizer.N_VOCAB, n_layer=2, n_head=2, n_embd=32,
                                    **MODERN_FLAGS), scale=0.05)
    run = tmp_path_factory.mktemp("modern")
    save_model_checkpoint(run, model, step=5, cfg=cfg)
    return run, model.eval()


@pytest.mark.slow
def test_sample_py_samples_a_modern_checkpoint(modern_run):
    run, model = modern_run
    result = run_script("sample.py", "--checkpoint", run, "--prompt", "def parse(self", "--num-samples", "2",
                        "--max-new-tokens", "12", "--seed", "7", "--device", "cpu", timeout=120)
    texts = generate_text(model, "def parse(self", num_samples=2, max_new_tokens=12, seed=7)
    assert texts[0] != texts[1]
    assert result.stdout == f"--- sample 1 of 2 ---\n{texts[0]}\n--- sample 2 of 2 ---\n{texts[1]}\n"
    assert "ckpt_000005.pt: step 5" in result.stderr


@pytest.mark.slow
def test_export_hf_py_refuses_a_modern_checkpoint_in_one_line(modern_run, tmp_path):
    run, _ = modern_run
    result = run_script("export_hf.py", "--checkpoint", run, "--out", tmp_path / "hf", check=False, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this model is not GPT-2's architecture (rope, rmsnorm, "
                                                   "qk-norm, relu2, untied head, zero-init projections, logit "
                                                   "soft-cap 15)")
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_train_gpt2_py_runs_the_modern_demo_config(tiny_shards, tmp_path):
    out = tmp_path / "run"
    args = tiny_run(tiny_shards, out, "--train.max_steps=3", "--train.eval_interval=3", "--train.val_steps=1")
    assert args[:2] == ["--config", "configs/demo.toml"]
    result = run_script("train_gpt2.py", "--config", "configs/demo-modern.toml", *args[2:])
    first = result.stdout.splitlines()[0]
    assert first.startswith("model: ") and "(rope, rmsnorm, qk-norm, relu2, zero-init projections, Muon, wsd " \
        "schedule) |" in first, first
    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) for r in steps) and steps[-1]["loss"] < steps[0]["loss"]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3]
    saved = load_checkpoint(out / "ckpt_000003.pt")
    # the demo's measurements left the head tied and the soft-cap off
    assert saved["config"]["model"] == {**saved["config"]["model"], **MODERN_FLAGS, "tie_head": True,
                                        "logit_softcap": 0.0}
    assert saved["config"]["optim"]["name"] == "muon" and saved["config"]["optim"]["schedule"] == "wsd"


def test_under_muon_only_the_adamw_layers_ratio_warnings_remain(tmp_path):
    """Muon's step size is set by the LR and the shape, so the blocks' update ratios are recorded but not warned
    about; the AdamW layers' ratios and non-finite gradients still warn."""
    model = GPT(GPTConfig(**SHAPE))
    high = {"h.0": {"update_ratio": 10 * HIGH_RATIO}, "wte": {"update_ratio": 10 * HIGH_RATIO}}
    for muon, warned in ((True, ["wte"]), (False, ["h.0", "wte"])):
        health = HealthMonitor(model, tmp_path / "health.jsonl", 1, 1.0, muon=muon, log=lambda line: None)
        warnings = [health.check(step, high, []) for step in range(WARN_AFTER)][-1]
        assert [w.split(":")[0] for w in warnings] == warned, muon
        assert health.check(WARN_AFTER, high, ["h.0"])[0].startswith("non-finite gradient norm")
