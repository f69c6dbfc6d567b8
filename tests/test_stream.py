"""Tests of monosem.stream on real tar shards written by monosem.shards.write_shards.

    OMP_NUM_THREADS=1 python -m pytest -q -x tests/test_stream.py

Every context's tokens encode its id (token t = ctx_id * T + t), so content is checked too.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from monosem.config import Config
from monosem.errors import MonosemError
from monosem.files import write_json_atomic
from monosem.shards import write_shards
from monosem.stream import BLOCK, TokenStream, _plain_members, _tar_members

T, PER_SHARD, N_CTX = 8, 8, 125  # 16 train shards, the last one short (5 contexts)
N_SHARDS = -(-N_CTX // PER_SHARD)


def write_manifest(data_dir: Path, ctx_len: int, splits: dict) -> None:
    write_json_atomic(data_dir / "manifest.json", {
        "format": "monosem-shards/1", "tokenizer": "r50k_base", "n_vocab": 50257, "eot": 50256,
        "ctx_len": ctx_len, "source": "synthetic", "data_config": {}, "versions": {},
        "splits": {name: {"contexts": sum(e["contexts"] for e in es),
                          "tokens": sum(e["tokens"] for e in es), "shards": es}
                   for name, es in splits.items()}})


def make_data(data_dir: Path, n_ctx: int = N_CTX, per_shard: int = PER_SHARD) -> Path:
    ids = np.arange(n_ctx, dtype=np.int64)
    contexts = (ids[:, None] * T + np.arange(T)).astype(np.uint16)  # [N, T]
    val_ids = np.arange(n_ctx, n_ctx + 4, dtype=np.int64)
    val = (val_ids[:, None] * T + np.arange(T)).astype(np.uint16)
    write_manifest(data_dir, T, {"train": write_shards(contexts, ids, data_dir, "train", per_shard),
                                 "val": write_shards(val, val_ids, data_dir, "val", 2)})
    return data_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("shards"))


@pytest.fixture
def data_copy(data, tmp_path) -> Path:
    return Path(shutil.copytree(data, tmp_path / "data"))


def take(it, n: int) -> list[int]:
    out = []
    for tokens, cid in it:
        assert tokens.dtype == np.uint16 and tokens.shape == (T,)
        assert np.array_equal(tokens.astype(np.int64), cid * T + np.arange(T)), cid
        out.append(cid)
        if len(out) == n:
            break
    return out


def shard_ids(i: int) -> set[int]:
    return set(range(i * PER_SHARD, min(N_CTX, (i + 1) * PER_SHARD)))


# ---- splitting ----------------------------------------------------------------------------------

CHILD = """
import json, sys
from monosem.stream import BLOCK, TokenStream, _plain_members, _tar_members
data, rank, world, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
stream = TokenStream(data, rank=rank, world_size=world, num_workers=2, seed=5, loop=False)
ids = [cid for tokens, cid in stream if int(tokens[0]) == cid * len(tokens)]
with open(out, "w") as f:
    json.dump(ids, f)
"""


def test_two_processes_two_workers_cover_an_epoch_exactly_once(data, tmp_path):
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(data), str(r), "2", str(outs[r])],
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    seen = [json.loads(o.read_text()) for o in outs]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(N_CTX))
    # a separate run (this process, other hash seed) gives the same order
    for r in range(2):
        again = TokenStream(data, rank=r, world_size=2, num_workers=2, seed=5, loop=False)
        assert take(again, N_CTX) == seen[r]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 0), (1, 2), (2, 2), (4, 2)])
def test_one_epoch_is_a_disjoint_cover(data, world, workers):
    per_rank = [take(TokenStream(data, rank=r, world_size=world, num_workers=workers, seed=1,
                                 loop=False), 10**6) for r in range(world)]
    union = [c for ids in per_rank for c in ids]
    assert sorted(union) == list(range(N_CTX))
    for ids in per_rank:  # every rank reads whole shards only
        assert set(ids) == set().union(*(shard_ids(c // PER_SHARD) for c in ids))


def test_unshuffled_single_reader_is_in_manifest_order(data):
    stream = TokenStream(data, shuffle_shards=False, shuffle_contexts=False, loop=False)
    assert take(stream, 10**6) == list(range(N_CTX))
    stream = TokenStream(data, world_size=2, rank=1, shuffle_shards=False, shuffle_contexts=False,
                         loop=False)
    assert take(stream, 10**6) == [c for i in range(1, N_SHARDS, 2) for c in sorted(shard_ids(i))]


def test_too_few_shards_for_ranks_times_workers(data):
    with pytest.raises(MonosemError, match=r"16 shards.*world_size 4 x num_workers 5 = 20"):
        TokenStream(data, world_size=4, num_workers=5)
    with pytest.raises(MonosemError, match="world_size 3 x num_workers 1"):
        TokenStream(data, "val", world_size=3)  # 2 val shards
    with pytest.raises(MonosemError, match="no split 'test'"):
        TokenStream(data, "test")


# ---- shuffling ----------------------------------------------------------------------------------

def test_epochs_differ_and_seeds_reproduce(data):
    two_epochs = take(TokenStream(data, seed=0), 2 * N_CTX)
    e0, e1 = two_epochs[:N_CTX], two_epochs[N_CTX:]
    assert sorted(e0) == sorted(e1) == list(range(N_CTX))
    assert e0 != e1 and e0 != list(range(N_CTX))
    assert take(TokenStream(data, seed=0), 2 * N_CTX) == two_epochs
    assert take(TokenStream(data, seed=1), N_CTX) != e0
    # per-epoch shard permutation before the split: a rank's share changes between epochs
    rank0 = TokenStream(data, world_size=2, seed=0)
    shares = [set(c // PER_SHARD for c in take(rank0, 60)) for _ in range(2)]
    assert shares[0] != shares[1]


# ---- resume -------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers,world,rank,n_first", [
    (0, 1, 0, 7), (0, 1, 0, 130), (0, 2, 1, 70), (2, 1, 0, 3), (2, 1, 0, 129), (2, 2, 0, 75)])
def test_resume_continues_exactly(data, workers, world, rank, n_first):
    def stream():
        return TokenStream(data, rank=rank, world_size=world, num_workers=workers, seed=2)
    reference = take(stream(), n_first + 40)
    first = stream()
    assert take(first, n_first) == reference[:n_first]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = stream()
    resumed.load_state_dict(state)
    assert take(resumed, 40) == reference[n_first:]
    assert take(first, 40) == reference[n_first:]  # a new iter() also goes on from the state


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_every_point_of_an_uneven_last_epoch(data, workers):
    # 2 workers get 8 shards each; one holds the short shard so it runs out first (loop=False)
    def stream():
        return TokenStream(data, num_workers=workers, seed=4, loop=False)
    reference = take(stream(), 10**6)
    assert sorted(reference) == list(range(N_CTX))
    for n_first in (1, 60, 118, 121, 124, 125):
        first = stream()
        take(first, n_first)
        resumed = stream()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert take(resumed, 10**6) == reference[n_first:], n_first


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_inside_the_blocks_of_big_shards(tmp_path, workers):
    # workers hand over blocks of BLOCK contexts; shards of 2.3 blocks make resumes land mid-block
    per_shard = 2 * BLOCK + BLOCK // 3
    data_dir = make_data(tmp_path / "big", n_ctx=4 * per_shard, per_shard=per_shard)

    def stream():
        return TokenStream(data_dir, num_workers=workers, seed=6)
    reference = take(stream(), 9 * per_shard)
    assert sorted(reference[:4 * per_shard]) == list(range(4 * per_shard))
    for n_first in (5, BLOCK, BLOCK + 7, 2 * BLOCK + 3, per_shard + 1, 4 * per_shard + 9):
        first = stream()
        take(first, n_first)
        resumed = stream()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert take(resumed, 9 * per_shard - n_first) == reference[n_first:], n_first


def test_batches_shapes_and_resume(data):
    batches = list(TokenStream(data, seed=3, loop=False).batches(16))
    assert [len(ids) for _, ids in batches] == [16] * 7 + [13]
    tokens, ids = batches[0]
    assert tokens.dtype == ids.dtype == torch.int64 and tokens.shape == (16, T)
    assert torch.equal(tokens, ids[:, None] * T + torch.arange(T))
    assert sorted(torch.cat([i for _, i in batches]).tolist()) == list(range(N_CTX))

    looping = TokenStream(data, seed=3, num_workers=2)
    gen = looping.batches(16)
    ref = [next(gen)[1].tolist() for _ in range(12)]
    gen.close()
    first = TokenStream(data, seed=3, num_workers=2)
    gen = first.batches(16)
    for _ in range(5):
        next(gen)
    state = json.loads(json.dumps(first.state_dict()))  # read-ahead must not leak into it
    gen.close()
    resumed = TokenStream(data, seed=3, num_workers=2)
    resumed.load_state_dict(state)
    gen = resumed.batches(16)
    assert [next(gen)[1].tolist() for _ in range(7)] == ref[5:]
    gen.close()
    assert not multiprocessing.active_children()  # closing the generator stopped the workers


def test_state_of_another_stream_is_refused(data):
    state = TokenStream(data, world_size=2, rank=0).state_dict()
    with pytest.raises(MonosemError, match="rank"):
        TokenStream(data, world_size=2, rank=1).load_state_dict(state)
    with pytest.raises(MonosemError, match="seed"):
        TokenStream(data, world_size=2, rank=0, seed=9).load_state_dict(state)


def test_from_config(data):
    cfg = Config()
    cfg.data.dir, cfg.run.seed, cfg.stream.num_workers = str(data), 7, 0
    cfg.stream.shuffle_contexts = False
    got = take(TokenStream.from_config(cfg, "train", rank=1, world_size=2, loop=False), 10**6)
    want = take(TokenStream(data, rank=1, world_size=2, seed=7, shuffle_contexts=False,
                            loop=False), 10**6)
    assert got == want and len(got) > 0


# ---- corrupt shards -----------------------------------------------------------------------------

def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def cut_inside_last_member(path: Path) -> None:
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    truncate(path, (last.offset_data + 10) / path.stat().st_size)


def patch(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))


def test_fast_tar_parser_agrees_with_tarfile(data):
    path = data / "train-000002.tar"
    members = _plain_members(path.read_bytes())
    assert members is not None and len(members) == PER_SHARD  # the fast path reads our shards
    assert members == _tar_members(path, path.read_bytes())
    assert _plain_members(path.read_bytes()[:-3000]) is None  # cut short: tarfile judges


@pytest.mark.parametrize("damage,match", [
    (lambda p: truncate(p), r"train-000003\.tar"),
    (cut_inside_last_member, r"train-000003\.tar, member 0000000031\.tokens\.npy: trunc"),
    (lambda p: patch(p, b"\x93NUMPY", b"\x93NUMPX"), r"train-000003\.tar, member 0000000024"),
    (lambda p: patch(p, (24 * T + 3).to_bytes(2, "little"), b"\xff\xff"), r"000003\.tar: sha256"),
    (lambda p: p.unlink(), r"train-000003\.tar: cannot read"),
])
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_names_it(data_copy, damage, match, workers):
    damage(data_copy / "train-000003.tar")
    stream = TokenStream(data_copy, num_workers=workers, loop=False)
    with pytest.raises(MonosemError, match=match):
        take(stream, 10**6)
    assert not multiprocessing.active_children()


def rewrite_member(path: Path, arr: np.ndarray) -> dict:
    """Replace the first member's array; return a manifest entry that matches the new bytes."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    buf = io.BytesIO()
    np.save(buf, arr)
    members[0] = (members[0][0], buf.getvalue())
    members[0][0].size = len(members[0][1])
    with tarfile.open(path, "w") as tar:
        for m, raw in members:
            tar.addfile(m, io.BytesIO(raw))
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


@pytest.mark.parametrize("arr,match", [
    (np.arange(T, dtype=np.uint32), r"member 0000000024\.tokens\.npy: uint32 \[8\]"),
    (np.arange(T + 1, dtype=np.uint16), r"member 0000000024\.tokens\.npy: uint16 \[9\]"),
])
def test_wrong_dtype_or_shape_names_the_member(data_copy, arr, match):
    manifest = json.loads((data_copy / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][3].update(rewrite_member(data_copy / "train-000003.tar",
                                                                  arr))
    write_json_atomic(data_copy / "manifest.json", manifest)
    with pytest.raises(MonosemError, match=r"train-000003\.tar, " + match):
        take(TokenStream(data_copy, shuffle_shards=False, loop=False), 10**6)


def test_context_count_mismatch_names_the_shard(data_copy):
    manifest = json.loads((data_copy / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][5]["contexts"] = 9
    write_json_atomic(data_copy / "manifest.json", manifest)
    with pytest.raises(MonosemError, match=r"train-000005\.tar: holds 8 contexts, manifest says 9"):
        take(TokenStream(data_copy, loop=False), 10**6)


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_mode_warns_counts_and_goes_on(data_copy, workers):
    truncate(data_copy / "train-000003.tar")
    patch(data_copy / "train-000009.tar", b"\x93NUMPY", b"\x93NUMPX")
    stream = TokenStream(data_copy, num_workers=workers, on_corrupt="skip", loop=False)
    with pytest.warns(RuntimeWarning, match=r"train-0000(03|09)\.tar") as record:
        seen = take(stream, 10**6)
    msgs = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 2
    assert any("train-000003.tar" in m for m in msgs) and any("train-000009.tar" in m for m in msgs)
    assert stream.skipped_shards == 2
    assert sorted(seen) == sorted(set(range(N_CTX)) - shard_ids(3) - shard_ids(9))


def test_skip_mode_with_no_readable_shard_raises(tmp_path):
    data_dir = make_data(tmp_path / "d", n_ctx=4, per_shard=2)
    for p in data_dir.glob("train-*.tar"):
        truncate(p, 0.3)
    stream = TokenStream(data_dir, on_corrupt="skip")  # endless: skipping forever would hang
    with pytest.warns(RuntimeWarning), pytest.raises(MonosemError, match="all corrupt"):
        take(stream, 1)
    assert stream.skipped_shards == 2


def test_skip_mode_looping_past_a_lone_corrupt_shard(data_copy):
    # 16 readers, 16 shards: one worker per epoch gets only the corrupt shard, and goes on
    truncate(data_copy / "train-000007.tar")
    streams = [TokenStream(data_copy, rank=r, world_size=8, num_workers=2, on_corrupt="skip")
               for r in range(8)]
    with pytest.warns(RuntimeWarning, match="train-000007"):
        seen = [c for s in streams for c in take(s, 20)]
    assert set(seen) == set(range(N_CTX)) - shard_ids(7)
    assert sum(s.skipped_shards for s in streams) > 0


def test_skip_mode_loops_for_more_epochs_than_shards(data_copy):
    truncate(data_copy / "train-000007.tar")  # met once per epoch: never N_SHARDS times in a row
    stream = TokenStream(data_copy, on_corrupt="skip")
    with pytest.warns(RuntimeWarning, match="train-000007"):
        seen = take(stream, (N_SHARDS + 2) * (N_CTX - PER_SHARD))
    assert stream.skipped_shards == N_SHARDS + 2 and stream.epoch == N_SHARDS + 2
    assert set(seen) == set(range(N_CTX)) - shard_ids(7)
