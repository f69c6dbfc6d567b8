"""Corrupt, truncated or mismatched shards met by the stream: named on one line (the shard path
first), or skipped with a warning (stream.on_corrupt = "skip"); shard parsing is monosem.shards.

    OMP_NUM_THREADS=1 python -m pytest -q -x -p no:cacheprovider tests/test_stream_corrupt.py
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from monosem.errors import MonosemError
from monosem.files import write_json_atomic
from monosem.shards import _plain_members, _tar_members
from monosem.stream import TokenStream
from shard_data import N_CTX, N_SHARDS, PER_SHARD, T, make_data, shard_ids, take


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("shards"))


@pytest.fixture
def data_copy(data, tmp_path) -> Path:
    return Path(shutil.copytree(data, tmp_path / "data"))


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
    with pytest.raises(MonosemError, match=match) as e:
        take(stream, 10**6)
    # one line that starts with the path: the producer forwards it as the terminal's first line
    assert str(e.value).startswith(f"shard {data_copy / 'train-000003.tar'}")
    assert "\n" not in str(e.value)
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


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_mode_with_no_readable_shard_raises(tmp_path, workers):
    data_dir = make_data(tmp_path / "d", n_ctx=4, per_shard=2)
    for p in data_dir.glob("train-*.tar"):
        truncate(p, 0.3)
    # endless: skipping forever would hang
    stream = TokenStream(data_dir, on_corrupt="skip", num_workers=workers)
    with pytest.warns(RuntimeWarning), pytest.raises(MonosemError, match="all corrupt") as e:
        take(stream, 1)
    # raised in the main process, not re-wrapped by a DataLoader worker: the shard comes first
    assert str(e.value).startswith(f"shard {data_dir}/train-00000")
    assert "\n" not in str(e.value)
    # in-process, the 3rd corrupt shard in a row (of 2) stops it; each of 2 workers skips 2 first
    assert stream.skipped_shards == (2 if workers == 0 else 4)
    assert not multiprocessing.active_children()


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
