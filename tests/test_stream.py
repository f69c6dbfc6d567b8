"""Tests of monosem.stream on real tar shards: the disjoint split over ranks x workers, the
per-epoch shuffles and the exact resume (corrupt shards: test_stream_corrupt.py).

    OMP_NUM_THREADS=1 python -m pytest -q -x -p no:cacheprovider tests/test_stream.py
"""
from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monosem.config import Config
from monosem.errors import MonosemError
from monosem.stream import BLOCK, TokenStream
from shard_data import N_CTX, N_SHARDS, PER_SHARD, T, make_data, shard_ids, take


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("shards"))


# ---- splitting ----------------------------------------------------------------------------------

CHILD = """
import json, sys
from monosem.stream import TokenStream
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
