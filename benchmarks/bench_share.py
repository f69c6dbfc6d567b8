"""How the producer and the SAE step share the cores: train() resumed from a trained SAE, its sections
timed per step (forward/backward, optimizer, next_batch and the wait on the producer inside it), each
sharing rule in its own process, the rules alternated round after round; medians per rule. Each round
also times the step alone (`alone`: bench_train's step-only measurement, the same trained SAE, real
activation batches in memory, every core), so end to end / step alone is a ratio of medians taken
side by side, not of two single runs minutes apart (single runs scatter by 10-30% on a shared VM).

    python benchmarks/bench_share.py --run runs/quickstart --rounds 6
    python benchmarks/bench_share.py            # random tokens and a random LM (a smoke test, not a figure)
    python benchmarks/bench_share.py --run runs/quickstart --set sae.n_features=4096 train_sae.batch_size=4096

Rules: `default` (the code's defaults) and `before` (libgomp's own spin GOMP_SPINCOUNT=300000, one producer
thread whatever the trainer does, producer_batch 32: the rule before the trainer-waiting flag). The
SAE is trained once (--train-steps, past the dense start) in a temporary run; every measurement resumes
it for --warm + --steps steps and times the last --steps. Single runs scatter by several percent on a
shared VM: compare medians of alternated rounds, on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import monosem  # noqa: F401  (before torch: allocator and OpenMP settings, see monosem.host)

REPO = Path(__file__).resolve().parents[1]
RULES = {"default": ({}, []),
         "before": ({"GOMP_SPINCOUNT": "300000"},
                    ["buffer.producer_batch=32", "buffer.producer_wait_threads=1"])}
SECTIONS = ("fwd_bwd", "opt", "next_batch", "wait")
ALONE = "alone"  # not a sharing rule: the step alone, no producer (the ratio's denominator)


def config(args, root: Path, extra: list[str]):
    from monosem.configfile import load_config
    cfg = load_config(args.config, [f"--{s}" for s in [*args.set, *extra]])
    cfg.run.root, cfg.run.name, cfg.data.dir = str(root), "bench", str(Path(args.run) / "data")
    cfg.train_sae.log_every, cfg.train_sae.eval_every, cfg.train_sae.ckpt_every = 100, 0, 10 ** 9
    cfg.train_sae.resample_steps = []
    return cfg


def timed_resume(args, root: Path, extra: list[str]) -> dict:
    """In this process: resume the SAE in `root` for warm + steps steps; ms per step of each section."""
    import monosem.train_sae as ts
    from monosem.buffer import ActivationBuffer
    cfg = config(args, root, extra)
    cfg.train_sae.steps = args.train_steps + args.warm + args.steps + 1  # the last one closes the interval
    total, on, t_on = collections.defaultdict(float), [False], {}

    def timed(fn, key):
        def call(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            total[key] += (time.perf_counter() - t0) * on[0]
            return out
        return call

    fb, first = timed(ts.forward_backward, "fwd_bwd"), args.train_steps + args.warm

    def forward_backward(t, x, step, c):
        if step in (first, first + args.steps):
            on[0] = step == first
            t_on[step] = time.perf_counter()
        return fb(t, x, step, c)
    ts.forward_backward, ts.optimizer_step = forward_backward, timed(ts.optimizer_step, "opt")
    ActivationBuffer.next_batch = timed(ActivationBuffer.next_batch, "next_batch")
    ActivationBuffer._take_slot = timed(ActivationBuffer._take_slot, "wait")
    ts.train(cfg, resume=True)
    out = {k: total[k] / args.steps * 1e3 for k in SECTIONS}
    out["step_ms"] = (t_on[first + args.steps] - t_on[first]) / args.steps * 1e3
    out["vectors_per_s"] = cfg.train_sae.batch_size / out["step_ms"] * 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="", help="a run with data/ and lm/ (e.g. runs/quickstart); none: random")
    p.add_argument("--config", default=str(REPO / "configs/quickstart.toml"))
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. sae.n_features=4096")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=300, help="steps of the SAE every round resumes")
    p.add_argument("--warm", type=int, default=30, help="resumed steps not timed")
    p.add_argument("--steps", type=int, default=150, help="resumed steps timed")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/bench_share.json"))
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # "<rule> <run root> <result file>"
    args = p.parse_args()
    if args.child:
        rule, root, out = args.child.split()
        result = (step_alone(args, Path(root)) if rule == ALONE
                  else timed_resume(args, Path(root), RULES[rule][1]))
        Path(out).write_text(json.dumps(result))
        return
    tmp, run_name = Path(tempfile.mkdtemp(prefix="bench_share.")), args.run or "random tokens, random LM"
    try:
        if not args.run:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_stream import make_run
            make_run(config(args, tmp, []), tmp / "random", n_shards=16, per_shard=256)
            args.run = str(tmp / "random" / "bench")
        results = measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from monosem.files import write_json_atomic
    write_json_atomic(args.out, {"rules": results, "run": run_name, "set": args.set, "cpus": os.cpu_count(),
                                 "steps": args.steps, "rounds": args.rounds})
    report(results)
    print(f"written {args.out}")


def measure(args, tmp: Path) -> dict:
    from monosem.train_sae import train
    base = tmp / "trained"
    (base / "bench").mkdir(parents=True)
    (base / "bench" / "lm").symlink_to((Path(args.run) / "lm").resolve())
    cfg = config(args, base, [])
    cfg.train_sae.steps = args.train_steps
    train(cfg)
    runs = collections.defaultdict(list)
    for r in range(args.rounds):
        for rule, (env, _) in [*RULES.items(), (ALONE, ({}, []))]:
            root = tmp / f"{rule}{r}"
            shutil.copytree(base, root, symlinks=True)
            out = tmp / f"{rule}{r}.json"
            cmd = [sys.executable, __file__, "--child", f"{rule} {root} {out}", "--run", args.run,
                   "--config", args.config, "--train-steps", str(args.train_steps), "--warm", str(args.warm),
                   "--steps", str(args.steps), "--set", *args.set]
            subprocess.run(cmd, env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)
            runs[rule].append(json.loads(out.read_text()))
            shutil.rmtree(root)
    return {rule: {"runs": rs, **{k: statistics.median(x[k] for x in rs)
                                  for k in (*SECTIONS, "step_ms", "vectors_per_s") if k in rs[0]}}
            for rule, rs in runs.items()}


def step_alone(args, root: Path) -> dict:
    """In this process: the trained SAE's step alone (bench_train.step_only: forward_backward +
    optimizer_step on real activation batches in memory, every core), --steps steps timed."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import batches_in_memory, step_only

    from monosem.checkpoint import load_checkpoint
    cfg = config(args, root, [])
    xs = batches_in_memory(cfg, 4)
    r = step_only(cfg, xs, args.steps, ckpt=load_checkpoint(cfg.sae_dir))  # after 2 warm-up steps
    ms = cfg.train_sae.batch_size / r["vectors_per_s"] * 1e3
    return {"vectors_per_s": r["vectors_per_s"], "step_ms": ms, "l0": r["l0"], "path": r["path"]}


def report(results: dict) -> None:
    print(f"{'rule':10s} {'vectors/s':>10s} {'ms/step':>8s} " + " ".join(f"{k:>10s}" for k in SECTIONS)
          + "   (medians; ms per step)")
    for rule, r in results.items():
        print(f"{rule:10s} {r['vectors_per_s']:10,.0f} {r['step_ms']:8.1f} "
              + " ".join(f"{r[k]:10.1f}" if k in r else f"{'-':>10s}" for k in SECTIONS))
    rate = {rule: r["vectors_per_s"] for rule, r in results.items()}
    if {"default", "before"} <= rate.keys():
        print(f"default / before: {rate['default'] / rate['before']:.3f}")
    if {"default", ALONE} <= rate.keys():
        print(f"end to end (default) / step alone: {rate['default'] / rate[ALONE]:.3f}")


if __name__ == "__main__":
    main()
