"""The GPT-2 BPE tokenizer, loaded from the ranks file shipped in assets/ so it works with no network.

tiktoken.get_encoding("gpt2") downloads its ranks on first use; we build the same Encoding from a local copy
of the same ranks (whisper's gpt2.tiktoken, MIT, OpenAI), checked by sha256 so a damaged file cannot silently
change every token id. The ranks are parsed from the very bytes that were checked: tiktoken's own loader would read
them again through its file cache, which it does not check when no hash is given.
"""

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

RANKS_PATH = Path(__file__).resolve().parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257


@functools.lru_cache(maxsize=None)
def get_encoding(ranks_path: str | Path = RANKS_PATH) -> tiktoken.Encoding:
    """The GPT-2 encoding: 50,257 tokens, <|endoftext|> = 50256. Cached: building it takes ~0.3 s."""
    ranks_path = Path(ranks_path)
    if not ranks_path.is_file():
        raise FileNotFoundError(f"GPT-2 BPE ranks file {ranks_path} is missing; it ships with the repository")
    data = ranks_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise ValueError(f"GPT-2 BPE ranks file {ranks_path} has sha256 {digest}, expected {RANKS_SHA256}: "
                         "the file is damaged or not the GPT-2 ranks")
    ranks = parse_ranks(data)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_TOKEN: EOT_ID}, explicit_n_vocab=N_VOCAB)


def parse_ranks(data: bytes) -> dict[bytes, int]:
    """A .tiktoken file's contents: one "<base64 token> <rank>" per line."""
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def encode(text: str) -> list[int]:
    """Encode text, allowing "<|endoftext|>" to appear as the special token."""
    return get_encoding().encode(text, allowed_special={EOT_TOKEN})


def decode(ids) -> str:
    return get_encoding().decode(list(ids))
