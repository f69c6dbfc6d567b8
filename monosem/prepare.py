"""`monosem prepare`: corpus -> GPT-2 ids -> fixed-length contexts -> token shards + manifest.json.

Documents (monosem/corpus.py) are tokenized in batches (monosem/tokenizer.py), each followed by
eot, packed into contexts of data.ctx_len, split train/val by context id (val_mask), permuted in
windows of data.shuffle_window and written as shards (monosem/shards.py). Binary files in a text
source are skipped with one warning line each and counted (manifest key `skipped_files`).

    monosem prepare configs/tiny.toml       # = monosem.prepare.prepare(load_config(...))
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from fractions import Fraction
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from monosem.config import Config
from monosem.configfile import save_config
from monosem.errors import MonosemError
from monosem.files import write_json_atomic
from monosem.shards import SPLITS, make_manifest, read_manifest, verify_shards, write_shard

IGNORED_KEYS = ("num_threads", "dir")  # [data] keys that do not change the shards


def prepare(cfg: Config) -> dict:
    """Tokenize `cfg.data.source` into shards under `cfg.data_dir`; return the manifest.
    A folder already made with the same [data] config is verified and kept; one made with
    another config is refused (never overwritten)."""
    data_dir, data_config = cfg.data_dir, dataclasses.asdict(cfg.data)
    if (data_dir / "manifest.json").exists():
        manifest = read_manifest(data_dir)
        _check_same_config(manifest, data_config, data_dir)
        verify_shards(data_dir, manifest)
        print(f"prepare: {data_dir} already holds these shards ({_counts(manifest)}, every "
              f"shard's sha256 verified); skipping")
        return manifest
    t0 = time.perf_counter()
    splits, stats = _tokenize_and_write(cfg, data_dir)
    manifest = make_manifest(cfg.data.ctx_len, splits,
                             contexts_per_shard=cfg.data.contexts_per_shard,
                             source=cfg.data.source, documents=stats["documents"],
                             corpus_tokens=stats["tokens"], skipped_files=stats["skipped_files"],
                             data_config=data_config, versions=_versions())
    _remove_stale(data_dir, manifest)
    save_config(cfg, data_dir)
    write_json_atomic(data_dir / "manifest.json", manifest)  # last: it marks the folder complete
    dt = time.perf_counter() - t0
    n_skipped = stats["skipped_files"]
    skipped = f" ({n_skipped:,} binary files skipped)" if n_skipped else ""
    print(f"prepare: {stats['documents']:,} documents, {stats['tokens']:,} tokens read{skipped} "
          f"-> {_counts(manifest)} in {data_dir} ({stats['tokens'] / dt:,.0f} tokens/s, "
          f"{dt:.1f} s)")
    return manifest


def _counts(manifest: dict) -> str:
    n, sp = sum(s["contexts"] for s in manifest["splits"].values()), manifest["splits"]
    return (f"{n * manifest['ctx_len']:,} tokens in {n:,} contexts of {manifest['ctx_len']}, "
            + ", ".join(f"{k} {s['contexts']:,}/{len(s['shards'])} shards" for k, s in sp.items()))


def _check_same_config(manifest: dict, data_config: dict, data_dir: Path) -> None:
    old = manifest["data_config"]
    keys = sorted(k for k in set(old) | set(data_config)
                  if k not in IGNORED_KEYS and old.get(k) != data_config.get(k))
    if keys:
        diff = "; ".join(f"data.{k}: {old.get(k)!r} there, {data_config.get(k)!r} now"
                         for k in keys)
        raise MonosemError(f"{data_dir} holds shards made with another [data] config ({diff}); "
                           f"not overwriting it: use another data.dir or run.name, or delete it")


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("monosem", "numpy", "tiktoken", "webdataset", "datasets"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def _remove_stale(data_dir: Path, manifest: dict) -> None:
    """Drop shards and temp files left by an interrupted earlier prepare (no manifest then)."""
    keep = {e["name"] for s in manifest["splits"].values() for e in s["shards"]}
    for split in SPLITS:
        for path in [*data_dir.glob(f"{split}-??????.tar"), *data_dir.glob(f".{split}-*.tmp")]:
            if path.name not in keep:
                path.unlink()


# ---- the streaming pipeline: documents -> token chunks -> contexts -> shards --------------------

def _token_chunks(cfg: Config, stats: dict) -> Iterator[np.ndarray]:
    """uint16 token ids of document batches (eot after each document), with a progress bar;
    binary files are skipped with a warning line above the bar and counted in `stats`."""
    from tqdm import tqdm
    from monosem.corpus import iter_documents
    from monosem.tokenizer import encode_documents

    def skipped(path: Path, why: str) -> None:
        stats["skipped_files"] += 1
        tqdm.write(f"warning: skipping {path}: {why}", file=sys.stderr)

    docs = iter_documents(cfg.data, on_skip=skipped)
    with tqdm(desc="prepare", unit=" docs", mininterval=0.5) as bar:
        for n_docs, chunk in encode_documents(docs, cfg.data.num_threads):
            stats["documents"] += n_docs
            stats["tokens"] += len(chunk)
            bar.update(n_docs)
            bar.set_postfix(tokens=f"{stats['tokens']:,}", refresh=False)
            yield chunk


def _contexts(chunks: Iterable[np.ndarray], ctx_len: int,
              max_contexts: int) -> Iterator[np.ndarray]:
    """Pack the token stream into [n, ctx_len] blocks; the final partial context is dropped."""
    carry, done = np.empty(0, np.uint16), 0
    for chunk in chunks:
        buf = np.concatenate([carry, chunk])
        n = len(buf) // ctx_len
        if max_contexts:
            n = min(n, max_contexts - done)
        yield buf[: n * ctx_len].reshape(n, ctx_len)   # [n, T]
        carry, done = buf[n * ctx_len:], done + n
        if max_contexts and done >= max_contexts:
            return


def val_mask(ctx_ids: np.ndarray, val_fraction: float) -> np.ndarray:
    """Contexts held out for validation: i is val iff ceil((i+1)f) > ceil(i f), so any prefix of
    n contexts has exactly ceil(n f) val contexts, evenly spread, the first one being context 0."""
    f = Fraction(str(val_fraction))
    i = ctx_ids.astype(np.int64)
    ceil = lambda x: -((-x * f.numerator) // f.denominator)  # noqa: E731 - exact integer ceil
    return ceil(i + 1) > ceil(i)


class _SplitWriter:
    """Collects a split's contexts in a shuffle window and writes full shards out of it.

    Contexts arrive in corpus order (a shard would hold a few contiguous files); permuting each
    window of `window` contexts (seeded) makes every shard a mixture of the whole window."""

    def __init__(self, out_dir: Path, split: str, contexts_per_shard: int, window: int,
                 seed: int):
        self.out_dir, self.split, self.per_shard = out_dir, split, contexts_per_shard
        self.window, self.seed, self.flushes = max(window, contexts_per_shard), seed, 0
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.n_pending, self.entries = 0, []

    def add(self, contexts: np.ndarray, ctx_ids: np.ndarray, final: bool = False) -> None:
        self.pending.append((contexts, ctx_ids))
        self.n_pending += len(contexts)
        if self.n_pending < self.window and not (final and self.n_pending):
            return
        ctx = np.concatenate([c for c, _ in self.pending])
        ids = np.concatenate([i for _, i in self.pending])
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), self.flushes])
        perm = rng.permutation(len(ctx))
        ctx, ids, self.flushes = ctx[perm], ids[perm], self.flushes + 1
        n_write = len(ctx) if final else len(ctx) // self.per_shard * self.per_shard
        for start in range(0, n_write, self.per_shard):
            end = min(start + self.per_shard, n_write)
            name = f"{self.split}-{len(self.entries):06d}.tar"
            self.entries.append(write_shard(self.out_dir / name, ctx[start:end], ids[start:end]))
        self.pending, self.n_pending = [(ctx[n_write:], ids[n_write:])], len(ctx) - n_write


def _tokenize_and_write(cfg: Config, data_dir: Path) -> tuple[dict[str, list[dict]], dict]:
    """Write the shards of both splits; return their manifest entries and the corpus counts."""
    d = cfg.data
    max_contexts = d.max_tokens // d.ctx_len if d.max_tokens else 0
    if d.max_tokens and not max_contexts:
        raise MonosemError(f"data.max_tokens ({d.max_tokens}) is less than data.ctx_len "
                           f"({d.ctx_len}): not one context")
    data_dir.mkdir(parents=True, exist_ok=True)
    writers = {s: _SplitWriter(data_dir, s, d.contexts_per_shard, d.shuffle_window,
                               d.shuffle_seed) for s in SPLITS}
    stats, next_id = {"documents": 0, "tokens": 0, "skipped_files": 0}, 0
    # closing: stopping at max_tokens ends the progress bar and the document source at once
    with contextlib.closing(_token_chunks(cfg, stats)) as chunks:
        for block in _contexts(chunks, d.ctx_len, max_contexts):       # [n, T]
            ids = np.arange(next_id, next_id + len(block), dtype=np.int64)
            is_val = val_mask(ids, d.val_fraction)
            writers["train"].add(block[~is_val], ids[~is_val])
            writers["val"].add(block[is_val], ids[is_val])
            next_id += len(block)
    for w in writers.values():  # the last, partial shard of each split
        w.add(np.empty((0, d.ctx_len), np.uint16), np.empty(0, np.int64), final=True)
    if not writers["train"].entries:
        raise MonosemError(f"data.source {d.source!r} gave {stats['tokens']} tokens: not one "
                           f"training context of data.ctx_len={d.ctx_len}"
                           + (f" ({stats['skipped_files']} binary files skipped)"
                              if stats["skipped_files"] else ""))
    return {s: w.entries for s, w in writers.items()}, stats
