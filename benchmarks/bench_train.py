"""SAE training throughput: end-to-end `train()` (producer + buffer + SAE step + metrics) against the SAE
step alone, at the same shapes, the same SAE state and the same thread count (every core), in one run.

    python benchmarks/bench_train.py --out benchmarks/results/bench_train.json
    python benchmarks/bench_train.py --set sae.n_features=4096 train_sae.batch_size=4096 --steps 800 --window 100
    python benchmarks/bench_train.py --run runs/quickstart       # its shards and LM instead of random ones

End to end: train() for --steps steps, logging every --window steps; each window's vectors/s comes from
TensorBoard (perf/vectors_per_s), with its L0 and the share of sparse steps. A fresh SAE is dense for the
first few hundred steps: the figure that matters is the last window, after the density fell.
Step only: the very step train() runs (trainee.forward_backward + optimizer_step: fused Adam, the sparse
path when the density allows, bf16 autocast if set) on real activation batches held in memory, for the
fresh SAE and for the SAE train() ended with, on every core. Ratios compare the last window with the
trained SAE's step (same state), and the first window with the fresh SAE's step.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import monosem  # noqa: F401  (before torch: it sets torch's allocator option, see monosem.host)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import make_run  # noqa: E402

from monosem import dist, host, trainee  # noqa: E402
from monosem.buffer import ActivationBuffer  # noqa: E402
from monosem.checkpoint import load_checkpoint  # noqa: E402
from monosem.configfile import load_config  # noqa: E402
from monosem.files import write_json_atomic  # noqa: E402
from monosem.metrics import read_scalars  # noqa: E402
from monosem.train_sae import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def batches_in_memory(cfg, n: int) -> list[torch.Tensor]:
    """n real activation batches [B, d_in] from the run's producer (the step-only input)."""
    with ActivationBuffer(cfg, rank=0, world_size=1, lm_path=cfg.lm_dir, data_dir=cfg.data_dir) as buf:
        return [buf.next_batch(cfg.train_sae.batch_size)[0] for _ in range(n)]


def step_only(cfg, xs: list[torch.Tensor], steps: int, ckpt=None) -> dict:
    """Vectors/s of the trainer's own step on batches in memory (2 warm-up steps), every core."""
    torch.set_num_threads(os.cpu_count() or 1)
    host.tune_allocator()  # as train() does, for the step-only runs before it
    accelerator = dist.make_accelerator(cfg)
    torch.manual_seed(cfg.run.seed)
    t = trainee.build_trainees(cfg, accelerator, ckpt)[0]
    step0 = ckpt.step if ckpt is not None else 1  # past the data-dependent init
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        trainee.forward_backward(t, xs[i % len(xs)], step0 + i, cfg)
        trainee.optimizer_step(t, step0 + i, cfg)
    rate = steps * xs[0].shape[0] / (time.perf_counter() - t0)
    out = {"vectors_per_s": rate, "l0": t.last["l0"], "path": t.sae.last_path, "threads": torch.get_num_threads()}
    del t
    dist.teardown(accelerator)
    return out


def end_to_end(cfg, steps: int, window: int) -> list[dict]:
    """train() for `steps` steps; per log window: step, vectors/s, L0, share of sparse steps."""
    cfg.train_sae.steps, cfg.train_sae.log_every = steps, window
    cfg.train_sae.eval_every, cfg.train_sae.ckpt_every = 0, 10 ** 9
    cfg.train_sae.resample_steps = []
    train(cfg)
    s = read_scalars(cfg.sae_dir / "tb" / "sae")
    return [{"step": step, "vectors_per_s": v, "l0": l0, "sparse_share": sp}
            for (step, v), (_, l0), (_, sp) in zip(s["perf/vectors_per_s"], s["train/l0"],
                                                   s["train/sparse_step"])]


def measure(cfg, args) -> dict:
    xs = batches_in_memory(cfg, 4)
    fresh = step_only(cfg, xs, args.step_steps)
    wins = end_to_end(cfg, args.steps, args.window)
    trained = step_only(cfg, xs, args.step_steps, ckpt=load_checkpoint(cfg.sae_dir))
    last, first = wins[-1], wins[0]
    return {"windows": wins, "end_to_end_last_window": last["vectors_per_s"],
            "end_to_end_first_window": first["vectors_per_s"],
            "end_to_end_mean": args.steps * cfg.train_sae.batch_size / sum(
                args.window * cfg.train_sae.batch_size / w["vectors_per_s"] for w in wins),
            "step_only_fresh": fresh, "step_only_trained": trained,
            "end_to_end_over_step_only": last["vectors_per_s"] / trained["vectors_per_s"],
            "first_window_over_fresh_step": first["vectors_per_s"] / fresh["vectors_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks/results/bench_train.json"))
    p.add_argument("--config", default=str(REPO / "configs/quickstart.toml"))
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. sae.n_features=4096")
    p.add_argument("--run", default="", help="use this run's shards and LM (e.g. runs/quickstart)")
    p.add_argument("--steps", type=int, default=600, help="train() steps")
    p.add_argument("--window", type=int, default=100, help="steps per measured window")
    p.add_argument("--step-steps", type=int, default=10, help="timed steps of the step-only runs")
    args = p.parse_args()
    cfg = load_config(args.config, [f"--{s}" for s in args.set])
    tmp = Path(tempfile.mkdtemp(prefix="bench_train."))
    try:
        if args.run:
            src = Path(args.run)
            cfg.run.root, cfg.run.name, cfg.data.dir = str(tmp), "bench", str(src / "data")
            (tmp / "bench").mkdir()
            (tmp / "bench" / "lm").symlink_to((src / "lm").resolve())
        else:
            make_run(cfg, tmp, n_shards=16, per_shard=256)
        result = measure(cfg, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result |= {"bf16": cfg.train_sae.bf16, "cpus": os.cpu_count(), "run": args.run or "random tokens, random LM",
               "device": "cuda" if torch.cuda.is_available() else "cpu",
               "shapes": {"d_in": cfg.sae.d_in, "n_features": cfg.sae.n_features,
                          "batch_size": cfg.train_sae.batch_size}, "steps": args.steps, "window": args.window}
    write_json_atomic(args.out, result)
    report(result)
    print(f"written {args.out}")


def report(r: dict) -> None:
    sh = r["shapes"]
    print(f"SAE d_in={sh['d_in']} n_features={sh['n_features']} batch={sh['batch_size']} "
          f"{'bf16' if r['bf16'] else 'fp32'}, {r['cpus']} cores")
    print(f"{'window (end of step)':<22}{'vectors/s':>12}{'L0':>10}{'sparse':>8}")
    for w in r["windows"]:
        print(f"{w['step']:<22}{w['vectors_per_s']:>12,.0f}{w['l0']:>10.1f}{w['sparse_share']:>8.2f}")
    for name in ("fresh", "trained"):
        s = r[f"step_only_{name}"]
        print(f"{'step only, ' + name + ' SAE':<22}{s['vectors_per_s']:>12,.0f}{s['l0']:>10.1f}{s['path']:>8}")
    print(f"end to end (last window) / step only (trained SAE): {r['end_to_end_over_step_only']:.2f}")
    print(f"end to end (first window) / step only (fresh SAE):  {r['first_window_over_fresh_step']:.2f}")


if __name__ == "__main__":
    main()
