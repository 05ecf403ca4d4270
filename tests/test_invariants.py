"""The training arithmetic against exact equivalences: accumulation against a bigger batch, clipping against its
definition, compiled against eager, and the tokenizer against a tampered cache.

Each test states an identity that holds to float32 rounding, so a lost scale factor, a skipped clip or a compiled
path that quietly runs eager fails it.
"""

import copy
import os

import pytest
import torch
from torch._dynamo.utils import counters

from model import GPT, GPTConfig
from pretrain import runtime, tokenizer
from pretrain.config import OptimConfig, load_config
from pretrain.loader import ShardLoader
from pretrain.optim import build_optimizer
from pretrain.sampling import generate_text
from pretrain.trainer import Samples, evaluate, train_step

# Big enough a vocabulary for the tiny_shards tokens; small everywhere else.
SMALL = GPTConfig(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
FP32_CPU = runtime.Runtime(torch.device("cpu"), torch.float32, compile=False)
COMPILE_BACKEND = os.environ.get("TEST_COMPILE_BACKEND", "aot_eager")  # see the compile test's docstring


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def train_loader(data_dir, batch_size: int) -> ShardLoader:
    return ShardLoader(data_dir, "train", batch_size=batch_size, seq_len=16, shuffle=False)


def test_accumulated_steps_equal_one_big_batch(tiny_shards):
    """2 micro-steps of 2 sequences are one step of 4: the same loss, gradient norm and update, every step."""
    torch.manual_seed(0)
    accumulating = GPT(SMALL)
    big_batch = copy.deepcopy(accumulating)
    optimizers = [build_optimizer(m, OptimConfig(weight_decay=0.1, lr=1e-3), "cpu") for m in (accumulating, big_batch)]
    loaders = [train_loader(tiny_shards, 2), train_loader(tiny_shards, 4)]
    for _ in range(3):
        loss_a, norm_a = train_step(accumulating, optimizers[0], loaders[0], 2, 1e-3, 1.0, FP32_CPU)
        loss_b, norm_b = train_step(big_batch, optimizers[1], loaders[1], 1, 1e-3, 1.0, FP32_CPU)
        assert loss_a == pytest.approx(loss_b, rel=1e-6)
        assert norm_a == pytest.approx(norm_b, rel=1e-5)
    assert (flat_params(accumulating) - flat_params(big_batch)).abs().max().item() <= 1e-5  # Adam: ~lr x rounding


@pytest.mark.parametrize("grad_clip", [0.05, 0.0])
def test_clipping_bounds_the_update(tiny_shards, grad_clip):
    """With plain SGD at lr 1 the update IS the gradient: its norm is min(norm, grad_clip), and the reported norm
    is the one before clipping. grad_clip 0 clips nothing."""
    torch.manual_seed(0)
    model = GPT(SMALL)
    before = flat_params(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    _, grad_norm = train_step(model, optimizer, train_loader(tiny_shards, 2), 1, 1.0, grad_clip, FP32_CPU)
    update_norm = (flat_params(model) - before).norm().item()
    assert grad_norm > 10 * 0.05  # so that clipping at 0.05 changes the update
    expected = min(grad_norm, grad_clip) if grad_clip else grad_norm
    assert update_norm == pytest.approx(expected, rel=1e-4)


class Lines:
    """A stand-in for the metrics logger: keeps the lines written."""

    def __init__(self):
        self.lines = []

    def write(self, line: str) -> None:
        self.lines.append(line)


class Batches:
    """The same few batches every time (a stand-in for a loader: reset and next_batch)."""

    def __init__(self, vocab_size: int, count: int):
        generator = torch.Generator().manual_seed(1)
        self.batches = [torch.randint(0, vocab_size, (2, 9), generator=generator) for _ in range(count)]
        self.next = 0

    def reset(self) -> None:
        self.next = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batches[self.next % len(self.batches)]
        self.next += 1
        return batch[:, :-1], batch[:, 1:]


@pytest.mark.slow
def test_compiled_model_trains_evaluates_and_samples_like_eager():
    """torch.compile really compiles training steps, evaluation and sampling (no silent fall-back to eager: the
    graph counters must grow at each), and every result equals eager to float32 rounding.

    The backend is aot_eager: all of torch.compile (graph capture, guards and recompiles, AOTAutograd's forward
    and backward graphs) but inductor's code generator, which costs 30-150 s per graph on 2 busy CPU cores where
    this takes a few seconds. TEST_COMPILE_BACKEND=inductor runs the same test with the default backend."""
    config = GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    eager = GPT(config)
    plain = copy.deepcopy(eager)
    compiled = torch.compile(plain, backend=COMPILE_BACKEND)
    optimizers = [build_optimizer(m, OptimConfig(weight_decay=0.1, lr=1e-2), "cpu") for m in (eager, plain)]
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        loss_eager, norm_eager = train_step(eager, optimizers[0], Batches(64, 2), 2, 1e-2, 1.0, FP32_CPU)
        loss_compiled, norm_compiled = train_step(compiled, optimizers[1], Batches(64, 2), 2, 1e-2, 1.0, FP32_CPU)
        assert loss_compiled == pytest.approx(loss_eager, rel=1e-5)
        assert norm_compiled == pytest.approx(norm_eager, rel=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1

    val_eager = evaluate(eager, Batches(64, 2), 2, FP32_CPU)
    val_compiled = evaluate(compiled, Batches(64, 2), 2, FP32_CPU)
    assert val_compiled == pytest.approx(val_eager, rel=1e-5)
    assert counters["stats"]["unique_graphs"] > graphs  # eval mode without gradients: a graph of its own
    graphs = counters["stats"]["unique_graphs"]

    # what training samples with: its Samples job calls generate_text on the compiled module
    samples = Samples(load_config(["--train.sample_prompt=Hello", "--train.sample_tokens=3"]), compiled, FP32_CPU,
                      Lines(), runs_here=True)
    assert samples.module is compiled
    sampled = generate_text(samples.module, "Hello", num_samples=2, max_new_tokens=3, seed=1)
    assert counters["stats"]["unique_graphs"] > graphs  # sampling ran the compiled forward, not the eager one
    assert sampled == generate_text(eager, "Hello", num_samples=2, max_new_tokens=3, seed=1)


def test_tokenizer_ignores_a_tampered_tiktoken_cache(tmp_path, monkeypatch):
    """tiktoken caches files it reads by a hash of their path and, given no expected hash, trusts the cache: the
    ranks must come from the bytes we checked, not from a cache file someone else wrote."""
    import hashlib

    ranks_bytes = tokenizer.RANKS_PATH.read_bytes()
    hello = b"SGVsbG8= 15496\n"  # "Hello" -> 15496
    assert hello in ranks_bytes
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / hashlib.sha1(str(tokenizer.RANKS_PATH).encode()).hexdigest()).write_bytes(
        ranks_bytes.replace(hello, b"SGVsbG8= 995\n"))  # "Hello" now shares " world"'s id
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    encoding = tokenizer.get_encoding.__wrapped__(tokenizer.RANKS_PATH)  # built afresh, not lru-cached
    assert encoding.encode_ordinary("Hello world") == [15496, 995]
