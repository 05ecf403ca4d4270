"""CORE: nanochat's rules (shuffle, few-shot draws, prompts, scored tokens, truncation, decisions, centering) against
hand-computed answers and an independent re-derivation of its RNG use; the packed scorer against a full forward per
candidate; DDP, torch.compile and two ranks; bad bundles; the download, cached, locked and offline."""

import dataclasses
import http.server
import io
import json
import random
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import core_task_specs, on_gloo_ranks, sharp_gpt
from torch.nn.parallel import DistributedDataParallel

from model import GPTConfig
from pretrain import core_bundle as bundles
from pretrain import core_eval, runtime, tokenizer
from pretrain.core_bundle import CoreError, CoreTask, CoreUnavailable, read_tasks, write_bundle
from pretrain.core_eval import CoreResult, TaskScore, evaluate_core, is_correct, load_core
from pretrain.core_prompts import build_prompts, fewshot_indices, render
from pretrain.core_scoring import pack, score

FLOAT32 = runtime.resolve("cpu", "float32", False)
TINY = GPTConfig(block_size=64, vocab_size=tokenizer.N_VOCAB, n_layer=2, n_head=2, n_embd=64)


def task(task_type: str, rows: list[dict], num_fewshot: int = 0, delimiter: str = " ") -> CoreTask:
    origins = [f"t.jsonl line {i + 1}" for i in range(len(rows))]
    return CoreTask("t", task_type, num_fewshot, delimiter, 0.25, rows, origins)


def encode(text: str) -> list[int]:
    return [tokenizer.EOT_ID, *tokenizer.get_encoding().encode_ordinary(text)]


# ---- Rows, shuffle and few-shot draws ------------------------------------------------------------------------


def test_rows_are_shuffled_with_seed_1337_before_max_per_task_is_taken(core_bundle):
    specs = {spec["label"]: spec for spec in core_task_specs()}
    for max_per_task in (0, 5):
        for t in read_tasks(core_bundle, max_per_task):
            # nanochat: random.Random(1337).shuffle(data), then data[:max_per_task]
            expected = list(specs[t.label]["rows"])
            random.Random(1337).shuffle(expected)
            if max_per_task:
                expected = expected[:max_per_task]
            assert t.rows == expected
            assert len(t.rows) == (max_per_task or len(specs[t.label]["rows"]))


@pytest.mark.parametrize("n, k", [(2, 1), (5, 4), (30, 3), (200, 10), (1000, 25)])
def test_fewshot_examples_are_a_sample_of_the_other_rows_seeded_by_the_items_index(n, k):
    for index in sorted({0, 1, n // 2, n - 1}):
        # nanochat: random.Random(1234 + idx).sample([i for i in range(len(data)) if i != idx], num_fewshot)
        expected = random.Random(1234 + index).sample([i for i in range(n) if i != index], k)
        assert fewshot_indices(n, index, k) == expected
        assert index not in expected
    assert fewshot_indices(n, 0, 0) == []


# ---- Prompts -------------------------------------------------------------------------------------------------


MC_ROWS = [{"query": "Q0?", "choices": ["a0", "b0"], "gold": 1}, {"query": "Q1?", "choices": ["a1", "b1"], "gold": 0},
           {"query": "Q2?", "choices": ["a2", "b2", "c2"], "gold": 2}]


def test_multiple_choice_prompts_put_each_example_and_its_gold_answer_before_the_item():
    t = task("multiple_choice", MC_ROWS, num_fewshot=2, delimiter="\nAnswer: ")
    shots = fewshot_indices(3, 2, 2)  # item 2 draws rows 0 and 1 in some order
    assert sorted(shots) == [0, 1]
    gold = {0: "b0", 1: "a1"}
    examples = "".join(f"Q{i}?\nAnswer: {gold[i]}\n\n" for i in shots)
    assert render(t, 2) == [f"{examples}Q2?\nAnswer: {c}" for c in ("a2", "b2", "c2")]
    assert render(task("multiple_choice", MC_ROWS), 0) == ["Q0? a0", "Q0? b0"]  # zero-shot, default delimiter


def test_schema_prompts_vary_the_context_and_keep_the_continuation():
    rows = [{"context_options": ["The cat", "The dog"], "continuation": "barked.", "gold": 1},
            {"context_options": ["Ann", "Bob"], "continuation": "smiled.", "gold": 0}]
    assert render(task("schema", rows, num_fewshot=1), 0) == ["Ann smiled.\n\nThe cat barked.",
                                                              "Ann smiled.\n\nThe dog barked."]


def test_language_modeling_prompts_strip_contexts_and_the_prompt_without_the_continuation():
    rows = [{"context": "  Capital of France:\n", "continuation": "Paris"},
            {"context": "Capital of Italy: ", "continuation": "Rome "}]
    # Contexts are stripped, the delimiter follows; the prompt without the continuation is stripped as a whole.
    assert render(task("language_modeling", rows, num_fewshot=1), 0) == [
        "Capital of Italy: Rome \n\nCapital of France:", "Capital of Italy: Rome \n\nCapital of France: Paris"]
    assert render(task("language_modeling", rows, delimiter="\nA: "), 1) == [
        "Capital of Italy:\nA:", "Capital of Italy:\nA: Rome "]
    # stripped at both ends: an empty context leaves the delimiter's leading newline only in the prompt with it
    assert render(task("language_modeling", [{"context": " ", "continuation": "x"}], delimiter="\nA: "), 0) == [
        "A:", "\nA: x"]


# ---- Scored tokens and truncation ----------------------------------------------------------------------------


def scored_texts(prompt) -> list[str]:
    return [tokenizer.decode(seq[start:end]) for seq, (start, end) in zip(prompt.sequences, prompt.spans)]


def test_multiple_choice_scores_only_the_tokens_after_the_candidates_common_prefix():
    rows = [{"query": "Pick:", "choices": ["the red cat", "the red dog", "the blue cat"], "gold": 0}]
    [prompt] = build_prompts(task("multiple_choice", rows), [0], block_size=1024)
    assert prompt.sequences[0] == tuple(encode("Pick: the red cat"))  # BOS, then the prompt as ordinary text
    # " the" is every candidate's, so it is context: the mean loss is over the tokens after it
    assert scored_texts(prompt) == [" red cat", " red dog", " blue cat"]
    assert prompt.gold == 0


def test_schema_scores_the_candidates_common_suffix_and_language_modeling_the_continuation():
    rows = [{"context_options": ["The trophy", "The small suitcase"], "continuation": "was too big.", "gold": 0}]
    [prompt] = build_prompts(task("schema", rows), [0], block_size=1024)
    assert scored_texts(prompt) == [" was too big."] * 2
    rows = [{"context": "The capital of France is", "continuation": "Paris"}]
    [prompt] = build_prompts(task("language_modeling", rows), [0], block_size=1024)
    assert prompt.sequences == (tuple(encode("The capital of France is Paris")),)  # one sequence: with it
    assert scored_texts(prompt) == [" Paris"]


def test_a_continuation_that_merges_into_the_context_is_an_error_naming_the_row():
    rows = [{"context": "The cat", "continuation": "s"}]  # " cats" is one token, "The cat" is two
    with pytest.raises(CoreError, match="task 't', t.jsonl line 1: the prompt without its continuation"):
        list(build_prompts(task("language_modeling", rows, delimiter=""), [0], block_size=1024))


def test_long_sequences_keep_their_last_block_size_tokens():
    rows = [{"query": " ".join(["word"] * 40), "choices": ["red cat", "blue dog and more"], "gold": 1}]
    [full] = build_prompts(task("multiple_choice", rows), [0], block_size=1024)
    [cut] = build_prompts(task("multiple_choice", rows), [0], block_size=16)
    for (seq, (s, e)), cut_seq, (cs, ce) in zip(zip(full.sequences, full.spans), cut.sequences, cut.spans):
        assert cut_seq == seq[-16:]  # each candidate cut on its own: different lengths, different cuts
        assert cut_seq[cs:ce] == seq[s:e]  # the same tokens scored
    assert len(full.sequences[0]) != len(full.sequences[1])
    with pytest.raises(CoreError, match="do not fit the model's context of 3 tokens"):
        list(build_prompts(task("multiple_choice", rows), [0], block_size=3))


# ---- The packed scorer ---------------------------------------------------------------------------------------


def all_prompts(bundle: Path, block_size: int):
    tasks = read_tasks(bundle)
    return tasks, [(t, list(build_prompts(t, range(len(t.rows)), block_size))) for t in tasks]


def reference_scores(model, prompt) -> tuple[list[float], list[bool]]:
    """Each candidate alone: a full forward of its sequence, F.cross_entropy and argmax over its scored span."""
    means, greedy = [], []
    for seq, (start, end) in zip(prompt.sequences, prompt.spans):
        idx = torch.tensor([seq])
        with torch.no_grad():
            logits = model.lm_head(model.hidden_states(idx))[0, :, :tokenizer.N_VOCAB]
        targets = idx[0, start:end]
        losses = F.cross_entropy(logits[start - 1:end - 1], targets, reduction="none")
        means.append(losses.mean().item())
        greedy.append(bool((logits[start - 1:end - 1].argmax(dim=1) == targets).all()))
    return means, greedy


def test_packed_scorer_gives_each_candidates_full_forward_losses_and_predictions(core_bundle):
    model = sharp_gpt(TINY)
    _, by_task = all_prompts(core_bundle, TINY.block_size)
    prompts = [p for _, ps in by_task for p in ps]
    rows, firsts = [], []
    for p in prompts:
        firsts.append(sum(len(q.sequences) for q in prompts[:len(firsts)]))
        rows += pack(p, firsts[-1], TINY.block_size)
    n = sum(len(p.sequences) for p in prompts)
    # The data exercises every packing case: truncated candidates, rows holding several candidates, and items
    # whose candidates do not fit one row.
    assert any(len(seq) == TINY.block_size for p in prompts for seq in p.sequences)
    assert any(len(row.own) > 1 for row in rows)
    assert len(rows) > len(prompts)
    reference = [reference_scores(model, p) for p in prompts]
    for batch_size in (1, 16):
        means, greedy = score(model, rows, n, FLOAT32, batch_size)
        for p, first, (ref_means, ref_greedy) in zip(prompts, firsts, reference):
            ours = means[first:first + len(p.sequences)]
            assert ours == pytest.approx(ref_means, abs=1e-5)
            assert greedy[first:first + len(p.sequences)] == ref_greedy
    assert any(g for _, gs in reference for g in gs) and not all(g for _, gs in reference for g in gs)


def test_padded_vocabulary_rows_are_never_predicted(core_bundle):
    padded = sharp_gpt(dataclasses.replace(TINY, vocab_size=50304))
    with torch.no_grad():
        padded.transformer.wte.weight[tokenizer.N_VOCAB:] = 5.0  # would win every argmax if it were looked at
    _, by_task = all_prompts(core_bundle, TINY.block_size)
    prompt = by_task[-1][1][0]
    rows = pack(prompt, 0, TINY.block_size)
    means, greedy = score(padded, rows, len(prompt.sequences), FLOAT32)
    exact = sharp_gpt(TINY)
    exact.load_state_dict({k: v[:tokenizer.N_VOCAB] if "wte" in k or "lm_head" in k else v
                           for k, v in padded.state_dict().items()})
    assert (means, greedy) == pytest.approx(reference_scores(exact, prompt), abs=1e-5)


# ---- Decisions, centering, the result ------------------------------------------------------------------------


def test_the_lowest_mean_loss_wins_ties_go_to_the_first_and_nan_follows_pythons_min():
    assert is_correct("multiple_choice", [2.0, 1.0, 3.0], [False] * 3, gold=1)
    assert is_correct("schema", [1.0, 1.0], [False] * 2, gold=0)  # a tie: the first
    assert not is_correct("schema", [1.0, 1.0], [False] * 2, gold=1)
    nan = float("nan")
    # a candidate with no scored tokens has a nan mean: min() keeps a leading nan, and skips a later one
    assert is_correct("multiple_choice", [nan, 0.5], [False] * 2, gold=0)
    assert is_correct("multiple_choice", [0.5, nan, 0.1], [False] * 3, gold=2)
    assert is_correct("language_modeling", [9.0], [True], gold=0)  # greedy decoding, not the loss, decides
    assert not is_correct("language_modeling", [0.0], [False], gold=0)


def test_accuracy_is_centered_on_the_random_baseline_and_core_is_their_mean(core_bundle, monkeypatch):
    data = load_core(core_bundle)
    share = data.share(0, 1, TINY.block_size)
    rows = [row for t in data.tasks for row in t.rows]  # one rank's items come in this order
    # Decided by hand: candidate 0 of every item has the lowest loss, and greedy decoding is right for the
    # language-modeling items whose continuation starts with the context's last word.
    firsts = {item.first for item in share.items}
    right = {item.first for item, row in zip(share.items, rows)
             if item.task == 3 and row["continuation"].split()[0] == row["context"].split()[-1]}

    def chosen_scores(model, rows, n_candidates, rt, batch_size, progress):
        return [0.0 if c in firsts else 1.0 for c in range(n_candidates)], [c in right for c in range(n_candidates)]

    monkeypatch.setattr(core_eval, "score", chosen_scores)
    result = evaluate_core(sharp_gpt(TINY), data, FLOAT32)
    accuracy = [sum(row["gold"] == 0 for row in t.rows) / len(t.rows) for t in data.tasks[:3]] + [len(right) / 12]
    assert 0 < len(right) < 12
    assert [t.accuracy for t in result.tasks] == pytest.approx(accuracy)
    baselines = [0.25, 0.333, 0.5, 0.0]  # eval_meta_data.csv's percentages / 100
    centered = [(a - b) / (1 - b) for a, b in zip(accuracy, baselines)]
    assert [t.centered for t in result.tasks] == pytest.approx(centered)
    assert result.core == pytest.approx(sum(centered) / 4)


def test_evaluate_core_matches_the_reference_decisions_and_restores_training_mode(core_bundle):
    model = sharp_gpt(TINY).train()
    data = load_core(core_bundle, max_per_task=8)
    result = evaluate_core(model, data, FLOAT32, batch_size=2)
    assert model.training
    for t, scored in zip(data.tasks, result.tasks):
        correct = 0
        for prompt in build_prompts(t, range(len(t.rows)), TINY.block_size):
            means, greedy = reference_scores(model.eval(), prompt)
            correct += greedy[0] if t.task_type == "language_modeling" else means.index(min(means)) == prompt.gold
        assert (scored.label, scored.count, scored.correct) == (t.label, 8, correct)


def test_choices_with_no_tokens_of_their_own_follow_nanochats_nan_rule_end_to_end(tmp_path):
    rows = [{"query": "Pick:", "choices": ["red", "red"], "gold": 0},  # both nan: the first wins
            {"query": "Pick:", "choices": ["red", "red"], "gold": 1},
            {"query": "Pick:", "choices": ["red", "red cat"], "gold": 1}]  # " red" is all common: nan first wins
    bundle = write_bundle(tmp_path, [{"label": "dup", "icl_task_type": "multiple_choice", "num_fewshot": 0,
                                      "rows": rows, "baseline": 50}])
    [scored] = evaluate_core(sharp_gpt(TINY), load_core(bundle), FLOAT32).tasks
    assert (scored.count, scored.correct) == (3, 1)


def _evaluate_a_ddp_model(rank: int, bundle: Path) -> tuple:
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    model = DistributedDataParallel(sharp_gpt(TINY).train())
    result = evaluate_core(model, load_core(bundle), FLOAT32, batch_size=2)
    still_training = model.module.training
    # DDP's reducer holds the process group: freed after destroy_process_group, it would end the group itself,
    # joining gloo's worker thread while holding the GIL that thread may be waiting for (a deadlock, seen here)
    del model
    return result, still_training


@pytest.mark.slow
def test_two_gloo_ranks_with_a_ddp_model_give_one_process_result(core_bundle):
    one_process = evaluate_core(sharp_gpt(TINY), load_core(core_bundle), FLOAT32)
    assert on_gloo_ranks(_evaluate_a_ddp_model, core_bundle) == [(one_process, True), (one_process, True)]


def test_result_metrics_and_table():
    result = CoreResult((TaskScore("arc", "multiple_choice", 10, 0.25, 8, 4),
                         TaskScore("lambada", "language_modeling", 0, 0.0, 5, 1)))
    assert result.metrics() == pytest.approx({"core": ((0.5 - 0.25) / 0.75 + 0.2) / 2, "core_arc": 1 / 3,
                                              "core_arc_acc": 0.5, "core_lambada": 0.2, "core_lambada_acc": 0.2})
    lines = result.table().splitlines()
    assert lines[1].split() == ["arc", "multiple_choice", "10", "8", "0.5000", "0.3333"]
    assert lines[-1].split() == ["CORE", "0.2667"]


@pytest.mark.slow
def test_compiled_model_gives_the_eager_result(core_bundle):
    model = sharp_gpt(dataclasses.replace(TINY, n_layer=1, n_embd=32))
    data = load_core(core_bundle, max_per_task=4)
    eager = evaluate_core(model, data, FLOAT32, batch_size=4)
    assert evaluate_core(torch.compile(model), data, FLOAT32, batch_size=4) == eager


# ---- Bad bundles ---------------------------------------------------------------------------------------------


def broken_bundle(tmp_path: Path, change) -> Path:
    specs = core_task_specs()
    change(specs)
    return write_bundle(tmp_path / "bundle", specs)


@pytest.mark.parametrize("change, message", [
    (lambda s: s[0].update(icl_task_type="question_answering"),
     r"core.yaml: task 'mc_zero': icl_task_type 'question_answering' is not one of multiple_choice, schema"),
    (lambda s: s[1]["rows"][3].pop("choices"), r"mc_fewshot.jsonl line 4: missing field\(s\) choices"),
    (lambda s: s[1]["rows"][0].update(gold=3), r"mc_fewshot.jsonl line 1: gold 3 is not an index into its 3 choices"),
    (lambda s: s[2]["rows"][1].update(continuation=None), r"schema.jsonl line 2: continuation must be text"),
    (lambda s: s[3]["rows"].__setitem__(2, [1, 2]), r"lm.jsonl line 3: expected a JSON object, got list"),
    (lambda s: s[2].update(num_fewshot=10), r"core.yaml: task 'schema' asks for 10 few-shot examples but has 10"),
])
def test_a_bad_task_or_row_is_an_error_naming_the_file_and_row(tmp_path, change, message):
    with pytest.raises(CoreError, match=message):
        read_tasks(broken_bundle(tmp_path, change))


def test_missing_files_baselines_and_bad_lines_are_errors_naming_them(tmp_path, core_bundle):
    bundle = broken_bundle(tmp_path, lambda s: None)
    (bundle / "eval_data" / "lm.jsonl").write_text('{"context": "a", "continuation": "b"}\n{oops\n')
    with pytest.raises(CoreError, match=r"lm.jsonl line 2: not valid JSON"):
        read_tasks(bundle)
    (bundle / "eval_data" / "lm.jsonl").unlink()
    with pytest.raises(CoreError, match=r"task data file .*lm.jsonl does not exist"):
        read_tasks(bundle)
    csv_path = bundle / "eval_meta_data.csv"
    csv_path.write_text("Eval Task,Random baseline\nmc_zero,25\nmc_fewshot,n/a\n")
    with pytest.raises(CoreError, match=r"eval_meta_data.csv line 3: Random baseline 'n/a' of task 'mc_fewshot'"):
        read_tasks(bundle)
    csv_path.write_text("Eval Task,Random baseline\nmc_zero,25\n")
    with pytest.raises(CoreError, match=r"eval_meta_data.csv: no row for task 'mc_fewshot'"):
        read_tasks(bundle)
    (bundle / "core.yaml").unlink()
    with pytest.raises(CoreError, match=r"has no core.yaml"):
        read_tasks(bundle)
    with pytest.raises(CoreError, match=r"has no core.yaml: pass the unzipped eval_bundle folder"):
        bundles.find_bundle(bundle)
    (bundle / "core.yaml").write_text("icl_tasks:\n  - label: x\n    dataset_uri: x.jsonl\n"
                                      "    icl_task_type: schema\n    num_fewshot: 0\n")
    with pytest.raises(CoreError, match=r"core.yaml: task 'x': num_fewshot must be a list"):
        read_tasks(bundle)


# ---- The download --------------------------------------------------------------------------------------------


class BundleServer:
    """A local HTTP server that serves one file at /eval_bundle.zip and counts the requests for it."""

    def __init__(self, body: bytes, status: int = 200):
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def zipped(bundle: Path) -> bytes:
    """The bundle zipped as nanochat's is: everything under one top folder, eval_bundle/."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for path in sorted(bundle.rglob("*")):
            z.write(path, Path("eval_bundle") / path.relative_to(bundle))
    return buffer.getvalue()


def test_the_bundle_downloads_once_into_the_cache_even_when_runs_race(core_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_CACHE", str(tmp_path / "cache"))
    with BundleServer(zipped(core_bundle)) as server:
        found = []
        def find():
            found.append(bundles.find_bundle(None, server.url))

        threads = [threading.Thread(target=find) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert found == [tmp_path / "cache" / "eval_bundle"] * 3
        assert server.requests == 1
        assert [t.rows for t in read_tasks(found[0])] == [t.rows for t in read_tasks(core_bundle)]
        assert load_core(None, 5, server.url).bundle == found[0]
        assert server.requests == 1
    # nothing half-made is left beside it
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["eval_bundle", "eval_bundle.lock"]


def test_without_network_the_error_says_how_to_pass_the_bundle(tmp_path, free_port):
    url = f"http://127.0.0.1:{free_port}/eval_bundle.zip"  # nothing listens there
    with pytest.raises(CoreUnavailable, match=r"could not download the CORE eval bundle .* --bundle DIR"):
        bundles.download_bundle(url, tmp_path)
    assert not (tmp_path / "eval_bundle").exists()
    with BundleServer(b"not found", status=404) as server:
        with pytest.raises(CoreUnavailable, match=r"\(HTTP 404; no network\?\)"):
            bundles.download_bundle(server.url, tmp_path)
    with BundleServer(b"<html>a login page</html>") as server:
        with pytest.raises(CoreError, match=r"is not a zip file"):
            bundles.download_bundle(server.url, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_bundle.lock"]


def test_bundle_rows_may_hold_numbers_which_render_as_text(tmp_path):
    rows = [{"context": "2 + 2 =", "continuation": 4}, {"context": "1.5 * 2 =", "continuation": 3.0}]
    bundle = write_bundle(tmp_path, [{"label": "arith", "icl_task_type": "language_modeling", "num_fewshot": 1,
                                      "rows": rows, "baseline": 0}])
    [t] = read_tasks(bundle)
    assert sorted(r["continuation"] for r in t.rows) == ["3.0", "4"]
    assert json.loads((bundle / "eval_data" / "arith.jsonl").read_text().splitlines()[0])["continuation"] == 4
