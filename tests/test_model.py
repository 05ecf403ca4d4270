"""The model against independent references: transformers' GPT-2, explicit attention, GPT-2's init rules."""

import math
import sys

import pytest
import torch
from torch.nn import functional as F

from model import GPT, GPTConfig
from pretrain.config import OptimConfig
from pretrain.optim import build_optimizer

TINY = GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=32)


def test_matches_transformers_gpt2(tmp_path):
    import transformers  # the independent reference; in requirements-dev.txt
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_positions=64, vocab_size=500, n_layer=3, n_head=4, n_embd=64,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    # Weights far from the 0.02 init, so that every nonlinearity works outside its near-linear range (with the
    # init's small activations the exact GELU and GPT-2's tanh GELU agree to 1e-5) and LayerNorm gains matter.
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            param.normal_(0.0, 0.1)
            if ".ln_" in name and name.endswith(".weight"):
                param.add_(1.0)
    hf_model.save_pretrained(tmp_path)

    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert (model.config.vocab_size, model.config.n_layer, model.config.block_size) == (500, 3, 64)
    idx = torch.randint(0, 500, (3, 40))
    with torch.no_grad():
        expected = hf_model(idx).logits
        logits, loss = model(idx, idx)
        last, _ = model(idx)
    assert expected.abs().max().item() > 2  # logits of order 1: the tolerances below are float32 rounding
    # float32 rounding gives ~1.5e-6 here; the exact GELU in place of the tanh one gives 1e-3
    assert (logits - expected).abs().max().item() <= 1e-5
    assert (last[:, -1] - expected[:, -1]).abs().max().item() <= 1e-5
    expected_loss = F.cross_entropy(expected.reshape(-1, 500), idx.reshape(-1))
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-6)


def test_from_pretrained_missing_hub_model_is_one_clear_error(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, not after retries
    with pytest.raises(OSError, match="could not load GPT-2 weights 'gpt2-not-a-model'"):
        GPT.from_pretrained("gpt2-not-a-model")


def test_from_pretrained_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install transformers"):
        GPT.from_pretrained("gpt2")


def test_attention_is_causal_and_matches_explicit_softmax():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 10, TINY.n_embd)
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, TINY.n_head, C // TINY.n_head).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    expected = attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))
    assert torch.allclose(attn(x), expected, atol=1e-6)
    # Changing a later token never changes an earlier position's logits.
    idx = torch.randint(0, TINY.vocab_size, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (changed[0, 8] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, _ = model(idx, idx)
        b, _ = model(changed, changed)
    assert torch.allclose(a[:, :8], b[:, :8]) and not torch.allclose(a[:, 8:], b[:, 8:])


def test_gpt2_initialisation_and_tied_head():
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=2048, n_layer=8, n_head=4, n_embd=256)
    model = GPT(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.attn.c_attn.bias.abs().max().item() == 0.0
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    # The tied matrix is counted once.
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))


def test_gpt2_124M_has_its_exact_parameter_count():
    with torch.device("meta"):
        padded, openai = GPT(GPTConfig()), GPT(GPTConfig(vocab_size=50257))
    # counted by hand: the embeddings (tied head: once), 12 blocks of 4 Linears and 2 LayerNorms, the final LayerNorm
    C, L = 768, 12
    block = (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C) + 2 * (2 * C)
    assert openai.num_params() == 50257 * C + 1024 * C + L * block + 2 * C == 124_439_808  # OpenAI's GPT-2
    assert padded.num_params() == 124_439_808 + 47 * C == 124_475_904  # 47 padded rows of the vocabulary


def test_weight_decay_only_on_matrices():
    model = GPT(TINY)
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1, lr=1e-3), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    named = dict(model.named_parameters())
    assert any(p is named["transformer.wte.weight"] for p in decay["params"])
    assert any(p is named["transformer.ln_f.weight"] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8


def test_forward_without_targets_returns_last_position_only():
    model = GPT(TINY)
    logits, loss = model(torch.randint(0, TINY.vocab_size, (2, 7)))
    assert logits.shape == (2, 1, TINY.vocab_size) and loss is None
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, TINY.block_size + 1, dtype=torch.long))


def test_generate_respects_n_vocab_and_crops_long_prompts():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    prompt = torch.zeros(4, 3, dtype=torch.long)
    out = model.generate(prompt, 40, temperature=2.0, n_vocab=10, generator=torch.Generator().manual_seed(1))
    assert out.shape == (4, 43)
    assert torch.equal(out[:, :3], prompt)
    assert out.max().item() < 10  # padded vocabulary rows are never sampled
    # Prompts longer than block_size are cropped to the last block_size tokens.
    long_prompt = torch.randint(0, TINY.vocab_size, (1, TINY.block_size + 5))
    assert model.generate(long_prompt, 2, top_k=5).shape == (1, TINY.block_size + 7)


def next_token_distribution(model: GPT, prompt: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) of the token after prompt, the reference the samples must follow."""
    with torch.no_grad():
        logits = model(prompt)[0][0, -1].double()
    return torch.softmax(logits / temperature, dim=-1)


def draws(model: GPT, prompt: torch.Tensor, n: int, **sampling) -> torch.Tensor:
    """n independent next tokens after prompt (one generate call over n copies of it)."""
    return model.generate(prompt.repeat(n, 1), 1, generator=torch.Generator().manual_seed(0), **sampling)[:, -1]


def test_sampling_frequencies_follow_the_softmax_of_the_logits_over_the_temperature():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # a peaked distribution: a wrong temperature would show plainly
    prompt = torch.randint(0, TINY.vocab_size, (1, 5))
    n = 40_000
    for temperature in (0.5, 1.0, 2.0):
        expected = next_token_distribution(model, prompt, temperature)
        counts = torch.bincount(draws(model, prompt, n, temperature=temperature), minlength=TINY.vocab_size)
        observed = counts.double() / n
        # each frequency within 5 standard deviations of its binomial expectation (plus one count)
        bound = 5 * torch.sqrt(expected * (1 - expected) / n) + 1 / n
        assert ((observed - expected).abs() <= bound).all(), (temperature, (observed - expected).abs().max())


def test_top_k_samples_only_among_the_k_likeliest_and_top_k_1_is_greedy():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    prompt = torch.randint(0, TINY.vocab_size, (1, 5))
    likeliest = next_token_distribution(model, prompt, 1.0).topk(5).indices
    sampled = draws(model, prompt, 2000, temperature=1.5, top_k=5)
    assert set(sampled.tolist()) <= set(likeliest.tolist())
    assert len(set(sampled.tolist())) == 5  # and all five do occur
    greedy = model.generate(prompt, 8, temperature=0)
    assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_k=1,
                                      generator=torch.Generator().manual_seed(3)), greedy)
