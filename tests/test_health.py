"""Training health (pretrain/health.py): the update-to-data ratio against one AdamW step done by hand, hooks that
leave no trace, nothing at all when off, warnings, activation and attention statistics against explicit
computations, the same records under DDP, and the figure."""

import copy
import json
import math
import sys

import pytest
import torch
from helpers import run_script, torchrun, train_args

from model import GPT, GPTConfig
from pretrain import health, runtime
from pretrain.config import Config, ConfigError, OptimConfig, load_config
from pretrain.errors import MissingPackage
from pretrain.fileio import read_jsonl
from pretrain.health import HealthMonitor, UpdateProbe
from pretrain.health_plots import draw_health
from pretrain.loader import ShardLoader
from pretrain.optim import build_optimizer
from pretrain.plots import save_figure
from pretrain.trainer import train_step

CPU = runtime.Runtime(torch.device("cpu"), torch.float32, compile=False)
SMALL = GPTConfig(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for the in-process tests, as run_script gives subprocesses: the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(SMALL)


def loader(tiny_shards, batch_size: int = 4) -> ShardLoader:
    return ShardLoader(tiny_shards, "train", batch_size=batch_size, seq_len=SMALL.block_size, seed=0)


def all_hooks(model: torch.nn.Module) -> list:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [hook for module in model.modules() for kind in kinds for hook in getattr(module, kind).values()]


def recorded_step(model, optimizer, data, monitor, step=0, lr=1e-2, grad_clip=1.0) -> float:
    with monitor.recording(step, data) as probe:
        loss, _ = train_step(model, optimizer, data, 1, lr, grad_clip, CPU, probe)
    return loss


def test_update_to_data_ratio_is_one_adamw_step_done_by_hand(tiny_shards, tmp_path):
    lr, weight_decay, eps, grad_clip = 1e-2, 0.1, 1e-8, 0.5
    model = small_model()
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(model, OptimConfig(weight_decay=weight_decay, lr=lr, eps=eps), "cpu")
    data = loader(tiny_shards)
    monitor = HealthMonitor(model, tmp_path / "health.jsonl", interval=1, grad_clip=grad_clip)
    x, y = loader(tiny_shards).next_batch()
    recorded_step(model, optimizer, data, monitor, lr=lr, grad_clip=grad_clip)
    record = read_jsonl(tmp_path / "health.jsonl")[0]

    _, loss = reference(x, y)
    loss.backward()
    params = dict(reference.named_parameters())
    grad_norms = {name: p.grad.norm().item() for name, p in params.items()}
    total = math.sqrt(sum(n ** 2 for n in grad_norms.values()))
    scale = min(1.0, grad_clip / (total + 1e-6))  # clip_grad_norm_'s factor
    updates, data_norms = {}, {}
    for name, p in params.items():
        g = p.grad * scale
        # AdamW's first step: both moments' bias corrections cancel, leaving g / (|g| + eps); decay is decoupled
        decay = weight_decay if p.dim() >= 2 else 0.0
        updates[name] = (-lr * g / (g.abs() + eps) - lr * decay * p.detach()).norm().item()
        data_norms[name] = p.detach().norm().item()

    assert record["clipped"] is True
    assert record["grad_norm"] == pytest.approx(total, rel=1e-5)  # before clipping, not after
    c_fc = record["layers"]["h.1"]["params"]["mlp.c_fc.weight"]
    assert c_fc["grad_norm"] == pytest.approx(grad_norms["transformer.h.1.mlp.c_fc.weight"], rel=1e-5)
    for name in params:
        layer = health.layer_of(name)
        short = name.removeprefix("transformer.").removeprefix(layer + ".")
        ratio = record["layers"][layer]["params"][short]["update_ratio"]
        if data_norms[name] == 0:
            assert ratio is None, name  # a bias at initialisation: no ratio to speak of
        else:
            assert ratio == pytest.approx(updates[name] / data_norms[name], rel=1e-4), name
    # a block's ratio is over its weight matrices together
    block_matrices = [n for n in params if n.startswith("transformer.h.0.") and params[n].dim() == 2]
    block_update = math.sqrt(sum(updates[n] ** 2 for n in block_matrices))
    block_norm = math.sqrt(sum(data_norms[n] ** 2 for n in block_matrices))
    assert record["layers"]["h.0"]["update_ratio"] == pytest.approx(block_update / block_norm, rel=1e-4)


def test_clipping_is_reported_inactive_when_the_norm_is_below_the_limit(tiny_shards, tmp_path):
    model = small_model()
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1, lr=1e-3, eps=1e-8), "cpu")
    monitor = HealthMonitor(model, tmp_path / "health.jsonl", interval=1, grad_clip=1e3)
    recorded_step(model, optimizer, loader(tiny_shards), monitor, grad_clip=1e3)
    assert read_jsonl(tmp_path / "health.jsonl")[0]["clipped"] is False


def test_recording_leaves_no_trace(tiny_shards, tmp_path):
    """Same losses, same parameters, same loader position with health on every step and off; no hooks left."""
    runs = {}
    for interval in (0, 1):
        model = small_model()
        optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1, lr=1e-2, eps=1e-8), "cpu")
        data = loader(tiny_shards)
        monitor = HealthMonitor(model, tmp_path / f"health{interval}.jsonl", interval=interval, grad_clip=1.0)
        hooks_before = all_hooks(model)
        losses = [recorded_step(model, optimizer, data, monitor, step=step) for step in range(3)]
        assert all_hooks(model) == hooks_before == []
        runs[interval] = losses, model.state_dict(), data.position
    (losses_off, state_off, position_off), (losses_on, state_on, position_on) = runs[0], runs[1]
    assert losses_on == losses_off
    assert position_on == position_off
    for name in state_off:
        assert torch.equal(state_on[name], state_off[name]), name
    assert [r["step"] for r in read_jsonl(tmp_path / "health1.jsonl")] == [0, 1, 2]
    assert not (tmp_path / "health0.jsonl").exists()


class Untouchable:
    """A model or loader that fails the test if health touches it (any attribute access)."""

    def __getattr__(self, name):
        raise AssertionError(f"health touched {name} on a step it does not record")


def test_off_steps_touch_neither_model_nor_loader(tmp_path):
    """Structurally no hooks, no copies and no device syncs when off: the model and loader are never reached."""
    off = HealthMonitor(Untouchable(), tmp_path / "off.jsonl", interval=0, grad_clip=1.0)
    other_rank = HealthMonitor(Untouchable(), tmp_path / "rank1.jsonl", interval=2, grad_clip=1.0, enabled=False)
    between = HealthMonitor(Untouchable(), tmp_path / "between.jsonl", interval=5, grad_clip=1.0)
    for step in range(12):
        for monitor in (off, other_rank):
            with monitor.recording(step, Untouchable()) as probe:
                assert probe is None
    for step in (1, 4, 6, 9):
        with between.recording(step, Untouchable()) as probe:
            assert probe is None
    assert list(tmp_path.iterdir()) == []


def layers_with(ratio: float) -> dict:
    return {"h.0": {"update_ratio": 1e-3}, "h.1": {"update_ratio": ratio}}



def test_warning_names_a_layer_once_it_stays_out_of_range(tmp_path):
    monitor = HealthMonitor(small_model(), tmp_path / "h.jsonl", interval=1, grad_clip=1.0)
    high = [monitor.check(step, layers_with(0.2), []) for step in range(health.WARN_AFTER + 2)]
    assert high[:health.WARN_AFTER - 1] == [[]] * (health.WARN_AFTER - 1)
    assert len(high[health.WARN_AFTER - 1]) == 1
    assert high[health.WARN_AFTER - 1][0].startswith("h.1: update-to-data ratio above 1e-01")
    assert high[health.WARN_AFTER:] == [[], []]  # once per streak, not every recording
    assert monitor.check(10, layers_with(1e-3), []) == []  # back in range ends the streak...
    low = [monitor.check(11 + step, layers_with(5e-6), []) for step in range(health.WARN_AFTER)]
    assert low[-1][0].startswith("h.1: update-to-data ratio below 1e-05")  # ...and a new one starts
    assert low[:-1] == [[]] * (health.WARN_AFTER - 1)
    interrupted = [monitor.check(20 + step, layers_with(ratio), []) for step, ratio in
                   enumerate([0.2, 0.2, 5e-3, 0.2, 0.2])]
    assert interrupted == [[]] * 5
    for inside in (0.09, 2e-5):  # just inside either bound, for longer than a streak
        assert [monitor.check(30 + step, layers_with(inside), []) for step in range(5)] == [[]] * 5


def test_non_finite_gradient_warns_at_once_naming_the_layer(tiny_shards, tmp_path):
    model = small_model()
    warnings = []
    monitor = HealthMonitor(model, tmp_path / "health.jsonl", interval=1, grad_clip=1.0, log=warnings.append)
    x, y = loader(tiny_shards).next_batch()
    with monitor.recording(0, loader(tiny_shards)) as probe:
        _, loss = model(x, y)
        loss.backward()
        model.transformer.h[1].mlp.c_fc.weight.grad[0, 0] = float("inf")
        probe.before_update()
    assert warnings == ["warning: non-finite gradient norm at step 0 in h.1"]
    record = read_jsonl(tmp_path / "health.jsonl")[0]
    assert record["layers"]["h.1"]["grad_norm"] is None
    assert record["layers"]["h.0"]["grad_norm"] > 0


def test_a_diverged_model_is_recorded_with_nulls(tmp_path):
    monitor = HealthMonitor(small_model(), tmp_path / "health.jsonl", interval=1, grad_clip=1.0)
    monitor.write({"step": 3, "activations": {"block_std": [1.5, math.nan]}, "attention_entropy": [[math.inf]]})
    record = read_jsonl(tmp_path / "health.jsonl")[0]
    assert record["activations"]["block_std"] == [1.5, None]
    assert record["attention_entropy"] == [[None]]


def test_activation_statistics_match_an_explicit_forward(tiny_shards):
    model = small_model()
    idx, _ = loader(tiny_shards).next_batch()
    measured = health.measure_activations(model, idx, CPU.autocast())
    acts = measured["activations"]
    with torch.no_grad():
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.size(1)))
        assert acts["residual_norm"][0] == pytest.approx(x.norm(dim=-1).mean().item(), rel=1e-5)
        for depth, block in enumerate(model.transformer.h):
            x_mid = x + block.attn(block.ln_1(x))
            gelu = torch.nn.functional.gelu(block.mlp.c_fc(block.ln_2(x_mid)), approximate="tanh")
            x = x_mid + block.mlp.c_proj(gelu)
            assert acts["residual_norm"][depth + 1] == pytest.approx(x.norm(dim=-1).mean().item(), rel=1e-5)
            assert acts["block_std"][depth] == pytest.approx(x.std().item(), rel=1e-5)
            assert acts["block_mean"][depth] == pytest.approx(x.mean().item(), rel=1e-4, abs=1e-7)
            assert acts["gelu_std"][depth] == pytest.approx(gelu.std().item(), rel=1e-5)
            near_zero = (gelu.abs() < health.GELU_NEAR_ZERO).float().mean().item()
            assert acts["gelu_near_zero"][depth] == pytest.approx(near_zero, abs=1e-6)
    assert len(measured["attention_entropy"]) == SMALL.n_layer
    assert len(measured["attention_entropy"][0]) == SMALL.n_head
    assert model.training  # the pass ran in eval mode and restored the mode
    assert all_hooks(model) == []


def test_attention_probabilities_reproduce_sdpa_and_entropy_bounds(tiny_shards):
    model = small_model()
    attn = model.transformer.h[0].attn
    seq = torch.randn(SMALL.block_size, SMALL.n_embd)
    probs = health.attention_probs(attn, seq)
    # the reference: SDPA's own output, the input of c_proj
    captured = []
    handle = attn.c_proj.register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0]))
    with torch.no_grad():
        attn(seq[None])
    handle.remove()
    T, C, H = SMALL.block_size, SMALL.n_embd, SMALL.n_head
    v = attn.c_attn(seq)[:, 2 * C:].view(T, H, C // H).transpose(0, 1)
    mine = (probs @ v).transpose(0, 1).reshape(T, C)
    torch.testing.assert_close(mine, captured[0][0].detach(), rtol=1e-5, atol=1e-6)

    # heads whose queries are all zero attend uniformly: the entropy is the uniform ceiling, log(i+1) at row i
    with torch.no_grad():
        attn.c_attn.weight[:C] = 0
        attn.c_attn.bias[:C] = 0
    entropy = health.attention_entropy(attn, seq[None].repeat(2, 1, 1))
    uniform = sum(math.log(i + 1) for i in range(T)) / T
    torch.testing.assert_close(entropy, torch.full((H,), uniform), rtol=1e-5, atol=1e-6)
    assert health.uniform_entropy(T) == pytest.approx(uniform)


def health_run(tiny_shards, out, *extra, launcher=()) -> tuple[str, list[dict]]:
    result = run_script(*launcher, *train_args(tiny_shards, out, "--train.eval_interval=0", *extra))
    return result.stdout, read_jsonl(out / "health.jsonl")


def test_an_absurd_learning_rate_is_warned_about_by_layer(tiny_shards, tmp_path):
    model = small_model()
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1, lr=0.3, eps=1e-8), "cpu")
    data = loader(tiny_shards)
    logged = []
    monitor = HealthMonitor(model, tmp_path / "health.jsonl", interval=1, grad_clip=1.0, log=logged.append)
    for step in range(3):
        recorded_step(model, optimizer, data, monitor, step=step, lr=0.3)
    assert "warning: h.0: update-to-data ratio above 1e-01 for 3 recordings in a row" in "\n".join(logged)
    assert any(line.startswith("warning: h.1: update-to-data ratio above 1e-01") for line in logged)
    records = read_jsonl(tmp_path / "health.jsonl")
    assert [len(r["warnings"]) for r in records[:2]] == [0, 0]
    assert any(w.startswith("h.0: update-to-data ratio above") for w in records[2]["warnings"])


# configs/demo.toml's optimizer settings (train_args' tiny model and batch override them), health every 2 steps
DEMO_SETTINGS = ["--optim.lr=2e-3", "--optim.min_lr=2e-4", "--optim.warmup_steps=15", "--train.max_steps=8",
                 "--train.health_interval=2"]


@pytest.fixture(scope="module")
def demo_settings_run(tiny_shards, tmp_path_factory):
    """The demo's optimizer settings on the tiny model: one process with 2 accumulation steps."""
    out = tmp_path_factory.mktemp("demo_health")
    stdout, records = health_run(tiny_shards, out, *DEMO_SETTINGS)
    return out, stdout, records


@pytest.mark.slow
def test_demo_settings_record_every_interval_without_warnings(demo_settings_run):
    out, stdout, records = demo_settings_run
    assert "warning" not in stdout
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    assert all(r["warnings"] == [] for r in records)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any("layers" in m or "activations" in m for m in metrics)  # health stays out of metrics.jsonl
    first = records[0]
    assert set(first["layers"]) == {"wte", "wpe", "h.0", "h.1", "ln_f"}
    assert len(first["activations"]["residual_norm"]) == 3  # embeddings and two blocks


@pytest.mark.slow
def test_plot_py_draws_a_runs_health(demo_settings_run, tmp_path):
    out, _, _ = demo_settings_run
    png = tmp_path / "health.png"
    result = run_script("plot.py", out, "--health", "--out", png, timeout=120)
    assert result.stdout == f"wrote {png}\n"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_health = run_script("plot.py", tmp_path, "--health", check=False, timeout=120)
    assert no_health.returncode == 2
    assert "train.health_interval" in no_health.stderr
    # a run killed while writing a record: the cut-short last line is left out, the rest is drawn
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "health.jsonl").write_text((out / "health.jsonl").read_text() + '{"step": 99, "lay')
    assert run_script("plot.py", killed, "--health", timeout=120).stdout == f"wrote {killed / 'health.png'}\n"
    (killed / "health.jsonl").write_text("")
    empty = run_script("plot.py", killed, "--health", check=False, timeout=120)
    assert (empty.returncode, empty.stderr) == (2, "error: no health records to plot: was train.health_interval set?\n")


@pytest.mark.slow
def test_two_ranks_record_what_one_process_records(tiny_shards, demo_settings_run, tmp_path):
    """Under DDP rank 0 writes the records, from gradients averaged over ranks: the same numbers as one process
    with twice the accumulation (and the same first micro-batch for the activations)."""
    _, _, single = demo_settings_run
    stdout, ddp = health_run(tiny_shards, tmp_path, *DEMO_SETTINGS,
                             launcher=torchrun("--standalone", "--nproc_per_node=2"))
    assert "2 ranks x 1 accumulation steps" in stdout
    assert [r["step"] for r in ddp] == [r["step"] for r in single]
    for a, b in zip(ddp, single):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        for layer in b["layers"]:
            assert a["layers"][layer]["update_ratio"] == pytest.approx(b["layers"][layer]["update_ratio"], rel=1e-3)
            assert a["layers"][layer]["grad_norm"] == pytest.approx(b["layers"][layer]["grad_norm"], rel=1e-4)
        assert a["activations"]["residual_norm"] == pytest.approx(b["activations"]["residual_norm"], rel=1e-4)
        for heads_a, heads_b in zip(a["attention_entropy"], b["attention_entropy"]):
            assert heads_a == pytest.approx(heads_b, rel=1e-4)


@pytest.mark.slow
def test_figure_plots_the_records(demo_settings_run, tmp_path):
    _, _, records = demo_settings_run
    fig = draw_health(records)
    ratio_panel = fig.axes[0]
    h0 = next(line for line in ratio_panel.lines if line.get_label() == "h.0")
    assert list(h0.get_xdata()) == [r["step"] for r in records]
    expected = [math.log10(r["layers"]["h.0"]["update_ratio"]) for r in records]
    assert list(h0.get_ydata()) == pytest.approx(expected)
    healthy = next(line for line in ratio_panel.lines if line.get_label() == "1e-3")
    assert list(healthy.get_ydata()) == [-3, -3]
    path = save_figure(draw_health(records), tmp_path / "health.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000


@pytest.mark.slow
def test_figure_without_matplotlib_says_how_to_get_it(demo_settings_run, monkeypatch, tmp_path):
    _, _, records = demo_settings_run
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what an absent package looks like to import
    with pytest.raises(MissingPackage, match="plotting needs the matplotlib package: pip install matplotlib"):
        save_figure(draw_health(records), tmp_path / "health.png")
    assert not (tmp_path / "health.png").exists()


def test_health_is_off_by_default_and_a_negative_interval_is_refused():
    assert Config().train.health_interval == 0
    with pytest.raises(ConfigError, match=r"train.health_interval = -1 is out of range: expected a value in \[0, inf"):
        load_config(["--train.health_interval=-1"])


def test_update_probe_needs_before_update(tiny_shards):
    with pytest.raises(RuntimeError, match="before_update"):
        UpdateProbe(small_model()).finish(grad_clip=1.0)
