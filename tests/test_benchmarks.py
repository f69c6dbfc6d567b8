"""Smoke test of benchmarks/bench_stream.py: the script runs end to end at tiny shapes (a real LM, real shards,
real producer processes) and writes its JSON with positive rates. No timing is asserted.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_benchmarks.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["sae.d_in=32", "lm.d_mlp=32", "lm.d_model=16", "lm.n_head=2", "data.ctx_len=16",
        "buffer.slot_vectors=64", "buffer.pool_size=512", "buffer.n_slots=3", "buffer.producer_batch=4"]


def test_bench_stream_runs_at_tiny_shapes(tmp_path):
    out = tmp_path / "bench_stream.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_stream.py"), "--out", str(out),
           "--seconds", "0.25", "--batch", "64", "--n-features", "128", "--set", *TINY]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "end to end (real producer)" in done.stdout and "SAE step d=32 F=128 B=64" in done.stdout
    r = json.loads(out.read_text())
    for key in ("producer_vectors_per_s", "ring_pool_vectors_per_s", "end_to_end_vectors_per_s",
                "copy_vectors_per_s"):
        assert r[key]["best"] >= r[key]["median"] > 0, key
    assert r["sae_step_s"]["median"] > 0 and r["fetch_after_step_s"]["median"] > 0
    for k in ("best", "median"):
        assert set(r[k]) == {"buffer_s_per_vector", "producer_s_per_vector", "buffer_over_producer_cost",
                             "floor_over_producer_cost", "producer_over_ring_pool_rate",
                             "fetch_over_sae_step", "end_to_end_over_producer"}
        assert all(v > 0 for v in r[k].values())
    assert r["setup"]["d_in"] == 32 and r["setup"]["n_features"] == 128 and r["setup"]["batch"] == 64
    assert r["setup"]["buffer"]["pool_size"] == 512


def test_bench_train_runs_at_tiny_shapes(tmp_path):
    out = tmp_path / "bench_train.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--out", str(out), "--steps", "6",
           "--window", "3", "--step-steps", "2", "--set", *TINY, "sae.n_features=128", "train_sae.batch_size=64"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [w["step"] for w in r["windows"]] == [3, 6] and all(w["vectors_per_s"] > 0 for w in r["windows"])
    for name in ("fresh", "trained"):
        s = r[f"step_only_{name}"]
        assert s["vectors_per_s"] > 0 and s["path"] in ("sparse", "dense") and s["threads"] == os.cpu_count()
    assert r["end_to_end_over_step_only"] > 0 and r["shapes"]["n_features"] == 128
    assert "step only, trained SAE" in done.stdout


def test_bench_share_runs_both_rules_and_the_step_alone_at_tiny_shapes(tmp_path):
    out = tmp_path / "bench_share.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_share.py"), "--out", str(out), "--rounds", "1",
           "--train-steps", "4", "--warm", "1", "--steps", "2", "--set", *TINY, "sae.n_features=128",
           "train_sae.batch_size=64"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["rules"]) == {"default", "before", "alone"} and r["run"] == "random tokens, random LM"
    for name, rule in r["rules"].items():
        assert len(rule["runs"]) == 1 and rule["vectors_per_s"] > 0
        if name == "alone":  # the step without the producer: no pipeline sections
            assert rule["step_ms"] > 0 and "wait" not in rule
            assert rule["runs"][0]["path"] in ("dense", "sparse")
        else:
            assert rule["step_ms"] >= rule["fwd_bwd"] > 0 and rule["next_batch"] >= rule["wait"] >= 0
    assert "default / before:" in done.stdout and "end to end (default) / step alone:" in done.stdout
