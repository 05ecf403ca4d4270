"""HellaSwag: rendering in both published styles (harness style against lm-eval's own preprocessing), the fast scorer
against a full forward per ending, ranks, torch.compile, bad input, no network, and evaluation during training."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import on_gloo_ranks, read_metrics, run_script, save_model_checkpoint, train_args

from hellaswag import main as hellaswag_main
from model import GPT, GPTConfig
from pretrain import distributed, hellaswag, runtime, tokenizer
from pretrain.checkpoint import load_model
from pretrain.hellaswag import HellaSwagError, check_row, harness_preprocess, load, load_rows, render
from pretrain.hellaswag_scoring import HellaSwagResult, ending_losses, evaluate, pack, predictions

# Hand-written rows in HellaSwag's two shapes: ActivityNet (ctx_a + a lower-case ctx_b) and WikiHow ([header],
# [title], [step] marks, empty ctx_b); labels both as strings and as ints, endings of very different lengths.
ROWS = [
    {"activity_label": "Washing dishes", "ctx_a": "A woman stands at a kitchen sink full of plates.",
     "ctx_b": "she", "ctx": "A woman stands at a kitchen sink full of plates. she",
     "endings": ["turns on the tap and rinses a plate.", "jumps onto the counter and sings loudly to the cat.",
                 "eats.", "picks up a sponge, squeezes soap onto it and scrubs the plates one by one."],
     "label": "3"},
    {"activity_label": "Home and Garden", "ctx_a": "[header] How to repot a cactus [title] Wear thick gloves. "
     "[step] Cactus spines can get stuck in your skin.", "ctx_b": "",
     "ctx": "[header] How to repot a cactus [title] Wear thick gloves. [step] Cactus spines can get stuck in your "
     "skin.", "endings": ["[substeps] Leather gardening gloves  work best.", "Paint the pot blue [title] Let it dry.",
                          "[title] Water the cactus every hour.", "Sing to the cactus so it grows."],
     "label": 0},
    {"activity_label": "Playing guitar", "ctx_a": "A man sits on a stool holding an acoustic guitar.",
     "ctx_b": "the man", "ctx": "A man sits on a stool holding an acoustic guitar. the man",
     "endings": ["strums a few chords and begins to sing.", "throws the guitar into a lake.",
                 "tunes the strings while looking at the camera.", "eats the guitar."], "label": 2},
    {"activity_label": "Personal Care and Style", "ctx_a": "[header] How to braid hair [title] Brush the hair. "
     "[step] Remove any tangles before you start.", "ctx_b": "", "ctx": "[header] How to braid hair [title] Brush "
     "the hair. [step] Remove any tangles before you start.",
     "endings": ["[title] Split the hair into three equal sections. [step] Hold one in each hand.",
                 "Cut all the hair off with garden shears.", "[substeps] Use a   wide comb  [step] if it is curly.",
                 "Dye the hair green [title] Wait."], "label": "1"},
    {"activity_label": "Shoveling snow", "ctx_a": "Snow covers the driveway in front of a house.",
     "ctx_b": "a boy", "ctx": "Snow covers the driveway in front of a house. a boy",
     "endings": ["pushes a shovel through the snow and throws it aside.", "swims.",
                 "opens the fridge and takes out a cake.", "waves at the camera and then starts to shovel."],
     "label": 0},
    {"activity_label": "Food and Entertaining", "ctx_a": "[header] How to make lemonade [title] Squeeze the lemons. "
     "[step] Roll each lemon on the table first.", "ctx_b": "", "ctx": "[header] How to make lemonade [title] "
     "Squeeze the lemons. [step] Roll each lemon on the table first.",
     "endings": ["[title] Add sugar and water. [step] Stir until the sugar dissolves.",
                 "Throw the lemons at the wall.", "[title] Bake the lemons. [step] Serve hot.",
                 "Freeze the table."], "label": 0},
    {"activity_label": "Rope skipping", "ctx_a": "A girl holds a rope in both hands in a gym.",
     "ctx_b": "she", "ctx": "A girl holds a rope in both hands in a gym. she",
     "endings": ["starts jumping over the rope as it swings.", "reads a book about ropes.",
                 "ties the rope to a car.", "jumps."], "label": "0"},
    {"activity_label": "Cleaning windows", "ctx_a": "A man sprays a window with a bottle of cleaner.",
     "ctx_b": "he", "ctx": "A man sprays a window with a bottle of cleaner. he",
     "endings": ["wipes the glass with a cloth in circles.", "drinks the cleaner.", "leaves.",
                 "paints the window black and walks away slowly down the street."], "label": 0},
]
FLOAT32 = runtime.resolve("cpu", "float32", False)
TINY = GPTConfig(block_size=64, vocab_size=tokenizer.N_VOCAB, n_layer=2, n_head=2, n_embd=64)


def sharp_model(config: GPTConfig = TINY, seed: int = 0) -> GPT:
    """A random GPT whose final LayerNorm gain is raised 20x: confident, varied per-token losses, so the two styles
    and the summed and mean losses pick different endings."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(20)
    return model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("hellaswag") / "rows.jsonl", ROWS)


@pytest.fixture(scope="module")
def sharp_run(tmp_path_factory) -> Path:
    """A run folder holding the sharp model as this codebase's checkpoint."""
    run = tmp_path_factory.mktemp("run")
    save_model_checkpoint(run, sharp_model(), step=7)
    return run


def full_forward_losses(model: GPT, examples) -> torch.Tensor:
    """The reference: each ending alone, context + ending in one row through model.forward, the loss over the
    ending's tokens only (targets -1 elsewhere); contexts too long for the block keep their end."""
    losses = torch.zeros(len(examples), 4)
    for i, example in enumerate(examples):
        room = model.config.block_size + 1 - max(len(ending) for ending in example.endings)
        context = list(example.context[-room:])
        for j, ending in enumerate(example.endings):
            idx = torch.tensor([context + list(ending)])[:, :-1]
            targets = torch.full_like(idx, -1)
            targets[0, len(context) - 1:] = torch.tensor(ending)
            with torch.no_grad():
                _, mean_loss = model(idx, targets)
            losses[i, j] = mean_loss * len(ending)
    return losses


def lm_eval_hellaswag_utils():
    """lm-evaluation-harness's own lm_eval/tasks/hellaswag/utils.py (lm-eval 0.4.13, requirements-dev.txt), loaded
    by path: importing the lm_eval package itself pulls in its whole task registry."""
    package = Path(importlib.util.find_spec("lm_eval").origin).parent
    spec = importlib.util.spec_from_file_location("lm_eval_hellaswag_utils", package / "tasks/hellaswag/utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- Rendering -----------------------------------------------------------------------------------------------


def test_completion_style_is_ctx_as_is_and_each_ending_after_a_space():
    row = check_row(ROWS[0], "row 0")
    example = render(row, "completion")
    assert example.context == tuple(tokenizer.encode(ROWS[0]["ctx"]))
    for ending, ids in zip(ROWS[0]["endings"], example.endings):
        assert ids == tuple(tokenizer.encode(" " + ending))
    assert example.norm_lengths == tuple(len(ids) for ids in example.endings)  # acc_norm: mean loss per token
    assert example.label == 3


def test_exactly_each_endings_tokens_are_scored_after_the_context():
    example = render(check_row(ROWS[1], "row 1"), "completion")
    packed = pack(example, block_size=1024)
    context = list(example.context)
    assert packed.tokens[:len(context)] == context
    assert packed.targets == [t for ending in example.endings for t in ending]
    for j, ending in enumerate(example.endings):
        scored_at = [p for p, owner in zip(packed.scored_at, packed.ending_of) if owner == j]
        # Each ending token is predicted from the token before it in context + ending, at its position there.
        assert [packed.tokens[p] for p in scored_at] == [context[-1], *ending[:-1]]
        assert [packed.positions[p] for p in scored_at] == list(range(len(context) - 1, len(context) + len(ending) - 1))
        assert all(packed.segments[p] == j + 1 for p in scored_at[1:])
    assert len(packed.tokens) == len(context) + sum(len(ending) - 1 for ending in example.endings)


def test_harness_preprocessing_equals_lm_evals_own():
    lm_eval_utils = lm_eval_hellaswag_utils()
    texts = ["  Then [title] Rinse the cup.  [step] Dry it [substeps] gently.  ", "A [b] c [d]e  f", "[title] x",
             "no marks at all", "two  spaces   three", "ends with [title]", "[header] How to [title] Go [step]"]
    for text in texts:
        assert harness_preprocess(text) == lm_eval_utils.preprocess(text), text


def test_harness_rendering_equals_lm_evals_documents():
    import datasets
    docs = lm_eval_hellaswag_utils().process_docs(datasets.Dataset.from_list(
        [{**row, "label": str(row["label"])} for row in ROWS]))
    for row, doc in zip(ROWS, docs):
        example = render(check_row(row, "row"), "harness")
        assert example.context == tuple(tokenizer.encode(doc["query"]))
        assert example.label == doc["gold"]
        for choice, ids, norm in zip(doc["choices"], example.endings, example.norm_lengths):
            # The continuation is " " + choice, tokenized inside the whole text; acc_norm divides by characters.
            whole = tokenizer.encode(doc["query"] + " " + choice)
            assert ids == tuple(whole[len(example.context):])
            assert norm == len(choice)


def test_harness_context_with_a_trailing_space_moves_it_to_the_endings():
    row = {**ROWS[1], "ctx_a": "[header] How to fold [title]", "ctx_b": ""}  # preprocess leaves "... fold. "
    example = render(check_row(row, "row"), "harness")
    query = harness_preprocess(f"{row['activity_label']}: {row['ctx_a']} ")
    assert query.endswith(". ")
    assert example.context == tuple(tokenizer.encode(query.rstrip()))
    for ending, ids in zip(row["endings"], example.endings):
        assert tokenizer.decode(example.context + ids) == query + " " + harness_preprocess(ending)


# ---- Scoring -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", hellaswag.STYLES)
def test_fast_path_matches_a_full_forward_per_ending(style):
    examples = [render(check_row(row, "row"), style) for row in ROWS]
    model = sharp_model()
    reference = full_forward_losses(model, examples)
    lengths = torch.tensor([[len(ending) for ending in example.endings] for example in examples])
    for batch_size in (3, 16):  # in padded batches of mixed lengths, and all at once
        fast = ending_losses(model, examples, FLOAT32, batch_size)
        assert (fast / lengths - reference / lengths).abs().max().item() <= 1e-5  # per-token loss
        for fast_pred, reference_pred in zip(predictions(fast, examples), predictions(reference, examples)):
            assert fast_pred.tolist() == reference_pred.tolist()
    by_sum, by_norm = predictions(reference, examples)
    assert by_sum.tolist() != by_norm.tolist()  # the model is sharp enough that acc and acc_norm differ


def test_predictions_take_the_lowest_summed_and_the_lowest_normalised_loss():
    examples = [hellaswag.Example((1,), ((2,),) * 4, norm_lengths=(1, 4, 2, 8), label=0)] * 3
    losses = torch.tensor([[3.0, 8.0, 5.0, 9.0],  # sums: 3 lowest; per unit: 3, 2, 2.5, 1.125
                           [4.0, 4.0, 6.0, 16.0],  # a tie by sum goes to the first; per unit: 4, 1, 3, 2
                           [2.0, 1.0, 1.0, 8.0]])  # per unit: 2, 0.25, 0.5, 1
    by_sum, by_norm = predictions(losses, examples)
    assert by_sum.tolist() == [0, 0, 1]
    assert by_norm.tolist() == [3, 1, 1]


def test_padded_vocabulary_rows_never_count():
    """A model with GPT-2's vocabulary padded to 50304 scores as if it had only the tokenizer's 50257 ids."""
    padded = sharp_model(dataclasses.replace(TINY, vocab_size=50304))
    with torch.no_grad():
        padded.transformer.wte.weight[tokenizer.N_VOCAB:] = 1.0  # large logits there, if they were looked at
    exact = GPT(TINY).eval()
    state = {k: v[:tokenizer.N_VOCAB] if k.endswith("wte.weight") else v for k, v in padded.state_dict().items()}
    exact.load_state_dict({k: v for k, v in state.items() if k != "lm_head.weight"}, strict=False)
    examples = [render(check_row(row, "row"), "completion") for row in ROWS[:3]]
    assert (ending_losses(padded, examples, FLOAT32) - full_forward_losses(exact, examples)).abs().max() <= 1e-4


def test_styles_pick_different_endings_on_the_sharp_model():
    model = sharp_model()
    picks = {}
    for style in hellaswag.STYLES:
        examples = [render(check_row(row, "row"), style) for row in ROWS]
        picks[style] = predictions(ending_losses(model, examples, FLOAT32), examples)[1].tolist()
    assert picks["completion"] != picks["harness"]


def test_long_examples_keep_the_end_of_their_context():
    short_block = dataclasses.replace(TINY, block_size=24)  # shorter than several context + ending pairs
    model = sharp_model(short_block)
    examples = [render(check_row(row, "row"), "completion") for row in ROWS]
    assert max(len(e.context) + max(map(len, e.endings)) for e in examples) > 24 + 1
    fast = ending_losses(model, examples, FLOAT32, batch_size=4)
    assert (fast - full_forward_losses(model, examples)).abs().max().item() <= 1e-4


def test_evaluate_counts_correct_examples(rows_file):
    data = load(rows_file, style="completion")
    model = sharp_model()
    by_sum, by_norm = predictions(full_forward_losses(model, data.examples), data.examples)
    labels = torch.tensor([example.label for example in data.examples])
    result = evaluate(model, data, FLOAT32, batch_size=5)
    assert result == HellaSwagResult("completion", len(ROWS), int((by_sum == labels).sum()),
                                     int((by_norm == labels).sum()))
    assert result.acc_norm == result.correct_norm / len(ROWS)
    assert result.metrics() == {"hellaswag_acc_norm": result.acc_norm, "hellaswag_acc": result.acc,
                                "hellaswag_style": "completion", "hellaswag_count": len(ROWS)}


@pytest.mark.slow
def test_compiled_model_gives_the_eager_result():
    config = GPTConfig(block_size=64, vocab_size=tokenizer.N_VOCAB, n_layer=1, n_head=2, n_embd=32)
    model = sharp_model(config)
    examples = [render(check_row(row, "row"), "harness") for row in ROWS]
    eager = ending_losses(model, examples, FLOAT32, batch_size=3)
    compiled = ending_losses(torch.compile(model), examples, FLOAT32, batch_size=3)
    assert (compiled - eager).abs().max().item() <= 1e-4
    assert predictions(compiled, examples)[1].tolist() == predictions(eager, examples)[1].tolist()


# ---- The program ---------------------------------------------------------------------------------------------


def reference_result(checkpoint_dir: Path, rows_file: Path, style: str) -> dict:
    model, _ = load_model(checkpoint_dir)
    examples = load(rows_file, style=style).examples
    by_sum, by_norm = predictions(full_forward_losses(model, examples), examples)
    labels = torch.tensor([example.label for example in examples])
    return {"acc": (by_sum == labels).float().mean().item(), "acc_norm": (by_norm == labels).float().mean().item()}


def test_program_completion_style_writes_the_result(sharp_run, rows_file, tmp_path, capsys):
    out = tmp_path / "result.json"
    hellaswag_main(["--checkpoint", str(sharp_run), "--data", str(rows_file), "--dtype", "float32",
                    "--output", str(out)])
    written = json.loads(out.read_text())
    expected = reference_result(sharp_run, rows_file, "completion")
    assert written["acc"] == pytest.approx(expected["acc"], abs=1e-9)
    assert written["acc_norm"] == pytest.approx(expected["acc_norm"], abs=1e-9)
    assert written["count"] == len(ROWS)
    assert written["style"] == "completion" and written["step"] == 7 and written["world_size"] == 1
    assert f"completion style, {len(ROWS)} examples): acc {expected['acc']:.4f}" in capsys.readouterr().out


@pytest.mark.slow
def test_program_offline_without_data_says_how_to_pass_it(sharp_run, tmp_path):
    # HF_HUB_OFFLINE makes datasets fail at once, through the same path as no network (which retries for ~25 s).
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    result = run_script("hellaswag.py", "--checkpoint", sharp_run, env=env, check=False, timeout=120)
    assert result.returncode == 2
    assert "Rowan/hellaswag" in result.stderr and "--data FILE.jsonl" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# ---- Bad input -----------------------------------------------------------------------------------------------


def without(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


@pytest.mark.parametrize("bad_row, message", [
    (without(ROWS[0], "ctx_b"), r"line 2: missing field\(s\) ctx_b"),
    ({**ROWS[0], "endings": ROWS[0]["endings"][:3]}, "line 2: expected a list of 4 endings, got 3 endings"),
    ({**ROWS[0], "endings": "one string"}, "line 2: expected a list of 4 endings, got str"),
    ({**ROWS[0], "endings": [*ROWS[0]["endings"][:3], " "]}, "line 2: ending 3 must be a non-empty string"),
    ({**ROWS[0], "label": "4"}, "line 2: label '4' is out of range: expected 0-3"),
    ({**ROWS[0], "label": -1}, "line 2: label -1 is out of range"),
    ({**ROWS[0], "label": "b"}, "line 2: label 'b' is out of range"),
    ({**ROWS[0], "label": True}, "line 2: label True is out of range"),
    ({**ROWS[0], "ctx": ""}, "line 2: ctx is empty"),
    ({**ROWS[0], "ctx_a": 3}, "line 2: ctx_a must be a string"),
])
def test_malformed_row_is_an_error_naming_it(tmp_path, bad_row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[1], bad_row, ROWS[2]])
    with pytest.raises(HellaSwagError, match=f"bad.jsonl {message}"):
        load_rows(path)


def test_unreadable_files_are_errors_naming_them(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(HellaSwagError, match="broken.jsonl line 2: not valid JSON"):
        load_rows(broken)
    with pytest.raises(HellaSwagError, match="missing.jsonl does not exist"):
        load_rows(tmp_path / "missing.jsonl")
    with pytest.raises(HellaSwagError, match="style 'fancy'"):
        load(write_jsonl(tmp_path / "ok.jsonl", ROWS[:1]), style="fancy")


def test_limit_takes_the_first_rows(rows_file):
    assert load_rows(rows_file, limit=3) == [check_row(row, "row") for row in ROWS[:3]]


# ---- In training ---------------------------------------------------------------------------------------------


def _evaluate_on_a_rank(rank: int, rows_file: Path) -> tuple:
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    result = evaluate(sharp_model(), load(rows_file, style="harness"), FLOAT32, batch_size=2)
    # Only rank 0 could load the data: neither rank may evaluate, or rank 0 would wait for rank 1 forever.
    return dataclasses.astuple(result), distributed.all_ranks_agree(rank == 0), distributed.all_ranks_agree(True)


@pytest.mark.slow
def test_two_gloo_ranks_count_as_one_process_and_agree_before_evaluating(rows_file):
    one_process = evaluate(sharp_model(), load(rows_file, style="harness"), FLOAT32)
    expected = (dataclasses.astuple(one_process), False, True)
    assert on_gloo_ranks(_evaluate_on_a_rank, rows_file) == [expected, expected]


@pytest.mark.slow
def test_training_evaluates_hellaswag_and_logs_it(tiny_shards, rows_file, tmp_path):
    out = tmp_path / "run"
    run_script(*train_args(tiny_shards, out, "--train.max_steps=4", "--train.eval_interval=0",
                           "--train.hellaswag_interval=2", f"--train.hellaswag_data={rows_file}",
                           "--train.hellaswag_limit=6", "--train.hellaswag_style=harness",
                           "--train.checkpoint_interval=3", "--train.keep_checkpoints=0"), timeout=180)
    logged = [r for r in read_metrics(out) if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in logged] == [0, 2, 4]  # every 2 steps and after the last
    for record in logged:
        assert record["hellaswag_count"] == 6
        assert record["hellaswag_style"] == "harness"
    # The last evaluation (step 4) saw the weights after the 4th and last optimizer step: those of ckpt_000004.pt.
    model, _ = load_model(out / "ckpt_000004.pt")
    expected = evaluate(model, load(rows_file, limit=6, style="harness"), FLOAT32)
    assert logged[-1]["hellaswag_acc_norm"] == pytest.approx(expected.acc_norm, abs=1e-9)
    assert logged[-1]["hellaswag_acc"] == pytest.approx(expected.acc, abs=1e-9)


@pytest.mark.slow
def test_training_without_hellaswag_data_offline_says_so_once_and_trains(tiny_shards, tmp_path):
    out = tmp_path / "run"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    result = run_script(*train_args(tiny_shards, out, "--train.max_steps=2", "--train.eval_interval=0",
                                    "--train.hellaswag_interval=1"), env=env, timeout=180)
    assert result.stdout.count("hellaswag: off for this run") == 1
    assert "train.hellaswag_data=FILE.jsonl" in result.stdout
    records = read_metrics(out)
    assert [r["step"] for r in records if "loss" in r] == [0, 1]
    assert not any("hellaswag_acc" in r for r in records)
