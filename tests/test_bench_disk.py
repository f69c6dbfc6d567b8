"""benchmarks/bench_disk.py, the disk-first baseline: a tiny real run in a subprocess (real token shards, a
real LM, real .npy files read back), its JSON and byte count; the shuffled loader's coverage; bad sizes.
No timing is asserted.

    OMP_NUM_THREADS=1 python -m pytest -q -x tests/test_bench_disk.py
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_disk  # noqa: E402

from monosem.errors import MonosemError  # noqa: E402

TINY = ["sae.d_in=32", "lm.d_mlp=32", "lm.d_model=16", "lm.n_head=2", "data.ctx_len=16",
        "sae.n_features=64", "train_sae.batch_size=64"]


def npy_bytes(shape: tuple[int, int]) -> int:
    """Size of an fp16 .npy file of this shape, written by numpy itself."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype=np.float16))
    return len(buf.getvalue())


def test_bench_disk_tiny_run(tmp_path):
    out = tmp_path / "bench_disk.json"
    # 600 vectors in shards of 256, 256, 88; 1 + 12 steps of 64 read 832 vectors: a second epoch
    cmd = [sys.executable, str(REPO / "benchmarks/bench_disk.py"), "--out", str(out), "--vectors", "600",
           "--shard-vectors", "256", "--shuffle-shards", "2", "--warmup", "1", "--steps", "12",
           "--tmp-dir", str(tmp_path), "--set", *TINY]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "both phases" in done.stdout and "bytes on disk" in done.stdout
    r = json.loads(out.read_text())
    w, t = r["write"], r["train"]
    assert w["vectors"] == 600 and w["shards"] == 3 and w["contexts"] == 600 // 16 + 1
    assert r["bytes_on_disk"] == w["bytes_on_disk"] == sum(npy_bytes((n, 32)) for n in (256, 256, 88))
    assert 600 * 32 * 2 < r["bytes_on_disk"] <= 600 * 32 * 2 + 3 * 128  # data + one header per shard
    assert r["bytes_per_vector"] == pytest.approx(r["bytes_on_disk"] / 600)
    assert t["steps"] == 12 and t["warmup_steps"] == 1 and t["vectors"] == 12 * 64
    assert w["vectors_per_s"] > 0 and t["vectors_per_s"] > 0 and t["seconds"] > 0
    assert 0 < t["read_s"] < t["seconds"] and 0 < t["read_fraction"] < 1  # the second epoch re-reads
    assert 0 <= t["sparse_step_fraction"] <= 1 and t["last_l0"] > 0
    both = 1 / (1 / w["vectors_per_s"] + 1 / t["vectors_per_s"])
    assert r["disk_first_vectors_per_s"] == pytest.approx(both, rel=1e-12)
    assert r["shapes"] == {"d_in": 32, "n_features": 64, "batch_size": 64} and r["bf16"] is False
    assert r["threads"] == os.cpu_count() and r["shard_vectors"] == 256
    assert not any(p.name.startswith("monosem-bench-disk-") for p in tmp_path.iterdir())  # cleaned up


def test_shuffled_batches_cover_every_vector(tmp_path):
    """Row i holds the value i: the first epoch delivers each row once, two epochs each row twice at most."""
    ids = np.arange(600)
    paths = []
    for k, (a, b) in enumerate([(0, 256), (256, 512), (512, 600)]):
        paths.append(tmp_path / f"acts-{k}.npy")
        np.save(paths[-1], np.repeat(ids[a:b, None], 4, axis=1).astype(np.float16))  # exact up to 2048
    stats = {"read_s": 0.0}
    it = bench_disk.shuffled_batches(paths, 64, 2, seed=0, stats=stats)
    got = [next(it) for _ in range(18)]                                  # 18 x 64 = 1152 of 1200
    assert all(x.shape == (64, 4) and x.dtype.is_floating_point for x in got)
    rows = np.concatenate([x[:, 0].numpy() for x in got]).astype(np.int64)
    assert np.array_equal(np.concatenate([x.numpy().T for x in got], axis=1)[1:],
                          np.tile(rows, (3, 1)).astype(np.float32))     # whole rows moved together
    assert len(np.unique(rows[:576])) == 576                             # 9 batches: no repeat
    counts = np.bincount(rows, minlength=600)
    assert counts.min() >= 1 and counts.max() <= 2 and stats["read_s"] > 0
    assert not np.array_equal(rows[:64], np.arange(64))                  # shuffled


def test_bad_sizes_name_the_flag(tmp_path):
    with pytest.raises(MonosemError, match="--vectors 10 must be >= train_sae.batch_size 64"):
        bench_disk.main(["--out", str(tmp_path / "x.json"), "--vectors", "10", "--set", *TINY])
    assert not (tmp_path / "x.json").exists()
