"""The optimizer and the schedule as training applies them: the learning rate each parameter group actually stepped
with, read inside the optimizer's step, against the schedule worked out by hand; the FLOP count and MFU a run logs
against the same worked out by hand."""

import math

import pytest
import torch
from helpers import read_metrics, tiny_run

import train_gpt2
from model import GPT, GPTConfig
from pretrain.config import OptimConfig
from pretrain.metrics import flops_per_token
from pretrain.optim import lr_at

PEAK, LOW, WARMUP, STEPS = 1e-3, 1e-4, 3, 10


def scheduled(step: int) -> float:
    """GPT-3's schedule written out: linear warmup from PEAK/WARMUP, then cosine from PEAK to LOW at STEPS."""
    if step < WARMUP:
        return PEAK * (step + 1) / WARMUP
    return LOW + (PEAK - LOW) * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP))) / 2


def test_every_group_steps_at_the_scheduled_learning_rate(tiny_shards, tmp_path, monkeypatch):
    applied = []  # per optimizer step: (lr, weight decay) of each parameter group, as the step read them
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        applied.append([(group["lr"], group["weight_decay"]) for group in self.param_groups])
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    train_gpt2.main(tiny_run(tiny_shards, tmp_path, f"--train.max_steps={STEPS}", f"--optim.warmup_steps={WARMUP}",
                             f"--optim.lr={PEAK}", f"--optim.min_lr={LOW}", "--optim.weight_decay=0.1",
                             "--train.eval_interval=0"))
    assert len(applied) == STEPS
    for step in (0, 1, WARMUP - 1, WARMUP, 6, STEPS - 1):  # warmup, its end at the peak, mid-decay, the last step
        decayed, undecayed = applied[step]
        assert decayed == (pytest.approx(scheduled(step), rel=1e-12), 0.1), step
        assert undecayed == (pytest.approx(scheduled(step), rel=1e-12), 0.0), step
    assert applied[WARMUP - 1][0][0] == pytest.approx(PEAK)
    logged = [r["lr"] for r in read_metrics(tmp_path) if "loss" in r]
    assert logged == [group[0][0] for group in applied]  # the log says what was applied


def wsd(step: int, decay_frac: float) -> float:
    """The wsd schedule written out: the same warmup, PEAK until the last decay_frac of STEPS, then a straight line
    that would reach LOW one step after the last."""
    decay_steps = round(decay_frac * STEPS)
    if step < WARMUP:
        return PEAK * (step + 1) / WARMUP
    if step < STEPS - decay_steps:
        return PEAK
    return LOW + (PEAK - LOW) * (STEPS - step) / decay_steps


def test_muons_and_adamws_groups_step_at_the_wsd_rate_each_from_its_own_peak(tiny_shards, tmp_path, monkeypatch):
    """optim.name=muon: Muon's group (the blocks' matrices) at muon_lr, AdamW's at lr, both along the same wsd curve,
    as each optimizer's step reads them."""
    applied = {"Muon": [], "AdamW": []}

    def spy_on(cls):
        real_step = cls.step

        def spy(self, *args, **kwargs):
            applied[cls.__name__].append([(group["lr"], group["weight_decay"]) for group in self.param_groups])
            return real_step(self, *args, **kwargs)
        monkeypatch.setattr(cls, "step", spy)
    spy_on(torch.optim.Muon)
    spy_on(torch.optim.AdamW)
    muon_peak = 0.02
    train_gpt2.main(tiny_run(tiny_shards, tmp_path, f"--train.max_steps={STEPS}", f"--optim.warmup_steps={WARMUP}",
                             f"--optim.lr={PEAK}", f"--optim.min_lr={LOW}", "--optim.weight_decay=0.1",
                             "--optim.name=muon", f"--optim.muon_lr={muon_peak}", "--optim.schedule=wsd",
                             "--optim.decay_frac=0.4", "--train.eval_interval=0"))
    assert len(applied["Muon"]) == len(applied["AdamW"]) == STEPS
    for step in range(STEPS):
        (muon,), (decayed, undecayed) = applied["Muon"][step], applied["AdamW"][step]
        assert muon == (pytest.approx(wsd(step, 0.4) * muon_peak / PEAK, rel=1e-12), 0.1), step
        assert decayed == (pytest.approx(wsd(step, 0.4), rel=1e-12), 0.1), step
        assert undecayed == (pytest.approx(wsd(step, 0.4), rel=1e-12), 0.0), step
    # the last 4 steps decay: from the peak at step 6, down a quarter of the way to LOW per step
    assert [wsd(s, 0.4) for s in (5, 6, 7, 9)] == [PEAK, PEAK, pytest.approx(LOW + 0.75 * (PEAK - LOW)),
                                                   pytest.approx(LOW + 0.25 * (PEAK - LOW))]
    logged = [r["lr"] for r in read_metrics(tmp_path) if "loss" in r]
    assert logged == [groups[0][0] for groups in applied["AdamW"]]


def test_the_schedule_ends_at_min_lr_and_never_goes_below():
    optim = OptimConfig(lr=PEAK, min_lr=LOW, warmup_steps=WARMUP)
    assert lr_at(STEPS, optim, STEPS) == LOW
    assert lr_at(10 * STEPS, optim, STEPS) == LOW
    assert min(lr_at(s, optim, STEPS) for s in range(STEPS)) > LOW


def unique_parameters(model: torch.nn.Module) -> int:
    """Parameters counted from the state dict, a tensor shared by two names (the tied head) once."""
    seen = {}
    for tensor in model.state_dict().values():
        seen[tensor.untyped_storage().data_ptr()] = tensor.numel()
    return sum(seen.values())


def test_a_runs_mfu_is_its_flops_per_second_against_the_peak(tiny_shards, tmp_path):
    train_gpt2.main(tiny_run(tiny_shards, tmp_path, "--train.max_steps=3", "--train.eval_interval=0",
                             "--train.peak_tflops=1000"))
    C, L, T = 64, 2, 32  # helpers.TINY_MODEL at seq_len 32
    n = unique_parameters(GPT(GPTConfig(block_size=32, n_layer=L, n_head=2, n_embd=C)))
    assert n == 50304 * C + 32 * C + L * (12 * C * C + 13 * C) + 2 * C  # the same count, written out
    flops = 6 * n + 12 * L * C * T  # PaLM's appendix B: matmuls of forward and backward, plus attention's
    assert flops_per_token(GPT(GPTConfig(block_size=32, n_layer=L, n_head=2, n_embd=C)), T) == flops
    for record in (r for r in read_metrics(tmp_path) if "loss" in r):
        assert record["tokens_per_s"] == pytest.approx(256 / (record["ms"] / 1000), rel=1e-9)
        assert record["mfu"] == pytest.approx(flops * record["tokens_per_s"] / 1000e12, rel=1e-9)


def test_an_untied_heads_flops_count_the_head_once_and_no_lookup_table():
    """An untied token embedding is looked up, not multiplied: the untied model does the tied one's matmuls (its
    head included once), and a rotary model has no position table to count."""
    C, L, T = 64, 2, 32
    shape = dict(block_size=32, n_layer=L, n_head=2, n_embd=C)
    tied, untied = GPT(GPTConfig(**shape)), GPT(GPTConfig(**shape, tie_head=False))
    assert untied.num_params() == tied.num_params() + 50304 * C
    assert flops_per_token(untied, T) == flops_per_token(tied, T)
    rotary = GPT(GPTConfig(**shape, position="rope"))
    assert flops_per_token(rotary, T) == flops_per_token(tied, T) - 6 * 32 * C  # the 32 x C wpe table is gone
