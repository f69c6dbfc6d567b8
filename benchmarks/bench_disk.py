"""Disk-first baseline, as the public reproduction (shehper/monosemantic) ran: the frozen LM's MLP
post-activations written to disk as fp16 shards (.npy, N x d_in), then an SAE trained from a shuffled
loader reading them back. The streaming pipeline (bench_train.py) must beat this.

Same token shards and random-weight LM as the streaming benchmarks (bench_stream.make_run), same LM
forward (monosem.producer.LMSource), same step as train() (monosem.trainee: SAE, fused Adam, sparse path
by density, bf16 autocast if set), same batch size, every core. Two phases, timed apart:

- write: stream -> LM -> fp16 -> one .npy per `--shard-vectors` vectors, each fsynced (open_atomic);
- train: per epoch the shards in a random order, `--shuffle-shards` at a time loaded whole (plus the last
  group's leftovers), permuted and cut into batches cast to float32; as many epochs as the steps need.
  Timed: `--steps` steps after `--warmup` (defaults 500 + 100: bench_train.py's last window of 600).
  No reservoir or resampling (bench_train.py runs train() without resampling too).

`disk_first_vectors_per_s` = 1 / (1/write + 1/train): seconds per vector over both phases, the figure
comparable to streaming end to end. On a machine with free memory the read-back comes from the page
cache, which favours this baseline. The temp dir (token shards, LM, activations) is removed at the end.

    python benchmarks/bench_disk.py --out benchmarks/results/bench_disk.json
    python benchmarks/bench_disk.py --set sae.n_features=4096 train_sae.batch_size=4096 train_sae.bf16=true
    python benchmarks/bench_disk.py --steps 2 --warmup 1 --vectors 512 --shard-vectors 256 --set sae.d_in=32 \
        lm.d_mlp=32 lm.d_model=16 lm.n_head=2 data.ctx_len=16 sae.n_features=64 train_sae.batch_size=64  # smoke
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Iterator

import monosem  # noqa: F401  (before torch: it sets torch's allocator option, see monosem.host)
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import make_run  # noqa: E402

from monosem import dist, host, trainee  # noqa: E402
from monosem.config import Config  # noqa: E402
from monosem.configfile import load_config  # noqa: E402
from monosem.errors import MonosemError  # noqa: E402
from monosem.files import open_atomic, write_json_atomic  # noqa: E402
from monosem.producer import LMSource  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def save_shard(path: Path, acts: np.ndarray) -> int:
    """One fp16 [n, d_in] .npy, fsynced; returns its size in bytes."""
    with open_atomic(path) as f:
        np.save(f, acts)
    return path.stat().st_size


def write_phase(cfg: Config, out_dir: Path, n_vectors: int, shard_vectors: int) -> dict:
    """The LM over the token stream, activations cast to fp16 and written as .npy shards."""
    cfg.buffer.dtype = "fp16"  # LMSource casts on the LM's device, as the producer does
    shard = np.empty((shard_vectors, cfg.sae.d_in), dtype=np.float16)   # [shard_vectors, d_in]
    fill = written = contexts = n_bytes = 0
    paths: list[Path] = []
    t0 = time.perf_counter()
    with closing(LMSource(cfg, 0, 1, cfg.lm_dir, cfg.data_dir).contexts(None)) as source:
        for acts, _ids, _state in source:                                  # acts [k, d_in] fp16
            contexts += 1
            a = acts.numpy()[: n_vectors - written]
            while len(a):
                take = min(len(a), shard_vectors - fill)
                shard[fill:fill + take] = a[:take]
                fill, written, a = fill + take, written + take, a[take:]
                if fill == shard_vectors or written == n_vectors:
                    paths.append(out_dir / f"acts-{len(paths):05d}.npy")
                    n_bytes += save_shard(paths[-1], shard[:fill])
                    fill = 0
            if written == n_vectors:
                break
    seconds = time.perf_counter() - t0
    return {"vectors": written, "contexts": contexts, "shards": len(paths), "seconds": seconds,
            "vectors_per_s": written / seconds, "bytes_on_disk": n_bytes, "paths": paths}


def shuffled_batches(paths: list[Path], batch: int, shuffle_shards: int, seed: int,
                     stats: dict) -> Iterator[torch.Tensor]:
    """Endless float32 [batch, d_in] batches: per epoch, shards in a random order, loaded `shuffle_shards`
    at a time into a pool with the last group's leftovers, permuted, cut into batches. Adds the seconds
    spent reading files to stats["read_s"]."""
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    left = None                                                          # [<batch, d_in] fp16
    while True:
        order = rng.permutation(len(paths))
        for i in range(0, len(order), shuffle_shards):
            t0 = time.perf_counter()
            group = [np.load(paths[j]) for j in order[i:i + shuffle_shards]]
            stats["read_s"] += time.perf_counter() - t0
            pool = torch.from_numpy(np.concatenate(([left] if left is not None else []) + group))
            perm = torch.randperm(len(pool), generator=g)
            n_full = len(pool) // batch * batch
            for s in range(0, n_full, batch):
                yield pool[perm[s:s + batch]].float()                    # [batch, d_in]
            left = pool[perm[n_full:]].numpy()


def train_phase(cfg: Config, paths: list[Path], warmup: int, steps: int, shuffle_shards: int) -> dict:
    """Vectors/s of train()'s own step (trainee.forward_backward + optimizer_step: fused Adam, the sparse
    path when the density allows, bf16 autocast if set) on batches from the shuffled loader, over `steps`
    steps after `warmup` steps; the first batch sets the data-dependent init, as in train()."""
    ts, stats = cfg.train_sae, {"read_s": 0.0}
    ts.steps = warmup + steps  # the LR schedule spans this run, as in bench_train's train()
    accelerator = dist.make_accelerator(cfg)
    torch.manual_seed(cfg.run.seed)
    t = trainee.build_trainees(cfg, accelerator, None)[0]
    batches = shuffled_batches(paths, ts.batch_size, shuffle_shards, cfg.run.seed, stats)
    sparse_steps = 0
    for step in range(warmup + steps):
        if step == warmup:
            t0, stats["read_s"] = time.perf_counter(), 0.0
        x = next(batches)                                                # [B, d_in] float32
        if step == 0:
            trainee.init_from_batch([t], x)
        trainee.forward_backward(t, x, step, cfg)
        trainee.optimizer_step(t, step, cfg)
        sparse_steps += step >= warmup and t.sae.last_path == "sparse"
    seconds = time.perf_counter() - t0
    out = {"steps": steps, "warmup_steps": warmup, "vectors": steps * ts.batch_size, "seconds": seconds,
           "vectors_per_s": steps * ts.batch_size / seconds, "read_s": stats["read_s"],
           "read_fraction": stats["read_s"] / seconds, "sparse_step_fraction": sparse_steps / steps,
           "last_l0": t.last["l0"], "last_fvu": t.last["fvu"]}
    del t
    dist.teardown(accelerator)
    return out


def run(cfg: Config, n_vectors: int, warmup: int, steps: int, shard_vectors: int,
        shuffle_shards: int, tmp_dir: str | None) -> dict:
    k = cfg.buffer.tokens_per_context or cfg.data.ctx_len
    per_shard = 256
    n_shards = max(2, math.ceil(n_vectors / k / per_shard))  # enough contexts: no activation twice
    with tempfile.TemporaryDirectory(prefix="monosem-bench-disk-", dir=tmp_dir) as tmp:
        make_run(cfg, Path(tmp), n_shards=n_shards, per_shard=per_shard)
        acts_dir = Path(tmp) / "acts"
        write = write_phase(cfg, acts_dir, n_vectors, shard_vectors)
        train = train_phase(cfg, write.pop("paths"), warmup, steps, shuffle_shards)
    n_bytes = write["bytes_on_disk"]
    return {"write": write, "train": train, "bytes_on_disk": n_bytes,
            "bytes_per_vector": n_bytes / write["vectors"],
            "disk_first_vectors_per_s": 1 / (1 / write["vectors_per_s"] + 1 / train["vectors_per_s"])}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks/results/bench_disk.json"))
    p.add_argument("--config", default=str(REPO / "configs/quickstart.toml"))
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. sae.n_features=4096")
    p.add_argument("--steps", type=int, default=100, help="timed SAE steps (bench_train.py's window)")
    p.add_argument("--warmup", type=int, default=500, help="untimed SAE steps first (the density falls)")
    p.add_argument("--vectors", type=int, default=262144,
                   help="activations written (fp16: 2 x d_in bytes each); 0 = one epoch of all the steps")
    p.add_argument("--shard-vectors", type=int, default=65536, help="vectors per .npy shard")
    p.add_argument("--shuffle-shards", type=int, default=4, help="shards loaded and permuted together")
    p.add_argument("--tmp-dir", default=None, help="where the activations go (default: the system temp)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, [f"--{s}" for s in args.set])
    B = cfg.train_sae.batch_size
    n_vectors = args.vectors or (args.warmup + args.steps) * B
    if n_vectors < B or args.steps < 1 or args.warmup < 0 or args.shard_vectors < 1 or args.shuffle_shards < 1:
        raise MonosemError(f"--vectors {n_vectors} must be >= train_sae.batch_size {B}; --steps >= 1, "
                           f"--warmup >= 0, --shard-vectors and --shuffle-shards >= 1")
    torch.set_num_threads(os.cpu_count() or 1)  # one phase at a time: each gets every core
    host.tune_allocator()  # as train() does: the disk-first step runs with the same allocator
    result = run(cfg, n_vectors, args.warmup, args.steps, args.shard_vectors, args.shuffle_shards,
                 args.tmp_dir)
    result |= {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "bf16": cfg.train_sae.bf16,
               "sparse": cfg.train_sae.sparse, "torch": torch.__version__,
               "device": "cuda" if torch.cuda.is_available() else "cpu",
               "shard_vectors": args.shard_vectors, "shuffle_shards": args.shuffle_shards,
               "shapes": {"d_in": cfg.sae.d_in, "n_features": cfg.sae.n_features, "batch_size": B}}
    write_json_atomic(args.out, result)
    print_table(result)
    print(f"written {args.out}")
    return result


def print_table(r: dict) -> None:
    s, w, t = r["shapes"], r["write"], r["train"]
    print(f"disk-first: SAE d_in={s['d_in']} n_features={s['n_features']} batch={s['batch_size']} "
          f"{'bf16' if r['bf16'] else 'fp32'} threads={r['threads']}")
    rows = [("write (LM + fp16 .npy)", f"{w['vectors_per_s']:>12,.0f} vectors/s  ({w['vectors']:,} vectors)"),
            ("train (shuffled loader)", f"{t['vectors_per_s']:>12,.0f} vectors/s  "
                                        f"(reading {t['read_fraction']:.1%} of it)"),
            ("both phases", f"{r['disk_first_vectors_per_s']:>12,.0f} vectors/s"),
            ("bytes on disk", f"{r['bytes_on_disk']:>12,}  ({r['bytes_per_vector']:,.1f} per vector)")]
    for k, v in rows:
        print(f"{k:<24}{v}")


if __name__ == "__main__":
    try:
        main()
    except MonosemError as e:
        sys.exit(f"bench_disk: {e}")
