"""Bits per byte: token byte lengths, the figure against a plain forward per row, <|endoftext|> left out, the same
result for any batch size, from a ShardLoader, and two ranks as one process."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import on_gloo_ranks, sharp_gpt

from model import GPTConfig
from pretrain import runtime, tokenizer
from pretrain.bpb import bits_per_byte, measure, token_byte_lengths
from pretrain.loader import ShardLoader
from pretrain.shards import ShardError, list_shards, read_shard, write_shard

FLOAT32 = runtime.resolve("cpu", "float32", False)
TINY = GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=64)


@pytest.fixture(scope="module")
def val_dir(tiny_shards, tmp_path_factory):
    """Real text with a document boundary every 50 tokens, in two val shards (rows cross from one to the next)."""
    text = np.asarray(read_shard(tiny_shards / "tiny_val_000000.bin"), dtype=np.int64)[1:2001]
    tokens = np.insert(text, np.arange(0, len(text), 50), tokenizer.EOT_ID)
    out = tmp_path_factory.mktemp("val")
    write_shard(out / "doc_val_000000.bin", tokens[:1000])
    write_shard(out / "doc_val_000001.bin", tokens[1000:])
    return out


def val_stream(data_dir) -> np.ndarray:
    return np.concatenate([np.asarray(read_shard(p), dtype=np.int64) for p in list_shards(data_dir, "val")])


def reference_bpb(model, stream: np.ndarray, tokens: int, seq_len: int) -> tuple[float, int]:
    """Rows of seq_len tokens from the start, each a full forward; nats and bytes summed in Python, targets that
    are <|endoftext|> skipped; bytes from decoding each target token on its own."""
    enc = tokenizer.get_encoding()
    nats, n_bytes = 0.0, 0
    for start in range(0, tokens, seq_len):
        n = min(seq_len, tokens - start)
        x = torch.from_numpy(stream[start:start + n])[None]
        targets = stream[start + 1:start + n + 1].tolist()
        with torch.no_grad():
            logits = model.lm_head(model.hidden_states(x))[0, :, :tokenizer.N_VOCAB].double()
        losses = F.cross_entropy(logits, torch.tensor(targets), reduction="none").tolist()
        for loss, target in zip(losses, targets):
            if target != tokenizer.EOT_ID:
                nats += loss
                n_bytes += len(enc.decode_single_token_bytes(target))
    return nats / math.log(2) / n_bytes, n_bytes


def test_token_byte_lengths_are_utf8_bytes_and_zero_for_endoftext():
    lengths = token_byte_lengths()
    assert lengths.shape == (tokenizer.N_VOCAB,)
    hello, world = tokenizer.encode("Hello world")  # [15496, 995]
    assert (lengths[hello].item(), lengths[world].item()) == (5, 6)
    assert lengths[tokenizer.EOT_ID].item() == 0
    text = "naïve café — 東京 and plain words"
    assert lengths[tokenizer.encode(text)].sum().item() == len(text.encode("utf-8"))


def test_bpb_is_summed_nats_over_bytes_of_the_first_tokens_without_endoftext(val_dir):
    model = sharp_gpt(TINY)
    stream = val_stream(val_dir)
    tokens = 32 * 35 + 5  # past the first shard, and not a multiple of the row length: the last row is short
    expected, n_bytes = reference_bpb(model, stream, tokens, seq_len=32)
    result = measure(model, val_dir, tokens, FLOAT32, batch_size=3)
    assert result.bpb == pytest.approx(expected, rel=1e-6)
    assert result.bytes == n_bytes
    assert result.tokens == tokens
    assert result.counted_tokens == tokens - 22  # the targets at 51, 102, ..., 1122 are <|endoftext|>
    for batch_size in (1, 8):
        assert measure(model, val_dir, tokens, FLOAT32, batch_size).bpb == pytest.approx(result.bpb, rel=1e-9)


def test_a_val_loader_gives_its_rows_and_keeps_its_position(tiny_shards):
    model = sharp_gpt(TINY)
    loader = ShardLoader(tiny_shards, "val", batch_size=2, seq_len=16, shuffle=False)
    loader.next_batch()
    expected, _ = reference_bpb(model, val_stream(tiny_shards), 300, seq_len=16)  # the loader's seq_len
    assert bits_per_byte(model, loader, 300, FLOAT32) == pytest.approx(expected, rel=1e-6)
    assert loader.position == 32


def test_too_few_val_tokens_is_an_error_naming_the_folder(tiny_shards):
    with pytest.raises(ShardError, match=f"the val split of {tiny_shards} holds 8,192 tokens; bits per byte over "
                                         "9,000 targets needs 9,001"):
        measure(sharp_gpt(TINY), tiny_shards, 9000, FLOAT32)


def _bits_per_byte(rank: int, data_dir) -> float:
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    return measure(sharp_gpt(TINY), data_dir, 32 * 5 + 7, FLOAT32, batch_size=2).bpb


@pytest.mark.slow
def test_two_gloo_ranks_give_one_process_figure(tiny_shards):
    one_process = measure(sharp_gpt(TINY), tiny_shards, 32 * 5 + 7, FLOAT32).bpb
    rank0, rank1 = on_gloo_ranks(_bits_per_byte, tiny_shards)
    assert rank0 == pytest.approx(one_process, rel=1e-9)
    assert rank1 == rank0


@pytest.mark.slow
def test_the_scorers_compile_with_the_runtimes_backend(tiny_shards, monkeypatch):
    """bits per byte, HellaSwag and CORE score through hidden_states compiled as training's model is compiled: with
    train.compile_backend (aot_eager where inductor cannot build kernels), not inductor regardless."""
    compiled_with = []
    real_compile = torch.compile

    def spy(fn, **options):
        compiled_with.append(options.get("backend"))
        return real_compile(fn, **options)
    monkeypatch.setattr(torch, "compile", spy)
    rt = runtime.Runtime(torch.device("cpu"), torch.float32, compile=True, compile_backend="aot_eager")
    model = rt.maybe_compile(sharp_gpt(TINY))
    compiled = measure(model, tiny_shards, 32 * 3, rt, batch_size=2).bpb
    assert compiled_with == ["aot_eager", "aot_eager"]  # the model, then the scorer's hidden_states
    assert compiled == pytest.approx(measure(sharp_gpt(TINY), tiny_shards, 32 * 3, FLOAT32, batch_size=2).bpb,
                                     rel=1e-5)
