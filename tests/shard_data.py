"""Synthetic token shards for the stream tests: every context's tokens encode its id
(token t of context c = c * T + t), so what a stream yields is checked, not only counted.

    from shard_data import make_data, take
    data_dir = make_data(tmp_path)          # 16 train shards of 8 contexts (the last 5), 2 val
    ids = take(TokenStream(data_dir), 10)   # the first 10 ctx_ids, content checked
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from monosem.files import write_json_atomic
from monosem.shards import make_manifest, write_shards

T, PER_SHARD, N_CTX = 8, 8, 125  # 16 train shards, the last one short (5 contexts)
N_SHARDS = -(-N_CTX // PER_SHARD)


def write_manifest(data_dir: Path, ctx_len: int, splits: dict) -> None:
    write_json_atomic(data_dir / "manifest.json",
                      make_manifest(ctx_len, splits, source="synthetic"))


def make_data(data_dir: Path, n_ctx: int = N_CTX, per_shard: int = PER_SHARD) -> Path:
    """Write n_ctx train contexts in shards of per_shard, 4 val contexts in shards of 2."""
    ids = np.arange(n_ctx, dtype=np.int64)
    contexts = (ids[:, None] * T + np.arange(T)).astype(np.uint16)  # [N, T]
    val_ids = np.arange(n_ctx, n_ctx + 4, dtype=np.int64)
    val = (val_ids[:, None] * T + np.arange(T)).astype(np.uint16)
    write_manifest(data_dir, T, {"train": write_shards(contexts, ids, data_dir, "train", per_shard),
                                 "val": write_shards(val, val_ids, data_dir, "val", 2)})
    return data_dir


def take(it, n: int) -> list[int]:
    """The ctx_ids of the next `n` contexts of `it` (fewer if it ends), tokens checked."""
    out = []
    for tokens, cid in it:
        assert tokens.dtype == np.uint16 and tokens.shape == (T,)
        assert np.array_equal(tokens.astype(np.int64), cid * T + np.arange(T)), cid
        out.append(cid)
        if len(out) == n:
            break
    return out


def shard_ids(i: int) -> set[int]:
    """The ctx_ids in train shard `i` (make_data's defaults)."""
    return set(range(i * PER_SHARD, min(N_CTX, (i + 1) * PER_SHARD)))
