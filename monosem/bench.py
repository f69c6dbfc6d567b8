"""`monosem bench`: every benchmark in benchmarks/, one after the other, each in its own subprocess; one
merged JSON, one table (Markdown), and optionally the README's performance block regenerated from it.

    monosem bench                              # full shapes: run on an otherwise idle machine
    monosem bench --quick --out /tmp/b.json    # tiny shapes, a few steps (CI smoke test)
    monosem bench --readme                     # ... and rewrite README.md between the bench markers
    monosem bench --from benchmarks/results/bench.json --readme   # re-render only, no runs
    monosem bench --stages stream disk_fp32    # a subset (names: see STAGES below)

Stages: bench_stream (producer, ring + pool, end to end), bench_train fp32/bf16 at the quickstart shapes
(n_features 2048, batch 2048) and at n_features 4096 / batch 4096, bench_step (dense vs sparse at planted
L0, GEMM ceilings) and bench_disk (the disk-first baseline) at n_features 4096 / batch 4096, fp32/bf16.
A failing stage is reported (name + the end of its stderr) and makes the exit code 1; the others still
run. The README block lies between `<!-- bench:start -->` and `<!-- bench:end -->`; nothing else changes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from monosem.errors import MonosemError
from monosem.files import write_json_atomic, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
TINY_LM = ["sae.d_in=32", "lm.d_mlp=32", "lm.d_model=16", "lm.n_head=2", "data.ctx_len=16",
           "buffer.slot_vectors=64", "buffer.pool_size=512", "buffer.n_slots=3", "buffer.producer_batch=4"]
BF16 = ["train_sae.bf16=true"]


def stages(quick: bool) -> list[tuple[str, str, list[str]]]:
    """(stage name, script in benchmarks/, its arguments but --out), full or --quick shapes."""
    if quick:
        q, m4096 = TINY_LM + ["sae.n_features=64", "train_sae.batch_size=64"], TINY_LM + [
            "sae.n_features=128", "train_sae.batch_size=128"]
        train = ["--steps", "4", "--window", "2", "--step-steps", "1"]
        disk = ["--steps", "2", "--warmup", "1", "--vectors", "512", "--shard-vectors", "256"]
        stream = ["--seconds", "0.25", "--batch", "64", "--n-features", "128", "--set", *TINY_LM]
        step = ["--n-features", "128", "256", "--batch", "256", "--d-in", "16", "--steps", "1",
                "--gemm-reps", "1"]
    else:
        q, m4096 = [], ["sae.n_features=4096", "train_sae.batch_size=4096"]
        train, disk, stream, step = [], [], [], []
    return [("stream", "bench_stream.py", stream),
            ("train_fp32_quickstart", "bench_train.py", train + ["--set", *q]),
            ("train_bf16_quickstart", "bench_train.py", train + ["--set", *q, *BF16]),
            ("train_fp32_4096", "bench_train.py", train + ["--set", *m4096]),
            ("train_bf16_4096", "bench_train.py", train + ["--set", *m4096, *BF16]),
            ("step", "bench_step.py", step),
            ("disk_fp32", "bench_disk.py", disk + ["--set", *m4096]),
            ("disk_bf16", "bench_disk.py", disk + ["--set", *m4096, *BF16])]


def machine() -> dict:
    """Where the figures come from: cores, CPU model and capability, torch, device."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def run_stage(name: str, script: str, args: list[str], work: Path, timeout: float) -> dict:
    """Run one benchmark script with its own --out; its JSON, wall time, and on failure its stderr tail."""
    out = work / f"{name}.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--out", str(out), *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = None, f"timed out after {timeout:g} s\n" + (e.stderr or b"").decode(errors="replace")
    ok = rc == 0 and out.is_file()
    if rc == 0 and not ok:
        err += f"\n{script} exited 0 but wrote no {out.name}"
    return {"ok": ok, "wall_s": time.perf_counter() - t0, "returncode": rc,
            "cmd": ["benchmarks/" + script, *args], "result": json.loads(out.read_text()) if ok else None,
            "error": None if ok else "\n".join(err.strip().splitlines()[-15:])}


def run_all(quick: bool, only: list[str] | None, timeout: float) -> dict:
    """Every stage (or those named in `only`), one at a time; the merged result."""
    if not (REPO / "benchmarks").is_dir():
        raise MonosemError(f"no benchmarks/ folder next to the package ({REPO}): run from a source checkout")
    plan = [s for s in stages(quick) if not only or s[0] in only]
    unknown = set(only or []) - {s[0] for s in stages(quick)}
    if unknown:
        raise MonosemError(f"unknown bench stage(s) {', '.join(sorted(unknown))}; one of: "
                           f"{', '.join(s[0] for s in stages(quick))}")
    merged = {"format": "monosem-bench/1", "quick": quick, "machine": machine(),
              "created": time.strftime("%Y-%m-%d %H:%M:%S %z"), "order": [s[0] for s in plan], "stages": {}}
    with tempfile.TemporaryDirectory(prefix="monosem-bench-") as work:
        for i, (name, script, args) in enumerate(plan, 1):
            print(f"[{i}/{len(plan)}] {name} ({script}) ...", end=" ", flush=True)
            r = merged["stages"][name] = run_stage(name, script, args, Path(work), timeout)
            print(f"{'ok' if r['ok'] else 'FAILED'} in {r['wall_s']:.1f} s", flush=True)
            if not r["ok"]:
                print(f"  {name} failed (exit {r['returncode']}):\n    "
                      + r["error"].replace("\n", "\n    "), file=sys.stderr, flush=True)
    return merged


# ---- rendering: whatever keys are present; a missing figure is "n/a" --------------------------------
def dig(d: object, *keys: object) -> object:
    for k in keys:
        try:
            d = d[k]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return None
    return d


def num(v: object, spec: str = ",.0f", suffix: str = "") -> str:
    return f"{v:{spec}}{suffix}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "n/a"


def div(a: object, b: object) -> float | None:
    ok = all(isinstance(v, (int, float)) for v in (a, b))
    return a / b if ok and b else None  # type: ignore[operator]


def shape_of(r: dict | None, name: str) -> str:
    s = dig(r, "shapes")
    return f"n_features {s['n_features']}, batch {s['batch_size']}" if s else f"{name} (failed)"


def training_table(st: dict) -> list[str]:
    rows = ["| SAE training (vectors/s) | dtype | end to end `train()`, last window | SAE step alone, same SAE, "
            "all cores | end to end / step | L0, sparse steps | end to end, whole run | disk-first, both phases "
            "| streaming / disk-first |", "|---" * 9 + "|"]
    for name, s in st.items():
        if not name.startswith("train_"):
            continue
        r, dtype = s.get("result"), "bf16" if "bf16" in name else "fp32"
        disk = next((d.get("result") for n, d in st.items() if n.startswith("disk_") and dtype in n
                     and dig(r, "shapes") and dig(d, "result", "shapes") == dig(r, "shapes")), None)
        e2e, d = dig(r, "end_to_end_last_window"), dig(disk, "disk_first_vectors_per_s")
        last = (dig(r, "windows") or [{}])[-1]
        rows.append(f"| {shape_of(r, name)} | {dtype} | {num(e2e)} "
                    f"| {num(dig(r, 'step_only_trained', 'vectors_per_s'))} "
                    f"| {num(dig(r, 'end_to_end_over_step_only'), '.2f')} "
                    f"| {num(last.get('l0'), '.1f')}, {num(last.get('sparse_share'), '.0%')} "
                    f"| {num(dig(r, 'end_to_end_mean'))} | "  # no disk-first run at this shape: a dash
                    + (f"{num(d)} | {num(div(e2e, d), '.2f', 'x')} |" if disk else "— | — |"))
    return rows


def step_table(r: dict | None) -> list[str]:
    fr = dig(r, "l0_fractions") or [0.01, 0.03, 0.10]
    rows = [f"| SAE step, B {num(dig(r, 'batch_size'), 'd')}, d_in {num(dig(r, 'd_in'), 'd')} (vectors/s) "
            "| dtype | encoder GEMM alone | GEMM ceiling | dense | dense / ceiling | "
            + " | ".join(f"sparse, L0 {f:.0%}" for f in fr) + " |", "|---" * (6 + len(fr)) + "|"]
    for x in dig(r, "results") or [{}]:
        sparse = [next((s for s in x.get("sparse", []) if s.get("target_l0_fraction") == f), {}) for f in fr]
        ceiling = x.get("ceiling_vectors_per_s")  # B / (5 t_gemm); JSON before the encoder field: 5x it
        enc = x.get("encoder_gemm_vectors_per_s", 5 * ceiling if isinstance(ceiling, (int, float)) else None)
        rows.append(f"| n_features {num(x.get('n_features'), 'd')} | {x.get('dtype', 'n/a')} | {num(enc)} "
                    f"| {num(ceiling)} | {num(dig(x, 'dense', 'vectors_per_s'))} "
                    f"| {num(x.get('dense_over_ceiling'), '.0%')} | "
                    + " | ".join(f"{num(s.get('vectors_per_s'))} ({num(s.get('over_dense'), '.1f', 'x')})"
                                 for s in sparse) + " |")
    return rows


def pipeline_table(st: dict) -> list[str]:
    r = dig(st, "stream", "result")
    setup = f"n_features {num(dig(r, 'setup', 'n_features'), 'd')}, batch {num(dig(r, 'setup', 'batch'), 'd')}"
    rows = ["| pipeline piece | vectors/s | note |", "|---|---|---|",
            f"| producer only (LM to the MLP hook, {num(dig(r, 'setup', 'buffer', 'producer_threads'), 'd')} "
            f"thread) | {num(dig(r, 'producer_vectors_per_s', 'best'))} | median "
            f"{num(dig(r, 'producer_vectors_per_s', 'median'))} |",
            f"| ring + pool alone (synthetic producer) | {num(dig(r, 'ring_pool_vectors_per_s', 'best'))} "
            f"| producer rate / this rate {num(dig(r, 'best', 'producer_over_ring_pool_rate'), '.1%')} |",
            f"| streaming end to end, bench_stream ({setup}) | {num(dig(r, 'end_to_end_vectors_per_s', 'best'))} "
            f"| buffer cost / producer cost {num(dig(r, 'best', 'buffer_over_producer_cost'), '.1%')} |"]
    for name, s in st.items():
        if name.startswith("disk_"):
            d, dtype = s.get("result"), "bf16" if "bf16" in name else "fp32"
            rows += [f"| disk-first {dtype}: write (LM + fp16 .npy shards) | {num(dig(d, 'write', 'vectors_per_s'))} "
                     f"| {num(dig(d, 'bytes_on_disk'), ',d')} bytes on disk, "
                     f"{num(dig(d, 'bytes_per_vector'), ',.1f')} per vector |",
                     f"| disk-first {dtype}: train from shuffled shards ({shape_of(d, name)}) "
                     f"| {num(dig(d, 'train', 'vectors_per_s'))} "
                     f"| reading files: {num(dig(d, 'train', 'read_fraction'), '.1%')} of the time |",
                     f"| disk-first {dtype}: both phases | {num(dig(d, 'disk_first_vectors_per_s'))} | |"]
    return rows


def render(merged: dict) -> str:
    """The Markdown block (README and terminal): machine line, then three tables."""
    m, st = merged.get("machine", {}), merged.get("stages", {})
    order = merged.get("order") or [s[0] for s in stages(bool(merged.get("quick")))]  # JSON keys are sorted
    st = {n: st[n] for n in [*order, *sorted(set(st) - set(order))] if n in st}
    failed = [n for n, s in st.items() if not s.get("ok")]
    head = (f"`monosem bench{' --quick' if merged.get('quick') else ''}`, {merged.get('created', 'n/a')}: "
            f"{m.get('cpus', 'n/a')} CPUs ({m.get('cpu', 'n/a')}, {m.get('cpu_capability', 'n/a')}), "
            f"torch {m.get('torch', 'n/a')}, device {m.get('device', 'n/a')}. "
            + ("Tiny shapes: a smoke test, not figures." if merged.get("quick") else
               "d_in 512, the quickstart LM; vectors/s; each ratio from figures of one run.") + (
                f" {merged['note']}" if merged.get("note") else "") + (
                f" Failed stages (n/a): {', '.join(failed)}." if failed else ""))
    parts = [[head], training_table(st), step_table(dig(st, "step", "result")), pipeline_table(st)]
    return "\n\n".join("\n".join(p) for p in parts)


def update_readme(path: str | Path, block: str) -> None:
    """Replace what lies between the bench markers in `path` (atomically); nothing else changes."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise MonosemError(f"cannot read {path}: {e}") from None
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise MonosemError(f"{path} needs exactly one {START} followed by one {END}")
    i, j = text.index(START) + len(START), text.index(END)
    write_text_atomic(path, text[:i] + "\n" + block + "\n" + text[j:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="monosem bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, a few steps (smoke test)")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/bench.json"), help="merged JSON")
    p.add_argument("--readme", nargs="?", const=str(REPO / "README.md"), default=None,
                   help="rewrite the block between the bench markers in README.md (or this file)")
    p.add_argument("--from", dest="source", default=None, help="render this merged JSON; run nothing")
    p.add_argument("--stages", nargs="+", default=None, help="only these stages")
    p.add_argument("--timeout", type=float, default=None, help="seconds per stage (default 3600, quick 600)")
    args = p.parse_args(argv)
    try:
        if args.source:
            merged = json.loads(Path(args.source).read_text())
        else:
            merged = run_all(args.quick, args.stages, args.timeout or (600 if args.quick else 3600))
            write_json_atomic(args.out, merged)
        block = render(merged)
        print("\n" + block + "\n")
        if not args.source:
            print(f"written {args.out}")
        if args.readme:
            update_readme(args.readme, block)
            print(f"updated {args.readme}")
    except (MonosemError, OSError, json.JSONDecodeError) as e:
        print(f"monosem bench: error: {e}", file=sys.stderr)
        return 2
    return 0 if all(s.get("ok") for s in merged["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
