"""Bad input, as a careless user gives it: every case stops with one line that names the culprit, and none is
silently turned into a wrong result."""

import json

import numpy as np
import pytest
import torch
from helpers import on_gloo_ranks, run_script, tiny_run

import fineweb
import train_gpt2
from model import GPT, GPTConfig
from pretrain import distributed, errors, metrics, shard_builder, trainer
from pretrain.checkpoint import CheckpointError, checkpoint_path, load_model, save_checkpoint
from pretrain.config import Config, ConfigError, declarations, load_config, to_dict
from pretrain.errors import UserError
from pretrain.shards import write_shard


def one_step(data_dir, out_dir, *extra: str) -> list[str]:
    return tiny_run(data_dir, out_dir, "--train.max_steps=1", "--train.eval_interval=0", *extra)


@pytest.fixture(autouse=True)
def keep_matmul_precision():
    """train_gpt2.main sets the process-wide float32 matmul precision; later tests in this process compare at
    float32 tolerance."""
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)


# ---- config ---------------------------------------------------------------------------------------------------

def test_every_numeric_key_declares_its_range():
    unbounded = [f"{name}.{key}" for name, section in vars(Config()).items()
                 for key, (typ, declared) in declarations(section).items()
                 if typ in (int, float) and not declared["valid"]]
    assert unbounded == []


@pytest.mark.parametrize("arg, message", [
    ("--optim.grad_clip=-1", r"optim.grad_clip = -1.0 is out of range: expected a value in \[0, inf\)"),
    ("--model.n_layer=-1", r"model.n_layer = -1 .* \[1, inf\)"),
    ("--model.n_head=0", r"model.n_head = 0 .* \[1, inf\)"),
    ("--optim.weight_decay=-0.1", r"optim.weight_decay = -0.1 .* \[0, inf\)"),
    ("--model.dropout=1", r"model.dropout = 1.0 .* \[0, 1\)"),
    ("--optim.beta2=1", r"optim.beta2 = 1.0 .* \[0, 1\)"),
    ("--optim.eps=0", r"optim.eps = 0.0 .* \(0, inf\)"),
    ("--optim.lr=nan", r"optim.lr = nan"),
    ("--data.seed=-1", r"data.seed = -1 .* \[0, inf\)"),
    ("--train.eval_interval=-5", r"train.eval_interval = -5 .* \[0, inf\)"),
    ("--model.vocab_size=50000", r"model.vocab_size = 50000 .* \[50257, inf\)"),
])
def test_out_of_range_value_names_key_value_and_range(arg, message):
    with pytest.raises(ConfigError, match=message):
        load_config([arg])


def test_range_boundaries_are_accepted():
    cfg = load_config(["--optim.grad_clip=0", "--model.dropout=0", "--optim.beta1=0", "--train.eval_interval=0",
                       "--train.seed=0", "--optim.weight_decay=0", "--optim.warmup_steps=0"])
    assert cfg.optim.grad_clip == 0.0


def test_config_folder_out_dir_file_and_empty_prompt(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(["--config", str(tmp_path)])
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"train.out_dir .*notes.txt is a file"):
        load_config([f"--train.out_dir={a_file}/run"])
    with pytest.raises(ConfigError, match="train.sample_prompt is empty"):
        load_config(["--train.sample_prompt="])
    assert load_config(["--train.sample_prompt=", "--train.sample_interval=0"]).train.sample_prompt == ""


# ---- the training script ----------------------------------------------------------------------------------------

def test_unusable_devices_are_user_errors(monkeypatch, tmp_path):
    with pytest.raises(UserError, match="'tpu9' is not a device"):
        train_gpt2.main(one_step(tmp_path, tmp_path, "--train.device=tpu9"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU"):
        train_gpt2.main(one_step(tmp_path, tmp_path, "--train.device=cuda"))


@pytest.mark.parametrize("shards, message", [
    ({"x_train_000000.bin": 20, "x_val_000000.bin": 100}, "has 20 tokens, fewer than one batch needs"),
    ({"x_train_000000.bin": 0, "x_train_000001.bin": 0}, "has 0 tokens, fewer than one batch needs"),
    ({"x_train_000000.npy": None}, r"x_train_000000.npy \(0 bytes\) is not a readable .npy file"),
])
def test_unusable_shards_are_user_errors(tmp_path, shards, message):
    for name, count in shards.items():
        if count is None:
            (tmp_path / name).write_bytes(b"")
        else:
            write_shard(tmp_path / name, np.arange(count))
    with pytest.raises(UserError, match=message):
        train_gpt2.main(one_step(tmp_path, tmp_path / "run"))


def test_data_dir_naming_a_file_is_a_user_error(tmp_path):
    a_file = tmp_path / "shards.bin"
    write_shard(a_file, np.arange(100))
    with pytest.raises(UserError, match=r"data directory .*shards.bin is a file"):
        train_gpt2.main(one_step(a_file, tmp_path / "run"))


@pytest.mark.slow
def test_a_user_error_is_one_line_on_the_command_line(tmp_path):
    (tmp_path / "x_train_000000.npy").write_bytes(b"")
    result = run_script("train_gpt2.py", *one_step(tmp_path, tmp_path / "run"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: shard {tmp_path / 'x_train_000000.npy'} (0 bytes) is not "
                                                  "a readable .npy file: No data left in file"]


def test_demo_corpus_is_never_built_beside_other_files(tmp_path):
    write_shard(tmp_path / "mine_train_000000.bin", np.arange(1000))
    with pytest.raises(UserError, match=r"holds files that are not the demo corpus \(mine_train_"):
        train_gpt2.main(one_step(tmp_path, tmp_path / "run", "--data.demo=true"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine_train_000000.bin"]


def _prepare_data(rank: int, data_dir: str) -> str:
    cfg = load_config(["--data.demo=true", f"--data.dir={data_dir}"])
    info = distributed.DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
    try:
        trainer.prepare_data(cfg, info)  # without its broadcast, rank 1 would wait here until the gloo timeout
        return "no error"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


@pytest.mark.slow
def test_failed_demo_build_stops_every_rank_with_its_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a shard")
    results = on_gloo_ranks(_prepare_data, str(tmp_path))
    assert results[0].startswith("CorpusError: ") and "notes.txt" in results[0]
    assert results[1] == results[0]


# ---- loading a model ----------------------------------------------------------------------------------------------

def test_load_model_names_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="run_oops does not exist"):
        load_model(tmp_path / "run_oops")
    cfg = Config(model=GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    state = {"model": GPT(cfg.model).state_dict(), "step": 1, "config": to_dict(cfg)}
    state["config"]["model"]["rotary"] = True
    save_checkpoint(checkpoint_path(tmp_path, 1), state)
    with pytest.raises(CheckpointError, match=r"ckpt_000001.pt: its model config has keys .* \(rotary\)"):
        load_model(tmp_path)


# ---- building shards ----------------------------------------------------------------------------------------------

def build(capsys, *args: str) -> tuple[int, str, str]:
    """fineweb.py in this process, as its command line runs it: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        errors.run(fineweb.main, [*args, "--workers", "1"])
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def test_fineweb_output_file_and_empty_input(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text("Call me Ishmael. " * 20)
    code, _, err = build(capsys, "--input", str(book), "--output", str(book))
    assert code == 2
    assert f"output {book} is a file" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = build(capsys, "--input", str(empty), "--output", str(tmp_path / "out"))
    assert code == 2
    assert "holds no text (1 documents, all empty)" in err
    assert not (tmp_path / "out").exists()  # a failed first build leaves no directory (nor its lock file)
    with pytest.raises(SystemExit):
        fineweb.main(["--input", str(book), "--output", str(tmp_path / "out"), "--shard-size", "0"])
    assert "--shard-size must be at least 1" in capsys.readouterr().err


def test_fineweb_refuses_to_mix_with_another_build(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text("Call me Ishmael. " * 20)
    write_shard(tmp_path / "out" / "edufineweb_train_000000.bin", np.arange(10))
    code, _, err = build(capsys, "--input", str(book), "--output", str(tmp_path / "out"))
    assert code == 2
    assert "holds shards of another build (edufineweb_train_000000.bin" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", "edufineweb_train_000000.bin"]


def test_small_local_input_gets_both_splits_and_a_rerun_checks_it_is_intact(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text("It was the best of times, it was the worst of times. " * 400)
    out = tmp_path / "out"
    assert build(capsys, "--input", str(book), "--output", str(out))[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    total = manifest["splits"]["val"]["tokens"] + manifest["splits"]["train"]["tokens"]
    assert manifest["val_tokens"] == shard_builder.local_val_tokens([book])
    assert 0.05 * total < manifest["splits"]["val"]["tokens"] < 0.2 * total  # about a tenth
    assert manifest["splits"]["train"]["tokens"] > 0

    code, stdout, _ = build(capsys, "--input", str(book), "--output", str(out))
    assert code == 0
    assert "already complete" in stdout
    train_shard = out / "corpus_train_000000.bin"
    intact = train_shard.read_bytes()
    train_shard.write_bytes(intact[:-2])
    code, _, err = build(capsys, "--input", str(book), "--output", str(out))
    assert code == 2
    assert "corpus_train_000000.bin (listed in manifest.json) is missing or has the wrong size" in err
    train_shard.write_bytes(intact)
    with open(book, "a") as f:
        f.write("A new chapter.")
    code, _, err = build(capsys, "--input", str(book), "--output", str(out))
    assert code == 2
    assert "the input changed since" in err


# ---- MFU ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA H100 Ultra 2", None),  # an H100 variant we have no figure for: no MFU rather than a neighbour's
    ("NVIDIA GH200 480GB", None),
])
def test_mfu_peak_by_exact_gpu_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.peak_tflops(torch.device("cuda", 0), torch.bfloat16) == peak
    assert metrics.peak_tflops(torch.device("cuda", 0), torch.bfloat16, configured=500.0) == 500.0

