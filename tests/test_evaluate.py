"""evaluate.py end to end: CORE, HellaSwag and bits per byte as the library computes them, two torchrun ranks as one
process, and what a user sees without network or with a bad bundle."""

import json
from pathlib import Path

import pytest
from helpers import read_metrics, run_script, save_model_checkpoint, sharp_gpt, torchrun, train_args

from evaluate import main as evaluate_main
from model import GPTConfig
from pretrain import runtime, tokenizer
from pretrain.bpb import measure
from pretrain.checkpoint import load_model
from pretrain.core_bundle import write_bundle
from pretrain.core_eval import evaluate_core, load_core
from pretrain.hellaswag import load as load_hellaswag
from pretrain.hellaswag_scoring import evaluate as evaluate_hellaswag

FLOAT32 = runtime.resolve("cpu", "float32", False)
TINY = GPTConfig(block_size=64, vocab_size=tokenizer.N_VOCAB, n_layer=2, n_head=2, n_embd=64)
HELLASWAG_ROWS = [
    {"activity_label": "Cooking", "ctx_a": "A man cracks eggs into a bowl.", "ctx_b": "he",
     "ctx": "A man cracks eggs into a bowl. he", "endings": ["whisks them with a fork.", "eats the bowl.",
                                                             "sings.", "throws the eggs at the wall."], "label": 0},
    {"activity_label": "Running", "ctx_a": "A woman ties her shoes at the track.", "ctx_b": "she",
     "ctx": "A woman ties her shoes at the track. she", "endings": ["flies away.", "starts to jog around the track.",
                                                                    "reads.", "paints the shoes blue."], "label": 1},
]
COMMON = ["--device", "cpu", "--dtype", "float32", "--compile", "false"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    save_model_checkpoint(run, sharp_gpt(TINY), step=3)
    return run


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hellaswag") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in HELLASWAG_ROWS))
    return path


def all_tasks(checkpoint: Path, bundle: Path, hellaswag: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--tasks", "core,hellaswag,bpb", "--bundle", str(bundle),
            "--hellaswag-data", str(hellaswag), "--data-dir", str(data_dir), "--bpb-tokens", "700",
            "--batch-size", "3", *COMMON, *extra]


def test_program_reports_what_the_library_computes(tiny_checkpoint, core_bundle, hellaswag_file, tiny_shards,
                                                   tmp_path, capsys):
    out = tmp_path / "result.json"
    evaluate_main(all_tasks(tiny_checkpoint, core_bundle, hellaswag_file, tiny_shards, "--max-per-task", "8",
                            "--output", str(out)))
    written = json.loads(out.read_text())
    model, _ = load_model(tiny_checkpoint)
    core = evaluate_core(model, load_core(core_bundle, 8), FLOAT32)
    assert written["core"]["core"] == pytest.approx(core.core, abs=1e-12)
    for task in core.tasks:
        assert written["core"]["tasks"][task.label] == {
            "type": task.task_type, "num_fewshot": task.num_fewshot, "count": 8, "accuracy": task.accuracy,
            "centered": task.centered, "baseline": task.baseline}
    hellaswag = evaluate_hellaswag(model, load_hellaswag(hellaswag_file, 8), FLOAT32)
    assert written["hellaswag"] == {"acc": hellaswag.acc, "acc_norm": hellaswag.acc_norm, "count": 2,
                                    "style": "completion"}
    bpb = measure(model, tiny_shards, 700, FLOAT32)
    assert written["bpb"]["bpb"] == pytest.approx(bpb.bpb, rel=1e-9)
    assert written["bpb"]["tokens"] == 700
    settings = written["settings"]
    assert (settings["step"], settings["max_per_task"], settings["world_size"]) == (3, 8, 1)
    assert settings["tasks"] == ["core", "hellaswag", "bpb"]
    printed = capsys.readouterr().out
    assert f"CORE {core.core:.4f}" in " ".join(printed.split())
    assert f"mc_fewshot multiple_choice 3 8 {core.tasks[1].accuracy:.4f}" in " ".join(printed.split())
    assert f"bpb {bpb.bpb:.4f}" in printed


@pytest.mark.slow
def test_two_torchrun_ranks_give_one_process_numbers(tiny_checkpoint, core_bundle, hellaswag_file, tiny_shards,
                                                     tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    args = all_tasks(tiny_checkpoint, core_bundle, hellaswag_file, tiny_shards)
    run_script("evaluate.py", *args, "--output", one, timeout=180)
    run_script(*torchrun("--nproc_per_node=2", "evaluate.py", *args, "--output", str(two)), timeout=240)
    one, two = json.loads(one.read_text()), json.loads(two.read_text())
    assert two["settings"]["world_size"] == 2
    assert two["core"] == one["core"]  # counts summed over ranks: exactly one process's
    assert two["hellaswag"] == one["hellaswag"]
    assert two["bpb"]["bpb"] == pytest.approx(one["bpb"]["bpb"], rel=1e-9)  # sums in another order
    assert two["bpb"]["bytes"] == one["bpb"]["bytes"]


@pytest.mark.slow
def test_without_network_or_bundle_it_says_how_to_pass_one(tiny_checkpoint, tmp_path, free_port):
    result = run_script("evaluate.py", "--checkpoint", tiny_checkpoint, *COMMON, "--bundle-url",
                        f"http://127.0.0.1:{free_port}/eval_bundle.zip", env={"PRETRAIN_CACHE": str(tmp_path)},
                        check=False, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert "could not download the CORE eval bundle" in result.stderr
    assert "--bundle DIR" in result.stderr


@pytest.mark.slow
def test_a_bad_bundle_is_one_error_line_naming_the_file_and_row(tiny_checkpoint, tmp_path):
    rows = [{"query": "q", "choices": ["a", "b"], "gold": 0}, {"query": "q", "choices": ["a"], "gold": 2}]
    bundle = write_bundle(tmp_path / "bundle", [{"label": "bad", "icl_task_type": "multiple_choice",
                                                 "num_fewshot": 0, "rows": rows, "baseline": 50}])
    result = run_script("evaluate.py", "--checkpoint", tiny_checkpoint, "--bundle", bundle, *COMMON, check=False,
                        timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {bundle}/eval_data/bad.jsonl line 2: gold 2 is not an "
                                                  "index into its 1 choices"]


@pytest.mark.parametrize("args, message", [
    (["--tasks", "bpb"], "--tasks bpb needs --data-dir"),
    (["--tasks", "core,mmlu"], "--tasks mmlu: expected any of core, hellaswag, bpb"),
])
def test_bad_arguments_are_refused(tiny_checkpoint, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--checkpoint", str(tiny_checkpoint), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ---- in training ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_training_logs_core_and_bits_per_byte_of_the_model_it_saves(tiny_shards, core_bundle, tmp_path):
    out = tmp_path / "run"
    result = run_script(*train_args(tiny_shards, out, "--train.max_steps=4", "--train.eval_interval=2",
                                    "--train.val_steps=3", "--train.val_bpb=true", "--train.core_interval=2",
                                    f"--train.core_bundle={core_bundle}", "--train.core_max_per_task=5",
                                    "--train.checkpoint_interval=2", "--train.keep_checkpoints=0"), timeout=300)
    records = read_metrics(out)
    core = [r for r in records if "core" in r]
    assert [r["step"] for r in core] == [0, 2, 4]  # every 2 steps and after the last
    assert [r["step"] for r in records if "val_bpb" in r] == [0, 2, 4]  # beside each val_loss
    assert "| core " in result.stdout and "bits per byte" in result.stdout
    # The last evaluations saw the weights after the 4th and last step: those of ckpt_000004.pt.
    model, _ = load_model(out / "ckpt_000004.pt")
    expected = evaluate_core(model, load_core(core_bundle, max_per_task=5), FLOAT32)
    assert core[-1]["core"] == pytest.approx(expected.core, abs=1e-9)
    assert {k: v for k, v in core[-1].items() if k != "step"} == pytest.approx(expected.metrics(), abs=1e-9)
    val = [r for r in records if "val_bpb" in r][-1]
    assert val["val_bpb"] == pytest.approx(measure(model, tiny_shards, 3 * 4 * 32, FLOAT32, batch_size=4,
                                                   seq_len=32).bpb, rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_core"] == max(r["core"] for r in core)


@pytest.mark.slow
def test_training_without_a_core_bundle_offline_says_so_once_and_trains(tiny_shards, tmp_path):
    out = tmp_path / "run"
    result = run_script(*train_args(tiny_shards, out, "--train.max_steps=2", "--train.eval_interval=0",
                                    "--train.core_interval=1"),
                        env={"PRETRAIN_CACHE": str(tmp_path / "cache")})
    assert result.stdout.count("core: off for this run") == 1
    assert "train.core_bundle=DIR" in result.stdout
    records = read_metrics(out)
    assert [r["step"] for r in records if "loss" in r] == [0, 1]
    assert not any("core" in r for r in records)
