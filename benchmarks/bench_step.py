"""SAE step throughput: the dense step, the sparse step at planted sparsity, and the GEMM ceiling, measured
in one run at the same shapes and thread count (default: every core), fp32 and bf16 autocast.

A step is what the trainer does: forward (under bf16 autocast for bf16), backward, Adam, renormalise.
Planted sparsity: each feature's encoder bias is set so that a fraction L0/n_features of the batch's
entries are active (Adam's lr is tiny, so it stays there). The dense step runs with `sparse=off` at the
first planted density; the sparse one with `sparse=on`. GEMM ceiling = B / (5 x the time of one
[B, d_in] x [d_in, n_features] GEMM) vectors/s: the dense step's 10·B·d_in·n_features FLOP at the
measured GEMM rate, in the same dtype (bf16 GEMM: bf16 inputs). The encoder GEMM alone, B / (the time of
one such GEMM) = 5 x the ceiling, bounds every step here: the sparse step keeps the dense encoder forward,
so nothing at this shape and dtype trains faster on this machine. The process tunes its allocator as the
trainer does (monosem.host: huge pages, freed memory kept), for every path and the ceiling alike.

    python benchmarks/bench_step.py --out benchmarks/results/bench_step.json
    python benchmarks/bench_step.py --n-features 4096 --dtypes fp32 --steps 3 --sae runs/quickstart/sae
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import monosem  # noqa: F401  (before torch: it sets torch's allocator option, see monosem.host)
import torch

from monosem import host
from monosem.config import SAEConfig
from monosem.files import write_json_atomic
from monosem.sae import SAE

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    """Wait for queued GPU work (timings on a GPU end here); a no-op on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_seconds(B: int, d_in: int, n_features: int, dtype: torch.dtype, reps: int, device: str = "cpu") -> float:
    """Best time of one [B, d_in] x [d_in, n_features] GEMM (the encoder's shape): a ceiling is the best the
    machine does, and on a shared VM the median of a few reps wanders with the neighbours."""
    a = torch.randn(B, d_in, dtype=dtype, device=device)
    w = torch.randn(n_features, d_in, dtype=dtype, device=device)
    a @ w.t()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ w.t()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.no_grad()
def plant_density(sae: SAE, x: torch.Tensor, density: float) -> None:
    """Encoder bias per feature at the (1 - density) quantile of its pre-activation over x."""
    xs = x * sae.scale
    pre = (xs - sae.b_dec if sae.pre_bias else xs) @ sae.W_enc.T  # [B, n_features]
    k = max(1, min(len(x), round((1 - density) * len(x))))
    sae.b_enc.copy_(-pre.kthvalue(k, dim=0).values)


def step_rate(sae: SAE, x: torch.Tensor, dtype: str, steps: int, adam: str = "fused") -> dict:
    """Vectors/s (median step) of forward + backward + Adam + renormalise, and the path and density seen."""
    # lr tiny: the work is the same and the density stays planted
    opt = torch.optim.Adam(sae.parameters(), lr=1e-7, **{adam: True})
    dev = x.device.type
    ctx = (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if dtype == "bf16" else nullcontext
    times, densities, paths = [], [], set()
    for i in range(steps + 1):  # one warm-up step
        sync(dev)
        t0 = time.perf_counter()
        with ctx():
            out = sae(x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        sync(dev)
        if i:
            times.append(time.perf_counter() - t0)
            paths.add(sae.last_path)
            densities.append(float((out.f != 0).float().mean()))
    return {"vectors_per_s": len(x) / statistics.median(times), "step_s": statistics.median(times),
            "path": "/".join(sorted(paths)), "density": statistics.mean(densities),
            "l0": statistics.mean(densities) * sae.cfg.n_features}


def bench_shape(args, n_features: int, dtype: str) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.d_in, generator=g).relu().to(args.device)  # [B, d_in] MLP-like, >= 0
    cfg = SAEConfig(recipe=args.recipe, d_in=args.d_in, n_features=n_features,
                    k=max(1, round(args.l0[0] * n_features)))
    t_gemm = gemm_seconds(args.batch, args.d_in, n_features, DTYPES[dtype], args.gemm_reps, args.device)
    row = {"n_features": n_features, "dtype": dtype, "recipe": args.recipe,
           "gemm_gflops": 2 * args.batch * args.d_in * n_features / t_gemm / 1e9,
           "ceiling_vectors_per_s": args.batch / (5 * t_gemm),
           "encoder_gemm_vectors_per_s": args.batch / t_gemm, "sparse": []}  # bounds any step
    for i, frac in enumerate(args.l0):
        sae = SAE(cfg, generator=torch.Generator().manual_seed(1), sparse="on").to(args.device)
        sae.init_from_data(x)
        plant_density(sae, x, frac)
        if i == 0:
            sae.sparse_mode = "off"
            row["dense"] = step_rate(sae, x, dtype, args.steps, args.adam)
            row["dense_over_ceiling"] = row["dense"]["vectors_per_s"] / row["ceiling_vectors_per_s"]
            sae.sparse_mode = "on"
        r = step_rate(sae, x, dtype, args.steps, args.adam) | {"target_l0_fraction": frac}
        r["over_dense"] = r["vectors_per_s"] / row["dense"]["vectors_per_s"]
        row["sparse"].append(r)
        print(f"  n_features={n_features} {dtype} L0={frac:.0%}: sparse {r['vectors_per_s']:,.0f} v/s "
              f"({r['over_dense']:.2f}x dense {row['dense']['vectors_per_s']:,.0f})", flush=True)
    return row


def bench_checkpoint(args, path: str, dtypes: list[str]) -> dict:
    """A trained SAE (monosem.checkpoint.load_sae) on the same synthetic inputs: its own density, auto path
    versus the dense step."""
    from monosem.checkpoint import load_sae

    sae, meta = load_sae(path, device=args.device)
    sae = sae.float().train()
    x = torch.randn(args.batch, sae.cfg.d_in, generator=torch.Generator().manual_seed(0)).relu().to(args.device)
    out = {"path": str(path), "n_features": sae.cfg.n_features, "d_in": sae.cfg.d_in,
           "recipe": sae.recipe, "step": meta.get("step") if isinstance(meta, dict) else None}
    for dtype in dtypes:
        for mode in ("off", "auto"):
            sae.sparse_mode = mode
            out[f"{dtype}_{mode}"] = step_rate(sae, x, dtype, args.steps, args.adam)
        out[f"{dtype}_auto_over_dense"] = (out[f"{dtype}_auto"]["vectors_per_s"]
                                           / out[f"{dtype}_off"]["vectors_per_s"])
    return out


def print_table(result: dict) -> None:
    fr = result["l0_fractions"]
    head = f"{'n_features':>10} {'dtype':>5} {'enc GEMM':>9} {'ceiling':>9} {'dense':>9} {'%ceil':>6}"
    print(head + "".join(f" {'L0 ' + format(f, '.0%'):>9} {'x':>5}" for f in fr))
    for r in result["results"]:
        line = (f"{r['n_features']:>10} {r['dtype']:>5} {r['encoder_gemm_vectors_per_s']:>9,.0f} "
                f"{r['ceiling_vectors_per_s']:>9,.0f} "
                f"{r['dense']['vectors_per_s']:>9,.0f} {r['dense_over_ceiling']:>6.0%}")
        print(line + "".join(f" {s['vectors_per_s']:>9,.0f} {s['over_dense']:>5.2f}" for s in r["sparse"]))
    print(f"vectors/s; B={result['batch_size']} d_in={result['d_in']} threads={result['threads']}; "
          "x = sparse over dense, same run; enc GEMM = the encoder GEMM alone (bounds every step)")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks/results/bench_step.json"))
    p.add_argument("--n-features", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--l0", type=float, nargs="+", default=[0.01, 0.03, 0.10],
                   help="planted L0 as fractions of n_features")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--recipe", default="anthropic-2023")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after 1 warm-up)")
    p.add_argument("--gemm-reps", type=int, default=5)
    p.add_argument("--adam", default="fused", choices=["fused", "foreach"],
                   help="torch.optim.Adam implementation (fused: one kernel per parameter)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (timings end with a synchronize)")
    p.add_argument("--sae", default="", help="also time a trained SAE (checkpoint path for load_sae)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = host.tune_allocator()  # as the trainer does: both paths reuse freed memory
    result = {"device": args.device, "batch_size": args.batch, "d_in": args.d_in,
              "threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "torch": torch.__version__, "allocator": {"huge_pages": host.huge_pages_requested(),
                                                         "freed_memory_kept": kept},
              "steps": args.steps, "adam": args.adam, "l0_fractions": args.l0,
              "ceiling_definition": "B / (5 * t_gemm): 10*B*d_in*n_features FLOP at the GEMM rate of "
                                    "[B, d_in] x [d_in, n_features] in the step's dtype",
              "results": [bench_shape(args, m, dt) for m in args.n_features for dt in args.dtypes],
              "checkpoint": bench_checkpoint(args, args.sae, args.dtypes) if args.sae else None}
    write_json_atomic(args.out, result)
    print_table(result)
    print(f"written {args.out}")
    return result


if __name__ == "__main__":
    main()
