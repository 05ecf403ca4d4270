"""The offline GPT-2 tokenizer: known ids, round trips, and that it is built exactly like tiktoken's "gpt2"."""

import shutil

import pytest
import tiktoken_ext.openai_public as openai_public
from tiktoken.load import load_tiktoken_bpe

from pretrain.tokenizer import EOT_ID, RANKS_PATH, decode, encode, get_encoding


@pytest.mark.parametrize("text, ids", [
    ("Hello world", [15496, 995]),
    ("Hello world, this is GPT-2.", [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]),
    ("<|endoftext|>", [50256]),
])
def test_known_ids(text: str, ids: list[int]) -> None:
    assert encode(text) == ids
    assert decode(ids) == text


def test_vocab_size_and_eot() -> None:
    enc = get_encoding()
    assert enc.n_vocab == 50257
    assert EOT_ID == enc.eot_token == 50256


@pytest.mark.parametrize("text", [
    "naïve café, Ελληνικά, 日本語のテキスト, עברית",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧",
    "runs   of    spaces\t\ttabs\nnew\n\n\nlines \r\n  ",
    "digits 0 12 345 6789 3.14159 -42 1e10",
    "first doc<|endoftext|>second doc<|endoftext|>",
    "",
])
def test_round_trip(text: str) -> None:
    ids = encode(text)
    assert decode(ids) == text
    assert (EOT_ID in ids) == ("<|endoftext|>" in text)


def test_built_like_tiktoken_gpt2(monkeypatch: pytest.MonkeyPatch) -> None:
    # tiktoken's own constructor arguments, with its ranks download replaced by a stand-in
    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", lambda **kwargs: "downloaded ranks")
    reference = openai_public.gpt2()
    enc = get_encoding()
    assert enc.name == reference["name"]
    assert enc._pat_str == reference["pat_str"] == openai_public.r50k_pat_str
    assert enc._special_tokens == reference["special_tokens"] == {"<|endoftext|>": 50256}
    assert enc.n_vocab == reference["explicit_n_vocab"]
    assert enc._mergeable_ranks == load_tiktoken_bpe(str(RANKS_PATH))
    assert len(enc._mergeable_ranks) == 50256


def test_damaged_ranks_file_is_rejected(tmp_path) -> None:
    damaged = tmp_path / "gpt2.tiktoken"
    shutil.copyfile(RANKS_PATH, damaged)
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0x01
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256") as info:
        get_encoding(damaged)
    assert str(damaged) in str(info.value)


def test_missing_ranks_file_is_named(tmp_path) -> None:
    missing = tmp_path / "nowhere.tiktoken"
    with pytest.raises(FileNotFoundError) as info:
        get_encoding(missing)
    assert str(missing) in str(info.value)
