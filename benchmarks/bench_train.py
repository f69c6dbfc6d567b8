"""SAE training throughput: end-to-end `train()` (producer + buffer + SAE step + metrics) versus the SAE
step alone at the same shapes, measured in one run. Random tokens and a random-weight LM of the
quickstart shape in a temp dir (see bench_stream.make_run).

    python benchmarks/bench_train.py --out benchmarks/results/bench_train.json [--steps 30]
    python benchmarks/bench_train.py --set sae.n_features=4096 train_sae.batch_size=4096
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import make_run  # noqa: E402

from monosem.configfile import load_config  # noqa: E402
from monosem.files import write_json_atomic  # noqa: E402
from monosem.sae import SAE  # noqa: E402
from monosem.train_sae import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def sae_step_only(cfg, steps: int) -> float:
    """Vectors/s of the bare SAE step (forward, backward, projection, Adam, renormalise) on data in memory."""
    sae = SAE(cfg.sae)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.train_sae.lr)
    x = torch.randn(cfg.train_sae.batch_size, cfg.sae.d_in).relu()
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            t0 = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.train_sae.bf16):
            out = sae(x)
        out.loss.backward()
        sae.project_decoder_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
    return steps * len(x) / (time.perf_counter() - t0)


def end_to_end(cfg, steps: int) -> float:
    """Vectors/s of train() over its last `steps` steps (after start-up and the first log window)."""
    cfg.train_sae.steps, cfg.train_sae.log_every = 2 * steps, steps
    cfg.train_sae.eval_every, cfg.train_sae.ckpt_every = 0, 10 ** 9
    metrics = train(cfg)
    return metrics["sae/perf/vectors_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks/results/bench_train.json"))
    p.add_argument("--config", default=str(REPO / "configs/quickstart.toml"))
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. sae.n_features=4096")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    cfg = load_config(args.config, [f"--{s}" for s in args.set])
    with tempfile.TemporaryDirectory() as tmp:
        make_run(cfg, Path(tmp), n_shards=16, per_shard=256)
        e2e = end_to_end(cfg, args.steps)
        torch.set_num_threads(os.cpu_count())  # train() set the trainer's share; the step alone gets all
        alone = sae_step_only(cfg, args.steps)
    result = {"end_to_end_vectors_per_s": e2e, "sae_step_only_vectors_per_s": alone,
              "end_to_end_over_step_only": e2e / alone, "torch_threads": torch.get_num_threads(),
              "bf16": cfg.train_sae.bf16,
              "cpus": os.cpu_count(), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "shapes": {"d_in": cfg.sae.d_in, "n_features": cfg.sae.n_features,
                         "batch_size": cfg.train_sae.batch_size}, "steps": args.steps}
    write_json_atomic(args.out, result)
    print(f"SAE d_in={cfg.sae.d_in} n_features={cfg.sae.n_features} batch={cfg.train_sae.batch_size}")
    print(f"{'end to end (train())':<24}{e2e:>12,.0f} vectors/s")
    print(f"{'SAE step only':<24}{alone:>12,.0f} vectors/s")
    print(f"{'ratio':<24}{e2e / alone:>12.2f}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
