"""Our GPT as a Hugging Face GPT-2 folder: config.json, model.safetensors and the tokenizer files.

GPT2LMHeadModel.from_pretrained(folder) loads it (and with it lm-evaluation-harness and the rest of that ecosystem);
GPT.from_pretrained(folder) and checkpoint.load_model(folder) read it back. The padded vocabulary rows (ids 50257
and up, never targets) are dropped, and the four Linear weights Hugging Face stores as Conv1D are transposed.
The tokenizer files (vocab.json, merges.txt) are derived from the tiktoken ranks shipped in pretrain/assets, so
GPT2TokenizerFast encodes exactly like pretrain.tokenizer. Writing needs safetensors, not transformers.
"""

import json
from pathlib import Path

import torch

from model import CONV1D_WEIGHTS, GPT
from pretrain import tokenizer
from pretrain.errors import UserError, missing_package
from pretrain.fileio import atomic_path, atomic_write_text


def refuse_modern(model: GPT) -> None:
    """Hugging Face's GPT-2 layout holds GPT-2's architecture only: a model with the modern flags cannot be written
    as one (it would load, and compute something else)."""
    if not model.config.is_gpt2():
        raise UserError(f"this model is not GPT-2's architecture ({', '.join(model.config.modern_flags())}), and "
                        "Hugging Face's GPT-2 layout has no rotary positions, RMSNorm, QK-norm, ReLU², untied head or "
                        "soft-cap: evaluate it with evaluate.py or hellaswag.py and sample it with sample.py, which "
                        "read our checkpoints directly")


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under GPT2LMHeadModel's names and layouts, float32, vocabulary cut to GPT-2's 50257.
    The LM head is left out: it is the token embedding (tie_word_embeddings)."""
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        value = value.detach().float().cpu()
        if key == "transformer.wte.weight":
            value = value[:tokenizer.N_VOCAB]
        has_bias_slot = key.endswith(".weight") and key not in ("transformer.wte.weight", "transformer.wpe.weight")
        if not model.config.bias and has_bias_slot:
            # Hugging Face's GPT-2 always has biases: zeros make it compute what a bias-free model computes.
            state[key.removesuffix(".weight") + ".bias"] = torch.zeros(value.shape[0])
        if key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        state[key] = value.contiguous().clone()
    return state


def hf_config(model: GPT) -> dict:
    cfg = model.config
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": tokenizer.N_VOCAB,
            "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new",  # GPT-2's tanh GELU
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True,
            "tie_word_embeddings": True, "bos_token_id": tokenizer.EOT_ID, "eos_token_id": tokenizer.EOT_ID,
            "use_cache": True, "dtype": "float32"}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte in vocab.json and merges.txt: printable Latin-1 bytes stand for
    themselves, the other 68 (controls, space, ...) take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in mapping):
        mapping[b] = chr(256 + n)
    return mapping


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that made each multi-byte token, in rank order. Byte-pair encoding a token with only the lower
    ranks stops at exactly two parts: those two were merged into it."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [ranks.get(parts[i] + parts[i + 1], rank) for i in range(len(parts) - 1)]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[best] >= rank:
                raise ValueError(f"token {token!r} (rank {rank}) cannot be built from lower ranks")
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def write_tokenizer(out_dir: Path, model_max_length: int) -> None:
    ranks = tokenizer.get_encoding()._mergeable_ranks
    to_text = byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_text[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[tokenizer.EOT_TOKEN] = tokenizer.EOT_ID
    merges = ["#version: 0.2", *(f"{text(a)} {text(b)}" for a, b in bpe_merges(ranks))]
    atomic_write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(out_dir / "merges.txt", "\n".join(merges) + "\n")
    special = {"bos_token": tokenizer.EOT_TOKEN, "eos_token": tokenizer.EOT_TOKEN, "unk_token": tokenizer.EOT_TOKEN}
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
         **special}, indent=2) + "\n")
    atomic_write_text(out_dir / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")


def export(model: GPT, out_dir: str | Path) -> Path:
    """Write the Hugging Face GPT-2 folder; each file appears complete or not at all."""
    refuse_modern(model)
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise missing_package("exporting to Hugging Face format", "safetensors") from None
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(hf_state_dict(model), tmp, metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(hf_config(model), indent=2) + "\n")
    write_tokenizer(out_dir, model.config.block_size)
    return out_dir
