"""Smoke test of benchmarks/bench_step.py: a real subprocess at tiny shapes writes the JSON and the table.

    OMP_NUM_THREADS=1 python -m pytest -q -x tests/test_bench_step.py
"""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_step_smoke(tmp_path):
    out = tmp_path / "bench_step.json"
    cmd = [sys.executable, str(REPO / "benchmarks/bench_step.py"), "--out", str(out), "--n-features", "128",
           "--batch", "256", "--d-in", "16", "--l0", "0.02", "0.1", "--steps", "1", "--gemm-reps", "1",
           "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "written" in proc.stdout and "L0 2%" in proc.stdout and "enc GEMM" in proc.stdout
    res = json.loads(out.read_text())
    for key in ("batch_size", "d_in", "threads", "cpus", "cpu_capability", "torch", "steps", "adam",
                "l0_fractions", "ceiling_definition", "results", "checkpoint"):
        assert key in res, key
    assert res["threads"] == 1 and res["checkpoint"] is None
    assert [(r["n_features"], r["dtype"]) for r in res["results"]] == [(128, "fp32"), (128, "bf16")]
    for r in res["results"]:
        assert r["gemm_gflops"] > 0 and r["ceiling_vectors_per_s"] > 0 and r["dense_over_ceiling"] > 0
        # the encoder GEMM alone: one of the ceiling's five GEMMs
        assert abs(r["encoder_gemm_vectors_per_s"] / r["ceiling_vectors_per_s"] - 5) < 1e-9
        assert r["dense"]["path"] == "dense" and r["dense"]["vectors_per_s"] > 0
        assert [s["target_l0_fraction"] for s in r["sparse"]] == [0.02, 0.1]
        for s in r["sparse"]:
            assert s["path"] == "sparse" and s["over_dense"] > 0
            # the planted density holds (quantile of this very batch, tiny lr)
            assert abs(s["density"] - s["target_l0_fraction"]) < 0.3 * s["target_l0_fraction"], s
