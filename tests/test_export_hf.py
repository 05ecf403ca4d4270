"""export_hf.py: a training checkpoint becomes a Hugging Face GPT-2 folder that transformers loads with our logits
and our tokenization, and that our own loaders read back. Offline: transformers only reads the local folder."""

import pytest
import torch
import transformers
from helpers import run_script

from model import GPT, GPTConfig
from pretrain import tokenizer
from pretrain.checkpoint import load_model, save_checkpoint
from pretrain.config import Config, to_dict

pytestmark = pytest.mark.slow  # every test here starts processes

TEXT = "Hello world, this is GPT-2.\n\tdef f(x):  return x ** 2  # naïve café — 東京 🙂 <|endoftext|> 1234567"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model with the padded vocabulary and weights large enough that every nonlinearity matters."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = Config(model=GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=64))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * (0.3 if param.dim() > 1 else 0.5))
    save_checkpoint(tmp / "run" / "ckpt_000005.pt", {"model": model.state_dict(), "step": 5, "config": to_dict(cfg)})
    result = run_script("export_hf.py", "--checkpoint", tmp / "run", "--out", tmp / "hf")
    assert "exported step 5" in result.stdout
    return model.eval(), tmp / "hf"


def test_transformers_loads_the_export_with_our_logits(exported):
    model, folder = exported
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    assert hf_model.config.vocab_size == tokenizer.N_VOCAB  # the padded rows are dropped
    idx = torch.randint(0, tokenizer.N_VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx, idx)  # with targets: logits at every position
        theirs = hf_model(idx).logits
    assert ours.abs().max() > 10  # the weights are large enough that an error would show
    torch.testing.assert_close(theirs, ours[..., :tokenizer.N_VOCAB], rtol=0, atol=2e-5)  # measured 6e-6


def test_our_loaders_read_the_export_back(exported):
    model, folder = exported
    loaded, meta = load_model(folder)
    assert meta == {}
    assert loaded.config.vocab_size == tokenizer.N_VOCAB
    idx = torch.randint(0, tokenizer.N_VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, _ = model(idx, idx)
        got, _ = loaded(idx, idx)
    torch.testing.assert_close(got, expected[..., :tokenizer.N_VOCAB], rtol=0, atol=1e-6)


def test_exported_tokenizer_encodes_like_ours(exported):
    _, folder = exported
    hf_tokenizer = transformers.GPT2TokenizerFast.from_pretrained(folder)
    assert hf_tokenizer.is_fast
    assert hf_tokenizer.encode("Hello world, this is GPT-2.") == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]
    assert hf_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    assert hf_tokenizer.eos_token_id == tokenizer.EOT_ID
    assert hf_tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    assert transformers.AutoTokenizer.from_pretrained(folder).encode(TEXT) == tokenizer.encode(TEXT)


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path):
    result = run_script("export_hf.py", "--checkpoint", tmp_path / "nothing", "--out", tmp_path / "hf", check=False)
    assert result.returncode == 2
    assert "nothing is neither a checkpoint file nor a run folder" in result.stderr
    assert "Traceback" not in result.stderr
