"""Bad input, as a careless user gives it: every case stops with one line that names the culprit, and none is
silently turned into a wrong result."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, on_gloo_ranks, run_script, started, tiny_run, torchrun, train_args, worker_pid

import export_hf
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



# ---- files the system will not read or write ----------------------------------------------------------------------

def test_a_config_in_another_encoding_is_one_line_and_a_byte_order_mark_is_fine(tmp_path):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[train]\nsample_prompt = "café"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"config file .*latin1.toml is not UTF-8 text \(byte 28: b'\\xe9'\)"):
        load_config(["--config", str(latin1)])
    with_bom = tmp_path / "bom.toml"
    with_bom.write_bytes(b"\xef\xbb\xbf" + '[train]\nsample_prompt = "café"\n'.encode("utf-8"))
    assert load_config(["--config", str(with_bom)]).train.sample_prompt == "café"


def test_an_unreadable_data_folder_or_shard_is_one_line(tiny_shards, tmp_path, monkeypatch):
    real_iterdir = type(tiny_shards).iterdir

    def no_listing(path):
        if path == tiny_shards:
            raise PermissionError(13, "Permission denied", str(path))
        return real_iterdir(path)
    monkeypatch.setattr(type(tiny_shards), "iterdir", no_listing)
    with pytest.raises(UserError, match=f"^data directory {tiny_shards} cannot be read: Permission denied$"):
        train_gpt2.main(one_step(tiny_shards, tmp_path / "run"))
    monkeypatch.undo()

    def unreadable(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(np, "fromfile", unreadable)  # the header read: the shard's first read
    with pytest.raises(UserError, match=r"^shard .*tiny_train_000000.bin cannot be read: Permission denied$"):
        train_gpt2.main(one_step(tiny_shards, tmp_path / "run"))


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_previous_checkpoint_survives(tiny_shards, tmp_path,
                                                                                          monkeypatch):
    out = tmp_path / "run"
    real_save, saves = torch.save, []

    def second_save_fills_the_disk(state, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            Path(path).write_bytes(b"the first megabytes")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nbasic_ios::clear")
        return real_save(state, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", second_save_fills_the_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(UserError) as failed:
        train_gpt2.main(tiny_run(tiny_shards, out, "--train.max_steps=3", "--train.eval_interval=0",
                                 "--train.checkpoint_interval=1"))
    assert str(failed.value).startswith(f"cannot write checkpoint {out / 'ckpt_000002.pt'}: the disk is full (1 MiB "
                                        "free, the checkpoint needs ")
    assert str(failed.value).endswith("the checkpoints saved before it are intact")
    assert sorted(p.name for p in out.glob("*ckpt*")) == ["ckpt_000001.pt"]  # no partial file under any name
    assert load_model(out)[1]["step"] == 1


def test_an_out_dir_or_export_folder_that_cannot_be_written_is_one_line(tiny_shards, tmp_path):
    unwritable = "/proc/self/no_such_dir/run"  # the kernel refuses to create anything there, even for root
    with pytest.raises(UserError, match=f"^train.out_dir {unwritable} cannot be written: No such file or directory$"):
        train_gpt2.main(one_step(tiny_shards, unwritable))
    run = tmp_path / "run"
    train_gpt2.main(one_step(tiny_shards, run))
    with pytest.raises(SystemExit) as exited:
        errors.run(export_hf.main, ["--checkpoint", str(run), "--out", "/proc/self/no_such_dir/export"])
    assert exited.value.code == 2
    a_file = tmp_path / "export.txt"
    a_file.write_text("notes")
    with pytest.raises(UserError, match=f"^--out {a_file} is a file; expected the folder to write the export into$"):
        export_hf.main(["--checkpoint", str(run), "--out", str(a_file)])


def test_a_model_too_large_to_allocate_says_how_much_it_needed(tiny_shards, tmp_path):
    C = 2**20  # a 211 GB token embedding alone: the allocator refuses it at once
    huge = [f"--model.n_embd={C}", "--model.n_head=1", "--model.n_layer=1"]
    # embeddings (50304 + 32 positions) and ln_f, then the block: 12 C^2 weights and 13 C biases and gains
    params = C * (50304 + 32 + 2) + 12 * C**2 + 13 * C
    with pytest.raises(UserError) as refused:
        train_gpt2.main(one_step(tiny_shards, tmp_path / "run", *huge))
    assert str(refused.value).startswith(f"the model does not fit in memory on cpu: its {params / 1e9:.2f}B "
                                         f"parameters need {4 * params / 2**30:.1f} GiB as float32 weights, about "
                                         f"{16 * params / 2**30:.1f} GiB with their gradients and AdamW's two moments")
    assert "can't allocate memory" in str(refused.value)


# ---- the other programs -------------------------------------------------------------------------------------------

def test_fineweb_refuses_a_shard_size_that_would_write_thousands_of_files_and_zero_workers(capsys):
    code, _, err = build(capsys, "--shard-size", "100000")  # FineWeb-Edu sample-10BT: ~10B tokens
    assert code == 2
    assert err.strip() == ("error: --shard-size 100,000 would write about 100,000 shards for this input "
                           "(~10,000,000,000 tokens): use at least 1,000,000 tokens per shard (the default is "
                           "100,000,000)")
    with pytest.raises(SystemExit):
        fineweb.main(["--demo", "--workers", "0"])
    assert "--workers must be at least 1 (default: all" in capsys.readouterr().err


@pytest.mark.slow
def test_sample_py_refuses_a_temperature_that_is_not_a_number(tmp_path):
    result = run_script("sample.py", "--model", "gpt2", "--temperature", "nan", check=False)
    assert result.returncode == 2
    assert "--temperature must be a number, 0 or more (0: the likeliest token), got nan" in result.stderr


def test_a_temperature_too_small_to_divide_by_samples_the_likeliest_token():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    prompt = torch.randint(0, 64, (3, 4))
    greedy = model.generate(prompt, 6, temperature=0)
    tiny = model.generate(prompt, 6, temperature=1e-300, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tiny, greedy)


@pytest.mark.slow
def test_wandb_without_an_api_key_is_one_line(tmp_path, monkeypatch):
    from pretrain.trackers import WandbTracker
    monkeypatch.delenv("WANDB_MODE", raising=False)  # online, as a user's run is
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, so no key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(UserError, match=r"^train.wandb_project: Weights & Biases could not start \(.*\): run "
                                        r"`wandb login` or set WANDB_API_KEY, or set WANDB_MODE=offline"):
        WandbTracker("p", tmp_path / "run", {})


@pytest.mark.slow
def test_a_truncated_safetensors_export_is_one_line_in_hellaswag_py(tmp_path):
    from pretrain import hf_export
    torch.manual_seed(0)
    folder = hf_export.export(GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16)), tmp_path / "hf")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=f"^{folder} is not a readable Hugging Face GPT-2 folder: "):
        load_model(folder)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"ctx": "A man", "ctx_a": "A man", "ctx_b": "", "activity_label": "Walking",
                                "endings": ["walks.", "runs.", "sits.", "sleeps."], "label": "0"}) + "\n")
    result = run_script("hellaswag.py", "--model", folder, "--data", rows, check=False, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder} is not a readable Hugging Face GPT-2 folder"), \
        result.stderr


# ---- under torchrun -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_user_error_under_torchrun_is_one_line_for_the_job(tmp_path):
    (tmp_path / "x_train_000000.npy").write_bytes(b"")
    result = run_script(*torchrun("--standalone", "--nproc_per_node=2",
                                  *train_args(tmp_path, tmp_path / "run", "--train.max_steps=1")),
                        check=False, timeout=180)
    assert result.returncode != 0
    errors_printed = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors_printed == [f"error: shard {tmp_path / 'x_train_000000.npy'} (0 bytes) is not a readable .npy "
                              "file: No data left in file"]
    # torchrun's own report of the failed workers is a traceback of the launcher; none comes from our code
    our_frames = [line for line in result.stderr.splitlines() if line.strip().startswith(f'File "{ROOT}')]
    assert our_frames == []


@pytest.mark.slow
def test_a_two_rank_run_whose_rank_is_killed_ends_within_seconds(tiny_shards, tmp_path):
    out = tmp_path / "run"
    command = torchrun("--standalone", "--nproc_per_node=2", *train_args(tiny_shards, out, "--train.max_steps=5000",
                                                                         "--train.eval_interval=0"))
    with started(*command, log=tmp_path / "log") as proc:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.05)
        os.kill(worker_pid(proc.pid, rank=1), signal.SIGKILL)
        killed = time.monotonic()
        returncode = proc.wait(timeout=120)
        assert time.monotonic() - killed < 30, "the job outlived its killed rank by more than 30 s"
    assert returncode != 0
