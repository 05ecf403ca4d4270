"""Shard format and ShardLoader: layout, validation, rank disjointness, shuffling, exact resumption, memory."""

import shutil
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_metrics, run_script, tiny_run, train_args

import train_gpt2
from pretrain import distributed
from pretrain import loader as loader_module
from pretrain.checkpoint import load_model
from pretrain.config import load_config
from pretrain.loader import ShardLoader, document_starts
from pretrain.shards import ShardError, list_shards, read_shard, write_shard
from pretrain.tokenizer import EOT_ID, N_VOCAB
from pretrain.trainer import build_loaders

# ---- helpers ----------------------------------------------------------------------------------------------------

def make_docs(n_tokens: int, rng: np.random.Generator, first: int = 0, lead: int = 0, longest: int = 12) -> np.ndarray:
    """n_tokens of documents 2-`longest` tokens long, each starting with EOT (after `lead` tokens with none).

    Every other token is unique (first, first+1, ...), so its position in the data can be recognised anywhere.
    """
    tokens = np.arange(first, first + n_tokens) % EOT_ID
    pos = lead
    while pos < n_tokens:
        tokens[pos] = EOT_ID
        pos += int(rng.integers(2, longest + 1))
    return tokens


def write_split(data_dir: Path, shards: list[np.ndarray], split: str = "train") -> list[Path]:
    paths = [data_dir / f"tiny_{split}_{i:06d}.bin" for i in range(len(shards))]
    for path, tokens in zip(paths, shards):
        write_shard(path, tokens)
    return paths


def make_split(data_dir: Path, sizes: list[int], seed: int = 0, split: str = "train") -> np.ndarray:
    """Shards of the given sizes with distinguishable tokens; returns the whole stream in file order."""
    rng = np.random.default_rng(seed)
    shards, first = [], 1
    for i, n in enumerate(sizes):
        shards.append(make_docs(n, rng, first=first, lead=3 if i == 0 else 0))
        first += n
    write_split(data_dir, shards, split)
    return np.concatenate(shards)


def take(loader: ShardLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def stream_of(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """The inputs of consecutive batches of one rank, flattened in the order they were read."""
    return torch.cat([x.flatten() for x, _ in batches]).numpy()


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def split_documents(stream: np.ndarray, doc_of: dict[int, int]) -> list[tuple[int, ...]]:
    """Cut a stream where a document starts: at each EOT, and where the (unique) tokens change document."""
    docs: list[list[int]] = []
    for i, tok in enumerate(stream.tolist()):
        prev = stream[i - 1] if i else EOT_ID
        if i == 0 or tok == EOT_ID or (prev != EOT_ID and doc_of[tok] != doc_of[int(prev)]):
            docs.append([])
        docs[-1].append(tok)
    return [tuple(d) for d in docs]


def documents(tokens: np.ndarray) -> list[tuple[int, ...]]:
    starts = document_starts(tokens).tolist() + [len(tokens)]
    return [tuple(tokens[a:b].tolist()) for a, b in zip(starts[:-1], starts[1:])]


# ---- shard format -----------------------------------------------------------------------------------------------

def test_shard_byte_layout(tmp_path: Path) -> None:
    path = tmp_path / "s_train_000000.bin"
    tokens = [1, 258, 65535, EOT_ID]
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, len(tokens)]
    assert not header[3:].any()
    assert raw[1024:] == b"\x01\x00\x02\x01\xff\xff\x50\xc4"  # little-endian uint16
    assert read_shard(path).tolist() == tokens


def _bad_magic(raw: bytearray) -> bytes:
    raw[0:4] = (12345).to_bytes(4, "little")
    return bytes(raw)


def _bad_version(raw: bytearray) -> bytes:
    raw[4:8] = (2).to_bytes(4, "little")
    return bytes(raw)


@pytest.mark.parametrize("corrupt, message", [
    (_bad_magic, "magic number 12345"),
    (_bad_version, "version 2"),
    (lambda raw: bytes(raw[:-3]), "truncated"),
    (lambda raw: bytes(raw[:600]), "shorter than the 1024-byte header"),
    (lambda raw: bytes(raw) + b"\x00\x00", "but the file is"),
])
def test_corrupt_shard_error_names_file(tmp_path: Path, corrupt, message: str) -> None:
    path = tmp_path / "s_train_000000.bin"
    write_shard(path, np.arange(100))
    path.write_bytes(corrupt(bytearray(path.read_bytes())))
    with pytest.raises(ShardError, match=message) as info:
        read_shard(path)
    assert str(path) in str(info.value)


def test_loader_checks_every_shard_at_start(tmp_path: Path) -> None:
    paths = write_split(tmp_path, [np.arange(500)] * 4)
    paths[-1].write_bytes(paths[-1].read_bytes()[:-10])  # only the last shard, which a run would reach last
    with pytest.raises(ShardError, match="truncated") as info:
        ShardLoader(tmp_path, "train", batch_size=2, seq_len=8)
    assert str(paths[-1]) in str(info.value)


def test_npy_shards_are_read(tmp_path: Path) -> None:
    tokens = make_docs(300, np.random.default_rng(0))
    np.save(tmp_path / "edu_val_000000.npy", tokens.astype(np.uint16))
    shard = read_shard(tmp_path / "edu_val_000000.npy")
    assert isinstance(shard, np.memmap) and shard.dtype == np.uint16
    assert np.array_equal(shard, tokens)
    loader = ShardLoader(tmp_path, "val", batch_size=2, seq_len=10)
    assert np.array_equal(stream_of(take(loader, 5)), tokens[:100])
    np.save(tmp_path / "bad_val_000001.npy", tokens.astype(np.int32))
    with pytest.raises(ShardError, match="bad_val_000001.npy"):
        read_shard(tmp_path / "bad_val_000001.npy")


@pytest.mark.parametrize("tokens, starts", [
    ([7, EOT_ID, 1, EOT_ID, EOT_ID, 2], [0, 1, 3, 4]),
    ([EOT_ID, 1, 2, EOT_ID], [0, 3]),
    ([5, 6], [0]),
    ([], []),
])
def test_document_starts(monkeypatch: pytest.MonkeyPatch, tokens: list[int], starts: list[int]) -> None:
    monkeypatch.setattr(loader_module, "SCAN_CHUNK", 2)  # documents that straddle scan chunks
    assert document_starts(np.array(tokens, dtype=np.uint16)).tolist() == starts


# ---- batches ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shuffle", [True, False])
def test_targets_are_inputs_shifted(tmp_path: Path, shuffle: bool) -> None:
    make_split(tmp_path, [400, 300])
    loader = ShardLoader(tmp_path, "train", batch_size=3, seq_len=16, shuffle=shuffle)
    for x, y in take(loader, 20):
        assert x.shape == y.shape == (3, 16)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])
        if not shuffle:
            assert torch.equal(y[:-1, -1], x[1:, 0])  # unshuffled, the rows of a batch are one contiguous window


@pytest.mark.parametrize("world_size", [1, 3])
def test_unshuffled_stream_is_file_order_with_nothing_skipped(tmp_path: Path, world_size: int) -> None:
    stream = make_split(tmp_path, [37, 0, 50, 29])  # an empty shard, and batches that straddle every boundary
    loaders = [ShardLoader(tmp_path, "train", 2, 8, rank=r, world_size=world_size, shuffle=False)
               for r in range(world_size)]
    steps = 60 // world_size  # about eight epochs
    batches = [loader.next_batch() for _ in range(steps) for loader in loaders]  # step by step, rank by rank
    n = len(batches) * 16
    repeated = np.tile(stream, n // len(stream) + 2)
    assert np.array_equal(stream_of(batches), repeated[:n])
    assert np.array_equal(torch.cat([y.flatten() for _, y in batches]).numpy(), repeated[1:n + 1])


def test_two_ranks_cover_every_token_once_per_epoch(tmp_path: Path) -> None:
    stream = make_split(tmp_path, [130, 200, 150])  # 480 tokens = 15 steps of 2 ranks x 2 x 8
    ranks = [ShardLoader(tmp_path, "train", 2, 8, rank=r, world_size=2) for r in range(2)]
    seen = Counter(np.concatenate([stream_of(take(loader, 15)) for loader in ranks]).tolist())
    expected = Counter(stream.tolist())
    assert seen == expected
    assert max(c for tok, c in seen.items() if tok != EOT_ID) == 1


def test_shuffle_permutes_whole_documents_over_all_shards(tmp_path: Path) -> None:
    sizes = [160, 96, 224]  # 480 tokens = 30 batches of 2 x 8
    stream = make_split(tmp_path, sizes)
    bounds = np.cumsum([0] + sizes)
    shard_docs = [documents(stream[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    doc_of = {tok: i for i, doc in enumerate(d for docs in shard_docs for d in docs) for tok in doc if tok != EOT_ID}

    loader = ShardLoader(tmp_path, "train", 2, 8, lanes=1)  # one lane: the rows read the epoch's stream in order
    assert loader.shuffle
    shuffled = split_documents(stream_of(take(loader, 30)), doc_of)
    originals = [d for docs in shard_docs for d in docs]
    assert Counter(shuffled) == Counter(originals)  # every document intact, each exactly once
    assert shuffled != originals
    lead = shard_docs[0][0]
    assert lead[0] != EOT_ID
    assert all(d[0] == EOT_ID for d in shuffled if d != lead)
    # one shuffle over all shards: the shards' documents interleave, instead of coming shard after shard
    shard_of = [next(i for i, docs in enumerate(shard_docs) if d in docs) for d in shuffled]
    switches = sum(a != b for a, b in zip(shard_of[:-1], shard_of[1:]))
    assert switches > len(shuffled) / 3


def shards_of_bands(data_dir: Path, sizes: list[int], band: int = 10_000, longest: int = 12) -> None:
    """Train shards whose tokens (other than EOT) come from band i*band+1 .. (i+1)*band-1 in shard i."""
    rng = np.random.default_rng(5)
    shards = []
    for i, n in enumerate(sizes):
        tokens = rng.integers(i * band + 1, (i + 1) * band, size=n)
        tokens[make_docs(n, rng, longest=longest) == EOT_ID] = EOT_ID
        shards.append(tokens)
    write_split(data_dir, shards)


def test_first_percent_of_an_epoch_samples_every_shard_in_proportion(tmp_path: Path) -> None:
    sizes = [40_000, 80_000, 120_000, 160_000]
    shards_of_bands(tmp_path, sizes)
    loader = ShardLoader(tmp_path, "train", 4, 16, seed=3)
    steps = sum(sizes) // 100 // 64  # the first 1% of the epoch
    tokens = stream_of(take(loader, steps))
    shard_of = tokens[tokens != EOT_ID] // 10_000
    observed = np.bincount(shard_of, minlength=len(sizes)) / len(shard_of)
    expected = np.array(sizes) / sum(sizes)
    # ~6250 rows of tokens in ~390 windows of ~2-3 documents: a standard deviation of about 0.02 per shard
    np.testing.assert_allclose(observed, expected, atol=0.06)


def test_rows_of_a_batch_come_from_different_documents(tmp_path: Path) -> None:
    n_docs, doc_len = 2000, 500  # documents 4x longer than a whole 8 x 16 batch
    tokens = np.repeat(np.arange(1, n_docs + 1), doc_len)
    tokens[::doc_len] = EOT_ID
    write_split(tmp_path, [tokens[:len(tokens) // 3], tokens[len(tokens) // 3:]])
    for world_size in (1, 2):
        ranks = [ShardLoader(tmp_path, "train", 8 // world_size, 16, rank=r, world_size=world_size, seed=11)
                 for r in range(world_size)]
        distinct = []
        for _ in range(20):
            rows = torch.cat([loader.next_batch()[0] for loader in ranks])  # one step, over all ranks
            distinct.append(len({int(row.max()) for row in rows}))  # a row's document: its (largest) token
        # independent rows would share a document in ~1 step of 70 (28 pairs, 1 in 2000 each)
        assert sum(distinct) >= 20 * 8 - 2, distinct


@pytest.mark.parametrize("lanes", [4096, 5])  # every window its own lane; 14-15 windows a lane, 4 in the last column
def test_shuffled_ranks_read_every_token_once_per_epoch_across_epoch_ends(tmp_path: Path, lanes: int) -> None:
    stream = make_split(tmp_path, [250, 340])  # 590-token epochs: windows of 8 straddle most epoch ends
    ranks = [ShardLoader(tmp_path, "train", 2, 8, rank=r, world_size=2, lanes=lanes) for r in range(2)]
    seen = Counter(np.concatenate([stream_of(take(loader, 295)) for loader in ranks]).tolist())  # 16 epochs
    assert seen == Counter({tok: 16 * count for tok, count in Counter(stream.tolist()).items()})


def test_shuffle_changes_with_seed_and_epoch(tmp_path: Path) -> None:
    stream = make_split(tmp_path, [100, 140])  # 240 tokens = 15 batches of 2 x 8

    def epochs(seed: int) -> tuple[np.ndarray, np.ndarray]:
        loader = ShardLoader(tmp_path, "train", 2, 8, seed=seed)
        return stream_of(take(loader, 15)), stream_of(take(loader, 15))

    seed0_epoch0, seed0_epoch1 = epochs(0)
    seed1_epoch0, _ = epochs(1)
    for shuffled in (seed0_epoch0, seed0_epoch1, seed1_epoch0):
        assert np.array_equal(np.sort(shuffled), np.sort(stream))
    assert not np.array_equal(seed0_epoch0, seed0_epoch1)
    assert not np.array_equal(seed0_epoch0, seed1_epoch0)
    assert not np.array_equal(seed0_epoch0, stream)
    assert np.array_equal(epochs(0)[0], seed0_epoch0)  # deterministic from (seed, epoch)


# ---- state ------------------------------------------------------------------------------------------------------

def assert_plain(value) -> None:
    """Only what torch.load(weights_only=True) accepts without help, and nothing numpy."""
    assert type(value) in (int, float, str, bool, list, dict), type(value)
    if isinstance(value, dict):
        for k, v in value.items():
            assert type(k) is str
            assert_plain(v)
    elif isinstance(value, list):
        for v in value:
            assert_plain(v)


@pytest.mark.parametrize("k, m, through_torch_save, lanes", [
    (3, 5, False, 4096),  # mid-epoch
    (15, 8, False, 4096),  # the m batches cross into the next epoch (steps of 32 tokens, 590-token epochs)
    (16, 6, False, 7),  # lanes of ~10 windows, crossing the epoch's last column into the next epoch
    (25, 4, True, 4096),  # restored from a checkpoint file, in the second epoch
])
def test_state_round_trip(tmp_path: Path, k: int, m: int, through_torch_save: bool, lanes: int) -> None:
    make_split(tmp_path / "data", [250, 340])
    original = ShardLoader(tmp_path / "data", "train", 2, 8, rank=1, world_size=2, seed=7, lanes=lanes)
    take(original, k)
    state = original.state_dict()
    assert_plain(state)
    expected = take(original, m)
    if through_torch_save:
        torch.save({"loader": state}, tmp_path / "ckpt.pt")
        state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"]
    restored = ShardLoader(tmp_path / "data", "train", 2, 8, rank=1, world_size=2, seed=7, lanes=lanes)
    restored.load_state_dict(state)
    assert (restored.position, restored.epoch) == (state["position"], state["epoch"]) == (k * 32, k * 32 // 590)
    assert_same_batches(take(restored, m), expected)


def test_state_restores_under_another_world_size(tmp_path: Path) -> None:
    make_split(tmp_path, [300, 211])
    single = ShardLoader(tmp_path, "train", 2, 8)
    take(single, 7)
    state = single.state_dict()
    expected = take(single, 6)  # what ranks 0, 1, 0, 1, ... of a 2-rank job get, step by step
    ranks = [ShardLoader(tmp_path, "train", 2, 8, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    assert_same_batches([ranks[i % 2].next_batch() for i in range(6)], expected)


def test_two_ranks_read_the_rows_of_one_process_with_their_batch(tmp_path: Path) -> None:
    make_split(tmp_path, [300, 211])
    single = ShardLoader(tmp_path, "train", 4, 8)
    take(single, 5)
    state = single.state_dict()
    ranks = [ShardLoader(tmp_path, "train", 2, 8, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    for x, y in take(single, 20):  # past the end of the epoch
        assert torch.equal(torch.cat([ranks[0].next_batch()[0], ranks[1].next_batch()[0]]), x)


def test_val_reset_yields_identical_batches(tmp_path: Path) -> None:
    stream = make_split(tmp_path, [90, 70], split="val")
    make_split(tmp_path, [90, 70], split="train")
    assert ShardLoader(tmp_path, "train", 2, 8).shuffle
    val = ShardLoader(tmp_path, "val", 2, 8)
    assert not val.shuffle
    first = take(val, 13)  # more than one epoch of val
    assert np.array_equal(stream_of(first)[:160], stream)
    val.reset()
    assert_same_batches(take(val, 13), first)


def test_load_state_dict_rejects_changed_data(tmp_path: Path) -> None:
    make_split(tmp_path, [200, 200])
    state = ShardLoader(tmp_path, "train", 2, 8).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ShardLoader(tmp_path, "train", 2, 8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle"):
        ShardLoader(tmp_path, "train", 2, 8, shuffle=False).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        ShardLoader(tmp_path, "train", 2, 16).load_state_dict(state)  # a position counts windows of seq_len
    with pytest.raises(ValueError, match="lanes"):
        ShardLoader(tmp_path, "train", 2, 8, lanes=3).load_state_dict(state)
    with pytest.raises(ValueError, match="has no 'split'"):
        ShardLoader(tmp_path, "train", 2, 8).load_state_dict({"position": 0})
    write_shard(tmp_path / "tiny_train_000001.bin", np.arange(199))  # same name, one token fewer
    with pytest.raises(ValueError, match="shards .*changed"):
        ShardLoader(tmp_path, "train", 2, 8).load_state_dict(state)
    write_shard(tmp_path / "tiny_train_000001.bin", np.arange(200))  # same name and size, but written anew
    with pytest.raises(ValueError, match=r"shard tiny_train_000001.bin in .* changed since the checkpoint was saved "
                                         r"\(size 1,424 -> 1,424 bytes, modified .*check_shard_dates=false"):
        ShardLoader(tmp_path, "train", 2, 8).load_state_dict(state)
    ShardLoader(tmp_path, "train", 2, 8, check_dates=False).load_state_dict(state)  # names and sizes: accepted
    write_shard(tmp_path / "tiny_train_000002.bin", np.arange(200))
    with pytest.raises(ValueError, match="shards .*changed"):
        ShardLoader(tmp_path, "train", 2, 8).load_state_dict(state)


# ---- limits -----------------------------------------------------------------------------------------------------

def test_loader_memory_maps_instead_of_copying(tmp_path: Path) -> None:
    n = 8_000_000  # a 16 MB shard of documents of about 1000 tokens
    write_split(tmp_path, [make_docs(n, np.random.default_rng(0), longest=2000)])
    tracemalloc.start()
    try:
        loader = ShardLoader(tmp_path, "train", 4, 256)
        take(loader, 20)  # shuffled: the first batch scans the whole shard for documents
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        np.array(loader.shards[0])  # a copy, to show tracemalloc does see numpy's memory
        _, copy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(isinstance(s, np.memmap) for s in loader.shards)
    assert copy_peak >= 2 * n
    assert peak < 2 * n / 4


def test_too_little_data_is_an_error(tmp_path: Path) -> None:
    make_split(tmp_path, [10, 6])  # 16 tokens; a 2 x 8 batch needs 17
    with pytest.raises(ShardError, match="16 tokens, fewer than one batch"):
        ShardLoader(tmp_path, "train", 2, 8)
    ShardLoader(tmp_path, "train", 3, 5)  # 16 tokens are enough for 3 x 5 + 1


def test_bad_arguments(tmp_path: Path) -> None:
    make_split(tmp_path, [100])
    with pytest.raises(ValueError, match="rank 2"):
        ShardLoader(tmp_path, "train", 2, 8, rank=2, world_size=2)
    with pytest.raises(ShardError, match="no val shards"):
        ShardLoader(tmp_path, "val", 2, 8)


# ---- token ids ---------------------------------------------------------------------------------------------------

def plant_token(path: Path, offset: int, token_id: int) -> None:
    tokens = np.array(read_shard(path))
    tokens[offset] = token_id
    write_shard(path, tokens)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("token_id", [N_VOCAB, 50303, 60000])  # the first padded id, the last, past 124M's vocab
def test_token_ids_outside_gpt2_stop_at_their_first_read(tmp_path: Path, shuffle: bool, token_id: int) -> None:
    make_split(tmp_path, [300, 200])
    path = tmp_path / "tiny_train_000001.bin"
    plant_token(path, 123, token_id)
    loader = ShardLoader(tmp_path, "train", 2, 8, shuffle=shuffle)
    with pytest.raises(ShardError, match=f"token id {token_id} at token offset 123 ") as info:
        take(loader, 32)  # one epoch
    assert str(path) in str(info.value)


def test_the_last_gpt2_id_is_read(tmp_path: Path) -> None:
    make_split(tmp_path, [300])
    plant_token(tmp_path / "tiny_train_000000.bin", 5, N_VOCAB - 2)
    x, _ = ShardLoader(tmp_path, "train", 2, 8, shuffle=False).next_batch()
    assert x[0, 5] == N_VOCAB - 2


@pytest.mark.slow
def test_training_stops_with_one_line_on_a_token_outside_gpt2(tiny_shards: Path, tmp_path: Path) -> None:
    for shard in tiny_shards.iterdir():
        (tmp_path / shard.name).write_bytes(shard.read_bytes())
    plant_token(tmp_path / "tiny_train_000000.bin", 10, 50300)
    result = run_script(*train_args(tmp_path, tmp_path / "run", "--data.micro_batch_size=2",
                                    "--data.total_batch_tokens=64", "--data.shuffle=false", "--train.eval_interval=0",
                                    "--train.max_steps=2"), check=False, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "tiny_train_000000.bin: token id 50300 at token offset 10 " in lines[0]


# ---- data that is not what the run thinks ----------------------------------------------------------------------

def test_a_prefix_holding_train_does_not_make_a_val_shard_a_train_shard(tmp_path: Path) -> None:
    write_shard(tmp_path / "my_train_data_val_000000.bin", np.arange(100))
    write_shard(tmp_path / "my_train_data_train_000000.bin", np.arange(100, 300))
    assert [p.name for p in list_shards(tmp_path, "val")] == ["my_train_data_val_000000.bin"]
    assert [p.name for p in list_shards(tmp_path, "train")] == ["my_train_data_train_000000.bin"]


def test_an_unfinished_build_is_refused_with_the_way_to_finish_it(tiny_shards: Path, tmp_path: Path) -> None:
    for shard in tiny_shards.iterdir():
        (tmp_path / shard.name).write_bytes(shard.read_bytes())
    (tmp_path / "progress.json").write_text("{}")  # what fineweb.py leaves while it builds, or when interrupted
    with pytest.raises(ShardError, match=r"holds an unfinished fineweb.py build \(its progress.json, no "
                                         r"manifest.json\): run the command that built it again to finish it"):
        train_gpt2.main(tiny_run(tmp_path, tmp_path / "run", "--train.max_steps=1"))


@pytest.mark.slow
def test_training_says_what_it_reads_and_never_reads_a_validation_batch_twice(tiny_shards: Path, tmp_path: Path):
    # the val split holds 8,192 tokens: 63 whole batches of 4 x 32 (the +1 of the last target), not the 100 asked
    result = run_script(*train_args(tiny_shards, tmp_path, "--train.max_steps=1", "--train.val_steps=100"))
    train_tokens = sum(len(read_shard(p)) for p in list_shards(tiny_shards, "train"))
    assert f"data: train: 2 shard(s), {train_tokens:,} tokens" in result.stdout
    assert f"(tiny_train_000000.bin .. tiny_train_000001.bin, in {tiny_shards}), documents shuffled" in result.stdout
    assert "val: 1 shard(s), 8,192 tokens (tiny_val_000000.bin, in " in result.stdout
    assert ("an evaluation reads 63 batches per rank (8,064 tokens), all the split holds: not train.val_steps=100, "
            "which would read some twice") in result.stdout
    model, _ = load_model(tmp_path)
    loader = ShardLoader(tiny_shards, "val", 4, 32)
    batches = [loader.next_batch() for _ in range(63)]
    with torch.no_grad():
        expected = sum(model(x, y)[1].item() for x, y in batches) / 63
    final_val = [r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r][-1]
    assert final_val == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_a_shard_replaced_between_a_run_and_its_resume_is_refused(tiny_shards: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_shards, data)
    run_script(*train_args(data, tmp_path / "run", "--train.max_steps=2", "--train.eval_interval=0"))
    shard = data / "tiny_train_000001.bin"
    tokens = np.array(read_shard(shard))
    write_shard(shard, tokens[::-1].copy())  # the same name, size and token count; other tokens
    resumed = run_script(*train_args(data, tmp_path / "run", "--train.max_steps=4", "--train.eval_interval=0"),
                         check=False)
    assert resumed.returncode == 2
    assert "tiny_train_000001.bin in " in resumed.stderr
    assert "changed since the checkpoint was saved" in resumed.stderr
    assert len(resumed.stderr.strip().splitlines()) == 1


def test_a_val_split_smaller_than_one_step_over_all_ranks_is_refused(tmp_path: Path) -> None:
    make_split(tmp_path, [5000])  # train
    write_shard(tmp_path / "tiny_val_000000.bin", np.arange(200))  # one rank's 4 x 32 (+1) fits, two ranks' do not
    cfg = load_config(["--data.seq_len=32", "--data.micro_batch_size=4", f"--data.dir={tmp_path}",
                       "--model.block_size=32"])
    two_ranks = distributed.DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(ShardError, match=rf"the val split of {tmp_path} holds 200 tokens, fewer than one validation "
                                         r"batch over all ranks needs \(257: .*set train.eval_interval=0"):
        build_loaders(cfg, two_ranks)
    one_rank = distributed.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    assert build_loaders(cfg, one_rank)[1].whole_steps == 1
