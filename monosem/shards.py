"""Token shards: corpus -> GPT-2 ids -> fixed-length contexts -> WebDataset tars + manifest.json.

Format (monosem-shards/1): `<data_dir>/{train,val}-NNNNNN.tar`, one sample per context, member
`<ctx_id:010d>.tokens.npy` = np.save of a uint16 [ctx_len] array; manifest.json lists every shard
with its counts and sha256.

    monosem prepare configs/tiny.toml       # = monosem.shards.prepare(load_config(...))
    m = read_manifest("runs/tiny/data"); paths = shard_paths("runs/tiny/data", "train")
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import sys
import tarfile
import time
from fractions import Fraction
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from monosem.config import Config
from monosem.configfile import save_config
from monosem.errors import MonosemError
from monosem.files import open_atomic, write_json_atomic

FORMAT = "monosem-shards/1"
SPLITS = ("train", "val")
IGNORED_KEYS = ("num_threads", "dir")  # [data] keys that do not change the shards


# ---- low-level: one shard, many shards, the manifest ------------------------------------------

def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _npy_header(ctx_len: int) -> bytes:
    """np.save's header for a uint16 [ctx_len] array: the same for every context of a shard."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(ctx_len, "<u2"), allow_pickle=False)
    return buf.getvalue()[: -2 * ctx_len]


def write_shard(path: Path, contexts: np.ndarray, ctx_ids: np.ndarray) -> dict:
    """Write one tar (temp name, fsync, rename); return its manifest entry. The layout is what
    webdataset's TarWriter writes (USTAR, one member per sample field); plain `tarfile` is used
    because `import webdataset` imports torch (2-4 s)."""
    path = Path(path)
    with open_atomic(path) as f:
        header = _npy_header(contexts.shape[1])
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for ctx, cid in zip(contexts, ctx_ids):
                data = header + ctx.astype("<u2", copy=False).tobytes()  # == np.save bytes
                info = tarfile.TarInfo(f"{int(cid):010d}.tokens.npy")
                # fixed mtime/owner: equal contexts give byte-identical tars (same sha256)
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                info.uname = info.gname = "monosem"
                tar.addfile(info, io.BytesIO(data))
    return {"name": path.name, "contexts": int(len(contexts)), "tokens": int(contexts.size),
            "bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_shards(contexts: np.ndarray, ctx_ids: np.ndarray, out_dir: str | Path, split: str,
                 contexts_per_shard: int) -> list[dict]:
    """Write `contexts` [N, T] uint16 with their global `ctx_ids` [N] int64 as
    `<split>-000000.tar`, ... of `contexts_per_shard` contexts each (the last may hold fewer)."""
    contexts, ctx_ids = np.asarray(contexts), np.asarray(ctx_ids)
    if contexts.ndim != 2 or contexts.dtype != np.uint16 or ctx_ids.shape != (len(contexts),):
        raise MonosemError(f"write_shards: need contexts uint16 [N, T] and ctx_ids [N], got "
                           f"{contexts.dtype} {list(contexts.shape)} and {list(ctx_ids.shape)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, start in enumerate(range(0, len(contexts), contexts_per_shard)):
        end = start + contexts_per_shard
        entries.append(write_shard(out_dir / f"{split}-{i:06d}.tar", contexts[start:end],
                                   ctx_ids[start:end]))
    return entries


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a shard folder; MonosemError naming the path if missing or invalid."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise MonosemError(f"no token shards: {path} is missing "
                           f"(run `monosem prepare <config>` first)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MonosemError(f"{path} is not a valid manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise MonosemError(f"{path}: format is {found!r}, expected {FORMAT!r}")
    missing = [k for k in ("ctx_len", "eot", "splits", "data_config") if k not in manifest]
    if missing:
        raise MonosemError(f"{path}: key(s) {', '.join(missing)} missing")
    return manifest


def shard_paths(data_dir: str | Path, split: str) -> list[Path]:
    """Paths of the shards of `split`, in manifest order."""
    splits = read_manifest(data_dir)["splits"]
    if split not in splits:
        raise MonosemError(f"{Path(data_dir) / 'manifest.json'}: no split {split!r} "
                           f"(has {', '.join(splits)})")
    return [Path(data_dir) / e["name"] for e in splits[split]["shards"]]


# ---- prepare: corpus -> shards ------------------------------------------------------------------

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
    manifest = {"format": FORMAT, "tokenizer": "r50k_base", "n_vocab": 50257, "eot": 50256,
                "ctx_len": cfg.data.ctx_len, "contexts_per_shard": cfg.data.contexts_per_shard,
                "source": cfg.data.source, "documents": stats["documents"],
                "corpus_tokens": stats["tokens"], "data_config": data_config,
                "versions": _versions(), "splits": splits}
    _remove_stale(data_dir, manifest)
    save_config(cfg, data_dir)
    write_json_atomic(data_dir / "manifest.json", manifest)  # last: it marks the folder complete
    dt = time.perf_counter() - t0
    print(f"prepare: {stats['documents']:,} documents, {stats['tokens']:,} tokens read -> "
          f"{_counts(manifest)} in {data_dir} ({stats['tokens'] / dt:,.0f} tokens/s, {dt:.1f} s)")
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


def verify_shards(data_dir: str | Path, manifest: dict | None = None) -> None:
    """Check every shard's size and sha256 against the manifest; MonosemError naming the shard."""
    data_dir = Path(data_dir)
    manifest = manifest or read_manifest(data_dir)
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            path, problem = data_dir / entry["name"], None
            if not path.is_file():
                problem = "is missing"
            elif "bytes" in entry and path.stat().st_size != entry["bytes"]:
                problem = f"has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
            elif _sha256(path) != entry["sha256"]:
                problem = "does not match its sha256 in the manifest (corrupt)"
            if problem:
                raise MonosemError(f"shard {path} {problem}; delete {data_dir}, prepare again")


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

def _token_chunks(docs: Iterable[str], num_threads: int, stats: dict) -> Iterator[np.ndarray]:
    """uint16 token ids of document batches (eot after each document), with a progress bar."""
    from tqdm import tqdm
    from monosem.tokenizer import encode_documents

    with tqdm(desc="prepare", unit=" docs", mininterval=0.5) as bar:
        for n_docs, chunk in encode_documents(docs, num_threads):
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

    Contexts arrive in corpus order (a shard would hold a few contiguous files); permuting each window
    of `window` contexts (seeded) makes every shard a mixture of the whole window."""

    def __init__(self, out_dir: Path, split: str, contexts_per_shard: int, ctx_len: int,
                 window: int, seed: int):
        self.out_dir, self.split, self.per_shard = out_dir, split, contexts_per_shard
        self.ctx_len, self.n_pending, self.entries = ctx_len, 0, []
        self.window, self.seed, self.flushes = max(window, contexts_per_shard), seed, 0
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, contexts: np.ndarray, ctx_ids: np.ndarray, final: bool = False) -> None:
        self.pending.append((contexts, ctx_ids))
        self.n_pending += len(contexts)
        if self.n_pending < self.window and not (final and self.n_pending):
            return
        ctx = np.concatenate([c for c, _ in self.pending])
        ids = np.concatenate([i for _, i in self.pending])
        perm = np.random.default_rng([self.seed, SPLITS.index(self.split), self.flushes]).permutation(len(ctx))
        ctx, ids, self.flushes = ctx[perm], ids[perm], self.flushes + 1
        n_write = len(ctx) if final else len(ctx) // self.per_shard * self.per_shard
        for start in range(0, n_write, self.per_shard):
            end = min(start + self.per_shard, n_write)
            name = f"{self.split}-{len(self.entries):06d}.tar"
            self.entries.append(write_shard(self.out_dir / name, ctx[start:end], ids[start:end]))
        self.pending, self.n_pending = [(ctx[n_write:], ids[n_write:])], len(ctx) - n_write

    def summary(self) -> dict:
        n = sum(e["contexts"] for e in self.entries)
        return {"contexts": n, "tokens": n * self.ctx_len, "shards": self.entries}


def _tokenize_and_write(cfg: Config, data_dir: Path) -> tuple[dict, dict]:
    from monosem.corpus import iter_documents

    d = cfg.data
    max_contexts = d.max_tokens // d.ctx_len if d.max_tokens else 0
    if d.max_tokens and not max_contexts:
        raise MonosemError(f"data.max_tokens ({d.max_tokens}) is less than data.ctx_len "
                           f"({d.ctx_len}): not one context")
    data_dir.mkdir(parents=True, exist_ok=True)
    writers = {s: _SplitWriter(data_dir, s, d.contexts_per_shard, d.ctx_len, d.shuffle_window,
                              d.shuffle_seed) for s in SPLITS}
    stats, next_id = {"documents": 0, "tokens": 0}, 0
    # closing: stopping at max_tokens ends the progress bar and the document source at once
    with contextlib.closing(_token_chunks(iter_documents(d), d.num_threads, stats)) as chunks:
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
                           f"training context of data.ctx_len={d.ctx_len}")
    return {s: w.summary() for s, w in writers.items()}, stats
