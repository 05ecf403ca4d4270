"""The speed and memory options give the same numbers as the plain way: the chunked head against the plain head +
cross-entropy, the GELU recomputed against kept, activation checkpointing on against off, FSDP on 2 gloo ranks against
DDP (and resumed), and a compiled model that evaluates and samples without recompiling. bench.py's report is checked
here too; how fast the options are is bench.py's job, not a test's."""

import json

import pytest
import torch
from helpers import GLOO_TIMEOUT, read_metrics, run_script, train_args
from torch.nn import functional as F

from model import GPT, MLP, ChunkedHeadLoss, GPTConfig
from pretrain import parallel, runtime
from pretrain.checkpoint import load_checkpoint
from pretrain.config import OptimConfig
from pretrain.optim import build_optimizer

TINY = GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=32)


def head_inputs(n: int = 37, width: int = 16, vocab: int = 96):
    torch.manual_seed(0)
    x = torch.randn(n, width, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(vocab, width, dtype=torch.float64) * 0.5).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    targets[[3, 4, 30]] = -1  # ignored positions, as padding would be
    return x, weight, targets


def gradients(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])  # one row, a ragged last chunk, exactly all, more than all
def test_chunked_head_loss_and_gradients_match_plain_cross_entropy(chunk):
    x, weight, targets = head_inputs()
    plain = F.cross_entropy(x @ weight.t(), targets, ignore_index=-1)
    chunked = ChunkedHeadLoss.apply(x, weight, targets, chunk, 0.0)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-12)
    # a loss scaled downstream (as by gradient accumulation) scales the gradients too
    for got, want in zip(gradients(chunked * 0.5, x, weight), gradients(plain * 0.5, x, weight)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_chunked_head_ignores_only_the_ignored_targets():
    x, weight, targets = head_inputs()
    keep = targets != -1
    chunked = ChunkedHeadLoss.apply(x, weight, targets, 8, 0.0)
    plain_kept = F.cross_entropy(x[keep] @ weight.t(), targets[keep])
    assert chunked.item() == pytest.approx(plain_kept.item(), rel=1e-12)
    grad_x, = gradients(chunked, x)
    assert grad_x[~keep].abs().max().item() == 0.0


def test_model_with_chunked_head_trains_like_the_plain_head():
    torch.manual_seed(0)
    model = GPT(TINY)
    model.set_training_memory(loss_chunk=24)
    idx = torch.randint(0, TINY.vocab_size, (3, 20))
    targets = torch.randint(0, TINY.vocab_size, (3, 20))
    logits, chunked = model(idx, targets)
    assert logits is None  # never materialised
    chunked_grads = gradients(chunked, *model.parameters())
    model.set_training_memory(loss_chunk=0)
    logits, plain = model(idx, targets)
    assert logits.shape == (3, 20, TINY.vocab_size)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    for got, want in zip(chunked_grads, gradients(plain, *model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_chunked_head_under_bfloat16_autocast_is_close_to_the_plain_head():
    x, weight, targets = head_inputs()
    x, weight = x.float().detach().requires_grad_(), weight.float().detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(x @ weight.t(), targets, ignore_index=-1)
        chunked = ChunkedHeadLoss.apply(x, weight, targets, 8, 0.0)
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-3)  # bfloat16 logits: ~3 significant digits
    for got, want in zip(gradients(chunked, x, weight), gradients(plain, x, weight)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.05, atol=2e-3)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_mlp_recomputing_its_gelu_gives_the_plain_paths_output_and_gradients(bias, autocast):
    torch.manual_seed(0)
    mlp = MLP(GPTConfig(**{**TINY.__dict__, "bias": bias}))
    x = torch.randn(3, 17, TINY.n_embd, requires_grad=True)
    results = []
    for forward in (mlp, lambda x: mlp.c_proj(mlp.gelu(mlp.c_fc(x)))):  # the model's way, the plain way
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = forward(x)
        results.append((out, gradients(out.float().square().sum(), x, *mlp.parameters())))
    (out, grads), (plain_out, plain_grads) = results
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(out, plain_out)
    for got, want in zip(grads, plain_grads):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


@pytest.mark.parametrize("recompute_gelu", [True, False])
def test_mlp_keeps_its_input_and_the_gelus_input_but_not_the_gelus_output(recompute_gelu):
    """What a training step holds from forward to backward: the MLP's input (n_embd per token) and c_fc's output
    (4 n_embd per token), and GELU's output (another 4 n_embd) only when told to keep it."""
    mlp = MLP(TINY)
    mlp.recompute_gelu = recompute_gelu
    x = torch.randn(2, 16, TINY.n_embd, requires_grad=True)
    parameters = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
    saved = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        mlp(x)
    widths = 1 + 4 if recompute_gelu else 1 + 4 + 4
    assert sum(saved.values()) == widths * 2 * 16 * TINY.n_embd * 4  # float32 bytes


def test_activation_checkpointing_gives_identical_losses_and_gradients():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    _, loss = model(idx, idx)
    plain_grads = gradients(loss, *model.parameters())
    parallel.set_activation_checkpointing(model, True)
    _, recomputed = model(idx, idx)
    assert recomputed.grad_fn is not None
    assert recomputed.item() == loss.item()
    for got, want in zip(gradients(recomputed, *model.parameters()), plain_grads):
        assert torch.equal(got, want)
    assert set(model.state_dict()) == set(GPT(TINY).state_dict())  # checkpoints keep their keys
    parallel.set_activation_checkpointing(model, False)
    assert all("forward" not in block.__dict__ for block in model.transformer.h)


@pytest.mark.slow
def test_compiled_model_evaluates_and_samples_without_recompiling_at_every_call():
    import torch._dynamo.utils
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of graphs other tests compiled
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY.__dict__, "n_layer": 1})).eval()
    compiled = runtime.Runtime(torch.device("cpu"), torch.float32, True).maybe_compile(model)
    x = torch.randint(0, TINY.vocab_size, (2, 16))
    graphs = torch._dynamo.utils.counters["stats"]
    def same_as_eager(*args) -> None:  # every call's output is the eager model's, to float32 rounding
        for got, want in zip(compiled(*args), model(*args)):
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        for _ in range(3):  # evaluation: the same batch shape at every call
            same_as_eager(x, x)
        after_evaluation = graphs["unique_graphs"]
        # sampling calls forward with the sequence one token longer each time
        for length in range(3, 12):
            same_as_eager(torch.randint(0, TINY.vocab_size, (2, length)))
        after_sampling = graphs["unique_graphs"]
        for length in range(3, 12):
            same_as_eager(torch.randint(0, TINY.vocab_size, (2, length)))
        same_as_eager(x, x)
    assert after_evaluation == 1
    assert after_sampling - after_evaluation <= 2  # the first length, then one graph for any length
    assert graphs["unique_graphs"] == after_sampling  # later calls reuse them all


@pytest.mark.slow
def test_checkpoint_of_a_compiled_ddp_model_has_the_plain_models_keys(free_port):
    """prepare() wraps the compiled model in DDP (the multi-GPU default): unwrap peels both, so checkpoints hold the
    GPT's own keys (not _orig_mod.*) and load_model, sample.py and hellaswag.py can read them."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port}", rank=0, world_size=1,
                            timeout=GLOO_TIMEOUT)
    try:
        model = GPT(TINY)
        wrapped = DDP(torch.compile(model))  # compiling is lazy: nothing runs here
        assert parallel.unwrap(wrapped) is model
        assert parallel.is_compiled(wrapped)
        assert not parallel.is_compiled(DDP(model))
        model_state, optimizer_state = parallel.full_state_dicts(wrapped, build_optimizer(model, OptimConfig(), "cpu"))
        assert list(model_state) == list(GPT(TINY).state_dict())
        assert len(optimizer_state["param_groups"]) == 2
    finally:
        dist.destroy_process_group()


def tiny_run_args(data_dir, out_dir, *extra: str) -> list:
    """2 ranks x 2 micro-steps, a chunked head that splits a micro-batch, validation and samples every 2 steps."""
    return train_args(data_dir, out_dir, "--train.loss_chunk=48", "--data.total_batch_tokens=512",
                      "--train.eval_interval=2", "--train.val_steps=2", "--train.max_steps=3",
                      "--train.sample_interval=2", "--train.sample_tokens=2", *extra)


@pytest.mark.slow
def test_fsdp_on_two_gloo_ranks_matches_ddp(tiny_shards, tmp_path):
    """The same 2 ranks x 2 micro-steps with FSDP and with DDP see the same tokens, so losses, gradient norms,
    validation losses, final weights and AdamW state must agree (test_train checks DDP against one process)."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    fsdp_run = run_script(*torchrun, *tiny_run_args(tiny_shards, tmp_path / "fsdp", "--train.parallel=fsdp"),
                          timeout=280)
    run_script(*torchrun, *tiny_run_args(tiny_shards, tmp_path / "ddp"), timeout=280)
    assert "2 ranks x 2 accumulation steps" in fsdp_run.stdout
    # sampling under FSDP: every rank runs it, rank 0 prints; after step 2 and after the last (3), 2 samples each
    assert fsdp_run.stdout.count("--- sample ") == 4
    ddp, fsdp = (read_metrics(tmp_path / name) for name in ("ddp", "fsdp"))
    assert [r.keys() for r in fsdp] == [r.keys() for r in ddp]
    for key in ("loss", "val_loss"):
        assert [r[key] for r in fsdp if key in r] == pytest.approx([r[key] for r in ddp if key in r], rel=1e-5)
    # the norm sums squares in another order (per shard, then across ranks): float32 rounding, ~1e-5 relative
    assert [r["grad_norm"] for r in fsdp if "loss" in r] == pytest.approx(
        [r["grad_norm"] for r in ddp if "loss" in r], rel=1e-4)
    # the FSDP checkpoint holds the whole model and optimizer, in the layout DDP and one process save
    ddp_state, fsdp_state = (load_checkpoint(tmp_path / name / "ckpt_000003.pt") for name in ("ddp", "fsdp"))
    assert fsdp_state["model"].keys() == ddp_state["model"].keys()
    for key, value in ddp_state["model"].items():
        torch.testing.assert_close(fsdp_state["model"][key], value, rtol=1e-4, atol=1e-5)
    assert fsdp_state["optimizer"]["param_groups"] == ddp_state["optimizer"]["param_groups"]
    for index, value in ddp_state["optimizer"]["state"].items():
        torch.testing.assert_close(fsdp_state["optimizer"]["state"][index]["exp_avg"], value["exp_avg"],
                                   rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_fsdp_run_resumes_from_its_checkpoint_like_one_process(tiny_shards, tmp_path):
    """Each run stops at step 3 and is resumed to step 5: the FSDP ranks load the whole-model checkpoint back into
    their shards (model and AdamW state), so the resumed steps match the single process's resumed steps."""
    for name, launcher in (("fsdp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]),
                           ("single", [])):
        extra = ["--train.parallel=fsdp"] if launcher else []
        run_script(*launcher, *tiny_run_args(tiny_shards, tmp_path / name, *extra), timeout=280)
        resumed = run_script(*launcher, *tiny_run_args(tiny_shards, tmp_path / name, *extra, "--train.max_steps=5"),
                             timeout=280)
        assert f"resuming from {tmp_path / name / 'ckpt_000003.pt'}: step 3" in resumed.stdout
    single, fsdp = (read_metrics(tmp_path / name) for name in ("single", "fsdp"))
    assert [r["step"] for r in fsdp if "loss" in r] == [0, 1, 2, 3, 4]
    assert [r["loss"] for r in fsdp if "loss" in r] == pytest.approx([r["loss"] for r in single if "loss" in r],
                                                                     rel=1e-5)
    single_state, fsdp_state = (load_checkpoint(tmp_path / name / "ckpt_000005.pt") for name in ("single", "fsdp"))
    for key, value in single_state["model"].items():
        torch.testing.assert_close(fsdp_state["model"][key], value, rtol=1e-4, atol=1e-5)
    for index, value in single_state["optimizer"]["state"].items():
        assert fsdp_state["optimizer"]["state"][index]["step"] == value["step"] == 5
        torch.testing.assert_close(fsdp_state["optimizer"]["state"][index]["exp_avg_sq"], value["exp_avg_sq"],
                                   rtol=1e-3, atol=1e-12)


@pytest.mark.slow
def test_bench_reports_each_variant_against_the_anchor(tiny_shards, tmp_path):
    """bench.py's report (not its speed): one row per variant with the settings it ran, ratios to the anchor, and
    peak memory measured per variant. At a shape where the 50k-wide logits dominate, the chunked head's step holds
    far less than the anchor's plain head and cross-entropy."""
    report = tmp_path / "bench.json"
    run_script("bench.py", "--config", "configs/demo.toml", f"--data.dir={tiny_shards}", "--data.demo=false",
               "--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
               "--train.loss_chunk=32", "--data.seq_len=32", "--data.micro_batch_size=4", "--train.dtype=float32",
               "--train.compile=false", "--bench.variants=anchor,default,other_head", "--bench.rounds=2",
               "--bench.steps=1", "--bench.warmup=0", f"--bench.json={report}", timeout=120)
    results = json.loads(report.read_text())
    rows = {row["variant"]: row for row in results["rows"]}
    assert list(rows) == ["anchor", "default", "plain_head"]
    assert rows["anchor"]["settings"] == "plain head, foreach AdamW, eager, float32"
    assert rows["default"]["settings"] == "chunked head (32), fused AdamW, eager, float32, GELU recomputed"
    assert rows["plain_head"]["settings"] == "plain head, fused AdamW, eager, float32, GELU recomputed"
    assert rows["anchor"]["speedup_vs_anchor"] == 1.0
    assert rows["anchor"]["memory_vs_anchor"] == 1.0
    assert rows["default"]["tokens_per_s"] == pytest.approx(4 * 32 / (rows["default"]["ms_per_step"] / 1000))
    assert 0 < rows["default"]["loader_share"] < 1  # the real loader read the shards
    # MFU from the FLOP count written out (6N + 12 L C T; N: embeddings, the tied head once, one block, ln_f) and
    # the float32 matmul peak the run measured
    C = 32
    n_params = 50304 * C + 32 * C + (12 * C * C + 13 * C) + 2 * C
    assert results["flops_per_token"] == 6 * n_params + 12 * 1 * C * 32
    achieved = results["flops_per_token"] * rows["default"]["tokens_per_s"]
    assert rows["default"]["mfu_measured_peak"] == pytest.approx(
        achieved / (results["measured_peak_tflops"]["float32"] * 1e12))
    # the plain head holds ~4 arrays of 128 x 50304 float32 (26 MB each) at once; the chunked head one of 32 rows
    assert rows["default"]["peak_memory_bytes"] < 0.5 * rows["plain_head"]["peak_memory_bytes"]


@pytest.mark.slow
def test_bench_compares_the_modern_recipe_and_times_the_optimizer(tiny_shards, tmp_path):
    """--bench.compare runs another config's model and optimizer on the same batches, and other_optim swaps AdamW
    for Muon: each row says what it ran, and the optimizer's share of the step is timed within the step."""
    report = tmp_path / "bench.json"
    run_script("bench.py", "--config", "configs/demo.toml", f"--data.dir={tiny_shards}", "--data.demo=false",
               "--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
               "--data.seq_len=32", "--data.micro_batch_size=4", "--train.dtype=float32", "--train.compile=false",
               "--bench.compare=configs/demo-modern.toml", "--bench.variants=default,other_optim,compare",
               "--bench.rounds=2", "--bench.steps=1", "--bench.warmup=0", "--bench.memory=false",
               f"--bench.json={report}", timeout=120)
    rows = {row["variant"]: row for row in json.loads(report.read_text())["rows"]}
    assert list(rows) == ["default", "muon", "demo-modern"]
    assert rows["muon"]["settings"] == "chunked head (1024), Muon + fused AdamW, eager, float32, GELU recomputed"
    assert rows["demo-modern"]["settings"].startswith(
        "rope, rmsnorm, qk-norm, relu2, zero-init projections, chunked head (1024), Muon + fused AdamW")
    for row in rows.values():
        assert 0 < row["optimizer_ms"] < row["ms_per_step"]
        assert row["optimizer_share"] == pytest.approx(row["optimizer_ms"] / row["ms_per_step"])
    # MFU counts the modern model's matmuls: the tied head's 50304 x C once, no position table (tiny: C=32, one
    # block, seq_len 32)
    C = 32
    gpt2_n = 50304 * C + 32 * C + (12 * C * C + 13 * C) + 2 * C
    modern_n = 50304 * C + (12 * C * C + 11 * C) + C  # no wpe; RMSNorm has gains only, no biases
    ratio = rows["demo-modern"]["mfu_measured_peak"] / rows["demo-modern"]["tokens_per_s"]
    gpt2_ratio = rows["default"]["mfu_measured_peak"] / rows["default"]["tokens_per_s"]
    assert ratio / gpt2_ratio == pytest.approx((6 * modern_n + 12 * C * 32) / (6 * gpt2_n + 12 * C * 32))
