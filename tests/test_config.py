"""Configuration: TOML + overrides into typed dataclasses, helpful errors, shipped configs, the LR schedule."""

import pytest
from helpers import ROOT, run_script

from pretrain.config import Config, ConfigError, OptimConfig, grad_accum_steps, load_config, valid_keys
from pretrain.optim import lr_at


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_toml_then_overrides(tmp_path):
    path = write(tmp_path, '[model]\nn_layer = 4\n[optim]\nlr = 1\n[data]\ndir = "x"\n')
    cfg = load_config(["--config", path, "--model.n_layer=6", "--optim.min_lr", "0.5", "--data.shuffle=false"])
    assert cfg.model.n_layer == 6  # the command line wins over the file
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # an int is fine where a float is expected
    assert cfg.optim.min_lr == 0.5 and cfg.data.dir == "x" and cfg.data.shuffle is False
    assert cfg.model.n_head == Config().model.n_head  # untouched keys keep their defaults


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'.*optim\.lr"):
        load_config(["--optim.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"c.toml: unknown config key 'model.layers'.*model\.n_layer"):
        load_config(["--config", write(tmp_path, "[model]\nlayers = 3\n")])
    with pytest.raises(ConfigError, match="must be a \\[section\\]"):
        load_config(["--config", write(tmp_path, "lr = 3\n")])


def test_wrong_types_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model.n_layer: expected int, got str '12'"):
        load_config(["--config", write(tmp_path, '[model]\nn_layer = "12"\n')])
    with pytest.raises(ConfigError, match=r"--train.max_steps: expected int, got 'ten'"):
        load_config(["--train.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"--data.shuffle: expected bool"):
        load_config(["--data.shuffle=maybe"])
    with pytest.raises(ConfigError, match=r"train.dtype: expected one of auto, bfloat16, float32, got 'fp8'"):
        load_config(["--train.dtype=fp8"])
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(["--config", write(tmp_path, "[model\n")])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["--config", str(tmp_path / "missing.toml")])


def test_cross_key_validation():
    with pytest.raises(ConfigError, match="data.seq_len \\(2048\\) exceeds model.block_size"):
        load_config(["--data.seq_len=2048"])
    with pytest.raises(ConfigError, match="must be divisible by model.n_head"):
        load_config(["--model.n_head=5"])
    with pytest.raises(ConfigError, match=r"train.max_steps = 0 is out of range: expected a value in \[1, inf\)"):
        load_config(["--train.max_steps=0"])


@pytest.mark.parametrize("key", ["train.health_interval", "train.hellaswag_interval"])
def test_fsdp_refuses_the_evaluations_that_run_outside_its_gathers(key):
    with pytest.raises(ConfigError, match=f"^{key} needs train.parallel=ddp"):
        load_config(["--train.parallel=fsdp", f"--{key}=10"])
    assert getattr(load_config([f"--{key}=10"]).train, key.split(".")[1]) == 10  # fine with ddp


def test_grad_accum_steps():
    cfg = Config()  # 524288 tokens = 64 x 1024 x 8 ranks x 1
    assert grad_accum_steps(cfg, 8) == 1 and grad_accum_steps(cfg, 1) == 8
    with pytest.raises(ConfigError, match=r"divisible by .* = 64 x 1024 x 3 = 196608"):
        grad_accum_steps(cfg, 3)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(["--config", str(path)])
    assert cfg.model.n_embd % cfg.model.n_head == 0
    assert grad_accum_steps(cfg, 1) >= 1


def test_124M_config_is_the_reference_recipe():
    cfg = load_config(["--config", str(ROOT / "configs" / "gpt2-124M.toml")])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.vocab_size) == (12, 12, 768, 50304)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps) == (6e-4, 6e-5, 715)
    assert (cfg.data.total_batch_tokens, cfg.train.max_steps, cfg.data.seq_len) == (2**19, 19073, 1024)
    assert grad_accum_steps(cfg, 8) == 1  # 64 x 1024 on 8 GPUs
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.grad_clip) == (0.9, 0.95, 0.1, 1.0)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("gpt2-*.toml")), ids=lambda p: p.name)
def test_gpt2_configs_are_gpt2(path):
    """The modern recipe is opt-in: no flag of it in a GPT-2 config, and the defaults are GPT-2's."""
    cfg = load_config(["--config", str(path)])
    if path.stem.endswith("-modern"):
        assert not cfg.model.is_gpt2() and cfg.optim.name == "muon"
        return
    assert cfg.model.is_gpt2() and cfg.model.modern_flags() == []
    assert (cfg.optim.name, cfg.optim.schedule) == ("adamw", "cosine")


def test_the_modern_demo_compares_directly_with_the_demo():
    """demo-modern.toml changes the recipe, not what it is measured on: the same shape, data, tokens per step, steps
    and evaluation."""
    demo, modern = (load_config(["--config", str(ROOT / "configs" / name)]) for name in ("demo.toml",
                                                                                          "demo-modern.toml"))
    assert demo.data == modern.data
    shape = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "dropout")
    assert [getattr(demo.model, k) for k in shape] == [getattr(modern.model, k) for k in shape]
    same_train = ("max_steps", "eval_interval", "val_steps", "seed")
    assert [getattr(demo.train, k) for k in same_train] == [getattr(modern.train, k) for k in same_train]
    assert modern.model.modern_flags() and modern.optim.name == "muon"


@pytest.mark.slow
def test_help_lists_every_key_with_its_default():
    out = run_script("train_gpt2.py", "--help").stdout
    assert out.startswith("usage: train_gpt2.py")
    lines = out.splitlines()
    for key in valid_keys():
        line = next(i for i, text in enumerate(lines) if text.strip().startswith(f"--{key}="))
        assert len(lines[line + 1].strip()) > 10, f"--{key} has no help line"  # what the key means
    assert "--optim.lr=0.0006" in out and "--data.total_batch_tokens=524288" in out


def test_lr_schedule():
    optim = OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=10)
    kw = dict(optim=optim, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(6e-5)  # warmup starts at lr / warmup_steps
    assert lr_at(4, **kw) == pytest.approx(3e-4)
    assert lr_at(9, **kw) == pytest.approx(6e-4)  # warmup ends at the peak
    assert lr_at(10, **kw) == pytest.approx(6e-4)  # decay starts at the peak
    assert lr_at(60, **kw) == pytest.approx((6e-4 + 6e-5) / 2)  # halfway through the cosine
    assert lr_at(110, **kw) == pytest.approx(6e-5) and lr_at(500, **kw) == pytest.approx(6e-5)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_a_key_that_moved_says_where_it_went():
    with pytest.raises(ConfigError, match=r"^model.loss_chunk is now train.loss_chunk"):
        load_config(["--model.loss_chunk=512"])
    assert load_config(["--train.loss_chunk=512"]).train.loss_chunk == 512
