"""Streaming throughput: producer (LM forward to the MLP hook), ring + pool alone, end to end, a plain copy
of the same bytes, and one SAE step versus one batch fetch. Random tokens and a random-weight LM of the
quickstart shape (d_model 128, d_mlp 512, ctx 128) in a temp dir; nothing else is needed.

    python benchmarks/bench_stream.py --out benchmarks/results/bench_stream.json [--seconds 5]
    python benchmarks/bench_stream.py --config configs/quickstart.toml --set buffer.dtype=bf16
    python benchmarks/bench_stream.py --seconds 0.5 --batch 64 --n-features 128 --set sae.d_in=32 \
        lm.d_mlp=32 lm.d_model=16 lm.n_head=2 data.ctx_len=16 buffer.slot_vectors=64 buffer.pool_size=512
                                        # tiny shapes: a smoke run (tests/test_benchmarks.py)

Targets: buffer cost per vector <= 10% of the producer's; one batch fetch <= 5% of one SAE step.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import monosem  # noqa: F401  (before torch: it sets torch's allocator option, see monosem.host)
import numpy as np
import torch

from monosem.buffer import ActivationBuffer
from monosem.config import Config
from monosem.configfile import load_config
from monosem.files import write_json_atomic
from monosem.lm import LM, save_lm
from monosem.producer import LMSource, SyntheticSource
from monosem.segment import DTYPES
from monosem.shards import write_shards

REPO = Path(__file__).resolve().parents[1]


def make_run(cfg: Config, root: Path, n_shards: int = 8, per_shard: int = 64) -> None:
    """Random-token shards (+ manifest) and a random-weight LM saved with save_lm under root."""
    cfg.run.root, cfg.run.name, cfg.data.dir = str(root), "bench", ""
    T, n = cfg.data.ctx_len, n_shards * per_shard
    tokens = np.random.default_rng(0).integers(0, 50257, (n + 2, T)).astype(np.uint16)
    splits = {"train": write_shards(tokens[:n], np.arange(n), cfg.data_dir, "train", per_shard),
              "val": write_shards(tokens[n:], np.arange(n, n + 2), cfg.data_dir, "val", 2)}
    write_json_atomic(cfg.data_dir / "manifest.json", {
        "format": "monosem-shards/1", "tokenizer": "r50k_base", "n_vocab": 50257, "eot": 50256,
        "ctx_len": T, "source": "random", "data_config": {}, "versions": {},
        "splits": {k: {"contexts": sum(e["contexts"] for e in v), "tokens": sum(e["tokens"] for e in v),
                       "shards": v} for k, v in splits.items()}})
    torch.manual_seed(0)
    save_lm(LM(cfg.lm, T), cfg, cfg.lm_dir)


def windows(step, seconds: float, n: int = 5) -> dict:
    """Rate of `step()` (it returns a vector count) in n windows: best and median (the machine is shared)."""
    rates = []
    for _ in range(n):
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / n:
            count += step()
        rates.append(count / (time.perf_counter() - t0))
    return {"best": max(rates), "median": statistics.median(rates)}


def bench_producer(cfg: Config, seconds: float) -> dict:
    """Vectors/s of the producer's work alone (stream -> LM -> cast), in this process, its thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.buffer.producer_threads)
    contexts = LMSource(cfg, 0, 1, cfg.lm_dir, cfg.data_dir).contexts(None)
    for _ in range(cfg.buffer.producer_batch):  # warm-up: LM load, first forward
        next(contexts)
    rate = windows(lambda: len(next(contexts)[1]), seconds)
    contexts.close()
    torch.set_num_threads(threads)
    return rate


def bench_buffer(cfg: Config, source, batch: int, seconds: float, sae_step=None,
                 fetches: int = 8) -> dict:
    """Delivered vectors/s back to back; with sae_step, also the time of one next_batch taken right after
    an SAE step, as in training (the producer refills the ring during the step; caches are cold)."""
    with ActivationBuffer(cfg, rank=0, world_size=1, lm_path=cfg.lm_dir, data_dir=cfg.data_dir,
                          source=source) as buf:
        buf.next_batch(batch)  # warm-up: process start, pool fill
        rate = windows(lambda: len(buf.next_batch(batch)[1]), seconds)
        fetch, ring, moved0, delivered0 = [], [], buf.pool.moved, buf.counters["vectors_delivered"]
        for _ in range(fetches if sae_step else 0):
            sae_step()
            ring.append(buf.stats()["ring_fill"])
            t = time.perf_counter()
            buf.next_batch(batch)
            fetch.append(time.perf_counter() - t)
        stats = buf.stats()
        moved = (buf.pool.moved - moved0) / max(1, buf.counters["vectors_delivered"] - delivered0)
    out = {"rows": buf.R, "vectors_per_s": rate,
           "write_s_per_vector": stats["producer_write_s"] / stats["vectors_produced"],
           "consumer_wait_s": stats["consumer_wait_s"], "producer_wait_s": stats["producer_wait_s"],
           "shuffle_quality": stats.get("shuffle_quality"), "moved_per_vector": moved}
    if fetch:
        out |= {"fetch_after_step_s": {"best": min(fetch), "median": statistics.median(fetch)},
                "ring_fill_before_fetch": statistics.mean(ring)}
    return out


def bench_copy(cfg: Config, batch: int, rows: int, repeats: int = 50) -> dict:
    """Vectors/s of a plain torch copy_ of batch-sized blocks out of a tensor the size of the buffer's
    segment (the bytes the buffer moves per vector; successive blocks, so the source is not
    cache-resident)."""
    src = torch.ones(rows, cfg.sae.d_in, dtype=DTYPES[cfg.buffer.dtype])
    blocks, times = src.split(batch)[:-1], []
    dst = torch.empty_like(blocks[0])
    for i in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(blocks[i % len(blocks)])
        times.append(time.perf_counter() - t0)
    return {"best": batch / min(times), "median": batch / statistics.median(times)}


def bench_floor(cfg: Config, batch: int, rows: int, sae_step, repeats: int = 5) -> dict:
    """The least any uniform pool can cost per vector, without bookkeeping: one random gather of `batch`
    rows (+ the cast to fp32) from a `rows`-row tensor right after an SAE step, plus one contiguous copy
    of `batch` vectors into cold rows of it (the producer's write)."""
    b, g = cfg.buffer, torch.Generator().manual_seed(0)
    store = torch.ones(rows, cfg.sae.d_in, dtype=DTYPES[b.dtype])
    chunk, times = torch.ones(batch, cfg.sae.d_in), []
    for i in range(repeats):
        sae_step()
        idx = torch.randint(rows, (batch,), generator=g)
        t0 = time.perf_counter()
        store.index_select(0, idx).float()
        start = (i * batch) % (rows - batch)
        store[start:start + batch].copy_(chunk)
        times.append((time.perf_counter() - t0) / batch)
    return {"best": min(times), "median": statistics.median(times)}


def make_sae_step(d_in: int, n_features: int, batch: int):
    """One plain SAE step (ReLU encoder, MSE + L1, backward, Adam), written inline: a callable."""
    g = torch.Generator().manual_seed(0)
    W_enc = (torch.randn(n_features, d_in, generator=g) / d_in ** 0.5).requires_grad_()
    b_enc = torch.zeros(n_features, requires_grad=True)
    W_dec = (torch.randn(d_in, n_features, generator=g) / n_features ** 0.5).requires_grad_()
    b_dec = torch.zeros(d_in, requires_grad=True)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=1e-4)
    x = torch.randn(batch, d_in, generator=g)                            # [B, d_in]

    def step() -> None:
        f = torch.relu((x - b_dec) @ W_enc.T + b_enc)                      # [B, n_features]
        x_hat = f @ W_dec.T + b_dec                                        # [B, d_in]
        loss = (x_hat - x).pow(2).mean() + 1e-3 * f.sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def time_calls(f, n: int = 5) -> dict:
    """Seconds per call of f (after one warm-up call): best and median of n."""
    f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return {"best": min(times), "median": statistics.median(times)}


def run(cfg: Config, seconds: float, batch: int, n_features: int = 4096) -> dict:
    sae_step = make_sae_step(cfg.sae.d_in, n_features, batch)
    with tempfile.TemporaryDirectory(prefix="monosem-bench-") as tmp:
        make_run(cfg, Path(tmp))
        producer = bench_producer(cfg, seconds)
        synthetic = SyntheticSource(cfg.sae.d_in, cfg.data.ctx_len, cfg.buffer.tokens_per_context,
                                    dtype=cfg.buffer.dtype)
        ring_pool = bench_buffer(cfg, synthetic, batch, seconds)
        end_to_end = bench_buffer(cfg, None, batch, seconds, sae_step)
    copy = bench_copy(cfg, batch, end_to_end["rows"])
    step_s = time_calls(sae_step)
    floor = bench_floor(cfg, batch, end_to_end["rows"], sae_step)
    out = {"producer_vectors_per_s": producer, "ring_pool_vectors_per_s": ring_pool["vectors_per_s"],
           "end_to_end_vectors_per_s": end_to_end["vectors_per_s"], "copy_vectors_per_s": copy,
           "sae_step_s": step_s, "fetch_after_step_s": end_to_end["fetch_after_step_s"],
           "write_s_per_vector": end_to_end["write_s_per_vector"],
           "moved_per_vector": end_to_end["moved_per_vector"], "floor_s_per_vector": floor,
           "ring_pool": ring_pool, "end_to_end": end_to_end}
    for k in ("best", "median"):
        # buffer cost per vector: the consumer's batch fetch (after a step) + the producer's pool writes
        buffer_cost = end_to_end["fetch_after_step_s"][k] / batch + end_to_end["write_s_per_vector"]
        out[k] = {"buffer_s_per_vector": buffer_cost, "producer_s_per_vector": 1 / producer[k],
                  "buffer_over_producer_cost": buffer_cost * producer[k],
                  "floor_over_producer_cost": floor[k] * producer[k],
                  "producer_over_ring_pool_rate": producer[k] / ring_pool["vectors_per_s"][k],
                  "fetch_over_sae_step": end_to_end["fetch_after_step_s"][k] / step_s[k],
                  "end_to_end_over_producer": end_to_end["vectors_per_s"][k] / producer[k]}
    return out


def table(r: dict) -> str:
    both = lambda key, f: f(r[key]["best"]) + "  (median " + f(r[key]["median"]) + ")"  # noqa: E731
    ratio = lambda key: f"{r['best'][key]:.1%}  (median {r['median'][key]:.1%})"  # noqa: E731
    rate, ms = (lambda v: f"{v:,.0f} vec/s"), (lambda v: f"{v * 1e3:,.2f} ms")
    rows = [("producer only (LM to the MLP hook)", both("producer_vectors_per_s", rate)),
            ("ring + pool, synthetic producer", both("ring_pool_vectors_per_s", rate)),
            ("end to end (real producer)", both("end_to_end_vectors_per_s", rate)),
            ("plain copy_ of the same bytes (ceiling)", both("copy_vectors_per_s", rate)),
            (f"SAE step d={r['setup']['d_in']} F={r['setup']['n_features']} B={r['setup']['batch']}",
             both("sae_step_s", ms)),
            ("batch fetch right after an SAE step", both("fetch_after_step_s", ms)),
            ("producer pool writes per vector", f"{r['write_s_per_vector'] * 1e9:,.0f} ns"),
            ("vectors moved to free a block, per vector", f"{r['moved_per_vector']:.3f}"),
            ("buffer cost / producer cost per vector",
             ratio("buffer_over_producer_cost") + "  target <= 10%"),
            ("floor (gather + contiguous write) / producer", ratio("floor_over_producer_cost")),
            ("batch fetch / SAE step", ratio("fetch_over_sae_step") + "  target <= 5%"),
            ("producer-only rate / ring+pool rate", ratio("producer_over_ring_pool_rate")),
            ("end to end / producer only", ratio("end_to_end_over_producer"))]
    width = max(len(k) for k, _ in rows)
    return "best of windows (median)\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks/results/bench_stream.json"))
    p.add_argument("--config", default=str(REPO / "configs/quickstart.toml"))
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. buffer.dtype=bf16")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per throughput measurement")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--n-features", type=int, default=4096, help="SAE width of the step measured")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the trainer side (0 = cores - buffer.producer_threads)")
    args = p.parse_args()
    cfg = load_config(args.config, ["--sae.d_in=512", "--lm.d_mlp=512", "--data.ctx_len=128",
                                    f"--train_sae.batch_size={args.batch}", *[f"--{s}" for s in args.set]])
    # the producer process has its own cores: a trainer using all of them would stall on contention
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - cfg.buffer.producer_threads))
    result = run(cfg, args.seconds, args.batch, args.n_features)
    result["setup"] = {"d_in": cfg.sae.d_in, "n_features": args.n_features, "buffer": vars(cfg.buffer), "lm": vars(cfg.lm), "batch": args.batch,
                       "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                       "cpu": platform.processor() or platform.machine(),
                       "device": "cuda" if torch.cuda.is_available() else "cpu"}
    write_json_atomic(args.out, result)
    print(table(result))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
