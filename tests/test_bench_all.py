"""`monosem bench` (monosem/bench.py): every benchmark script as a real subprocess at tiny shapes, one merged
JSON, one table, and the README block between the bench markers rewritten on a copy of README.md; a
failing stage is reported and the others still run. No timing is asserted.

    OMP_NUM_THREADS=1 python -m pytest -q -x tests/test_bench_all.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from monosem import bench
from monosem.errors import MonosemError

REPO = Path(__file__).resolve().parents[1]
STAGES = ["stream", "train_fp32_quickstart", "train_bf16_quickstart", "train_fp32_4096", "train_bf16_4096",
          "step", "disk_fp32", "disk_bf16"]


def readme_copy(tmp_path: Path) -> Path:
    """README.md copied, with the bench markers around a placeholder if it has none yet."""
    text = (REPO / "README.md").read_text()
    if bench.START not in text:
        text = text.replace("## Benchmarks\n", f"## Benchmarks\n\n{bench.START}\nold table\n{bench.END}\n", 1)
    path = tmp_path / "README.md"
    path.write_text(text)
    return path


def split_at_markers(text: str) -> tuple[str, str, str]:
    i, j = text.index(bench.START) + len(bench.START), text.index(bench.END)
    return text[:i], text[i:j], text[j:]


def test_quick_runs_every_stage_and_rewrites_the_readme_block(tmp_path):
    readme, out = readme_copy(tmp_path), tmp_path / "bench.json"
    before = split_at_markers(readme.read_text())
    cmd = [sys.executable, "-m", "monosem", "bench", "--quick", "--out", str(out), "--readme", str(readme)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"[{len(STAGES)}/{len(STAGES)}] disk_bf16 (bench_disk.py) ... ok in" in done.stdout
    merged = json.loads(out.read_text())
    assert merged["order"] == STAGES and sorted(merged["stages"]) == sorted(STAGES) and merged["quick"] is True
    assert set(merged["machine"]) >= {"cpus", "cpu", "cpu_capability", "torch", "device"}
    for name, s in merged["stages"].items():
        assert s["ok"] and s["error"] is None and s["wall_s"] > 0 and isinstance(s["result"], dict), name
    st = {n: s["result"] for n, s in merged["stages"].items()}
    assert st["train_bf16_4096"]["bf16"] is True and st["train_fp32_4096"]["bf16"] is False
    assert st["disk_bf16"]["bf16"] is True and st["disk_fp32"]["shapes"] == st["train_fp32_4096"]["shapes"]
    assert [(r["n_features"], r["dtype"]) for r in st["step"]["results"]] == [
        (128, "fp32"), (128, "bf16"), (256, "fp32"), (256, "bf16")]

    prefix, block, suffix = split_at_markers(readme.read_text())
    assert (prefix, suffix) == (before[0], before[2])                   # nothing else changed
    assert block == "\n" + bench.render(merged) + "\n" and block != before[1]
    assert bench.render(merged) in done.stdout                          # the one table printed
    e2e = st["train_fp32_4096"]["end_to_end_last_window"]
    disk = st["disk_fp32"]["disk_first_vectors_per_s"]
    row = next(line for line in block.splitlines() if line.startswith("| n_features 128, batch 128 | fp32 |"))
    assert f"| {e2e:,.0f} |" in row and f"| {disk:,.0f} |" in row and f"{e2e / disk:.2f}x" in row
    assert f"| {st['stream']['producer_vectors_per_s']['best']:,.0f} |" in block
    x = st["step"]["results"][0]
    assert (f"| n_features 128 | fp32 | {x['encoder_gemm_vectors_per_s']:,.0f} "
            f"| {x['ceiling_vectors_per_s']:,.0f} | {x['dense']['vectors_per_s']:,.0f} |") in block
    assert "n/a" not in block and "Failed" not in block


def test_a_failing_stage_is_reported_and_the_others_run(tmp_path, monkeypatch, capsys):
    tiny = ["--steps", "1", "--warmup", "0", "--vectors", "64", "--shard-vectors", "64", "--set",
            *bench.TINY_LM, "sae.n_features=64", "train_sae.batch_size=64"]
    plan = [("disk_fp32", "bench_disk.py", [*tiny[:4], "--vectors", "8", *tiny[6:]]),  # fewer than a batch
            ("disk_bf16", "bench_disk.py", [*tiny, "train_sae.bf16=true"])]
    monkeypatch.setattr(bench, "stages", lambda quick: plan)
    readme, out = readme_copy(tmp_path), tmp_path / "bench.json"
    assert bench.main(["--out", str(out), "--readme", str(readme)]) == 1
    err = capsys.readouterr().err
    assert "disk_fp32 failed (exit 1)" in err and "--vectors 8 must be >= train_sae.batch_size 64" in err
    merged = json.loads(out.read_text())
    bad, good = merged["stages"]["disk_fp32"], merged["stages"]["disk_bf16"]
    assert not bad["ok"] and bad["result"] is None and "must be >= train_sae.batch_size" in bad["error"]
    assert good["ok"] and good["result"]["bf16"] is True
    text = readme.read_text()
    assert "Failed stages (n/a): disk_fp32." in text and "| disk-first fp32: both phases | n/a |" in text
    # re-rendering from the JSON runs nothing and gives the same file
    assert bench.main(["--from", str(out), "--readme", str(readme)]) == 1
    assert readme.read_text() == text


def test_readme_markers_must_be_there_once(tmp_path):
    path = tmp_path / "README.md"
    for text in ("# no markers\n", f"{bench.END}\n{bench.START}\n", f"{bench.START}\n{bench.START}\n{bench.END}\n"):
        path.write_text(text)
        with pytest.raises(MonosemError, match=f"{path} needs exactly one"):
            bench.update_readme(path, "block")
        assert path.read_text() == text
    with pytest.raises(MonosemError, match="unknown bench stage"):
        bench.run_all(True, ["nope"], 10)


def test_the_step_table_shows_the_encoder_gemm_alone_also_for_json_without_it():
    row = {"n_features": 8, "dtype": "fp32", "ceiling_vectors_per_s": 100.0, "dense_over_ceiling": 0.5,
           "dense": {"vectors_per_s": 50.0}, "sparse": []}
    new = bench.step_table({"batch_size": 4, "d_in": 2, "l0_fractions": [], "results": [
        row | {"encoder_gemm_vectors_per_s": 510.0}]})
    old = bench.step_table({"batch_size": 4, "d_in": 2, "l0_fractions": [], "results": [row]})
    assert new[2].startswith("| n_features 8 | fp32 | 510 | 100 | 50 | 50% |")
    assert old[2].startswith("| n_features 8 | fp32 | 500 | 100 | 50 | 50% |")   # 5 x the ceiling
    assert new[0].count("|") == new[1].count("|") == new[2].count("|")        # header, rule, row agree
