"""sample.py and the shared generate code: reproducible with a seed, streaming gives the same text."""

import pytest
import torch
from helpers import run_script, save_model_checkpoint

from model import GPT, GPTConfig
from pretrain import tokenizer
from pretrain.config import Config
from pretrain.sampling import generate_text

PROMPT = "def parse(self"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory):
    """An untrained tiny GPT saved as a run's checkpoint: random weights sample varied text, enough to tell
    seeds apart."""
    cfg = Config()
    cfg.train.sample_prompt = "import os"
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64))
    run_dir = tmp_path_factory.mktemp("run")
    save_model_checkpoint(run_dir, model, step=5, cfg=cfg)
    return run_dir, model


def test_streamed_text_is_what_one_generate_call_samples(untrained_run):
    _, model = untrained_run
    pieces = []
    streamed = generate_text(model, PROMPT, max_new_tokens=20, seed=3, on_text=pieces.append)
    generator = torch.Generator().manual_seed(3)
    ids = model.generate(torch.tensor([tokenizer.encode(PROMPT)]), 20, top_k=50, n_vocab=tokenizer.N_VOCAB,
                         generator=generator)
    assert streamed == [tokenizer.decode(ids[0].tolist())]
    assert pieces[0] == PROMPT
    assert len(pieces) > 10  # it arrived piece by piece, not at the end
    assert "".join(pieces) == streamed[0]
    assert generate_text(model, PROMPT, max_new_tokens=20, seed=3) == streamed
    assert generate_text(model, PROMPT, max_new_tokens=20, seed=4) != streamed


def test_several_samples_show_their_progress_and_are_the_same_samples(untrained_run, capsys):
    _, model = untrained_run
    with_progress = generate_text(model, PROMPT, num_samples=3, max_new_tokens=12, seed=5, progress=True)
    bar = capsys.readouterr().err
    assert "sampling" in bar and "/12 " in bar  # a bar on stderr counts the tokens
    assert with_progress == generate_text(model, PROMPT, num_samples=3, max_new_tokens=12, seed=5)
    assert capsys.readouterr().err == ""  # without progress, nothing on stderr


@pytest.mark.slow
def test_sample_py_with_a_seed_prints_the_same_samples_as_the_generate_code(untrained_run):
    run_dir, model = untrained_run
    args = ["sample.py", "--checkpoint", run_dir, "--prompt", PROMPT, "--num-samples", "2", "--max-new-tokens",
            "16", "--seed", "7", "--temperature", "0.9", "--top-k", "20", "--device", "cpu"]
    result = run_script(*args, timeout=120)
    texts = generate_text(model, PROMPT, num_samples=2, max_new_tokens=16, temperature=0.9, top_k=20, seed=7)
    assert result.stdout == f"--- sample 1 of 2 ---\n{texts[0]}\n--- sample 2 of 2 ---\n{texts[1]}\n"
    assert "ckpt_000005.pt: step 5" in result.stderr  # a run folder means its newest checkpoint


@pytest.mark.slow
def test_one_sample_streams_and_defaults_to_the_runs_prompt(untrained_run):
    run_dir, model = untrained_run
    result = run_script("sample.py", "--checkpoint", run_dir, "--max-new-tokens", "12", "--seed", "11",
                        timeout=120)
    expected = generate_text(model, "import os", max_new_tokens=12, seed=11)[0]
    assert result.stdout == expected + "\n"


@pytest.mark.slow
def test_bad_checkpoint_is_one_line(tmp_path):
    result = run_script("sample.py", "--checkpoint", tmp_path / "missing.pt", check=False, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"error: checkpoint {tmp_path / 'missing.pt'} does not exist\n"
