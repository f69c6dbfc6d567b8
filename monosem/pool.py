"""Shuffle pool bookkeeping: which shared-memory rows hold undelivered vectors, and which blocks are free.

    pool = Pool(pool_size=65536, block_rows=4096, n_blocks=40)
    pool.add_block(b, count)            # the producer filled rows [b*S, b*S+count) of block b
    rows = pool.draw(4096, rng)         # int64 [4096]: rows of a uniform draw without replacement
    b = pool.free_block(acts, ids)      # a block with no live row, moving a few rows if none is empty
    pool.release(b)                     # a lent block came back unfilled (the producer is gone)

The segment's rows come in blocks of S = block_rows rows: the producer always writes one whole block
(one ring slot) contiguously, at the speed of a plain copy. Draws leave holes scattered over the blocks;
a block whose rows are all drawn is free again. When a block must be lent and none is free, the
sparsest block's few live rows are moved into holes of the densest blocks (moving a vector changes its
row, never its pool position, so draws and batches do not depend on where vectors live). Spare blocks
beyond pool + ring (buffer.spare_fraction) leave fewer live rows in the sparsest block: measured with
the quickstart buffer (pool 16 blocks, batch = 1 block, 8 lent): 0.93 vectors moved per delivered
vector with no spare block, 0.29 with 8 (spare_fraction 0.5), 0.15 with 16 (1.0), 0.05 with 32 (2.0).

Draws are over pool *positions* 0..n-1 (live[pos] = row): uniform, without replacement, seeded.
"""
from __future__ import annotations

import math

import numpy as np
import torch


class Pool:
    """Positions -> rows (live), rows -> positions (row_pos), live rows per block, and block states.
    numpy, not torch: these are many small operations per batch, where torch's per-call cost dominates."""

    def __init__(self, pool_size: int, block_rows: int, n_blocks: int):
        self.P, self.S, self.n_blocks, self.n = pool_size, block_rows, n_blocks, 0
        self.live = np.empty(pool_size, dtype=np.int64)                 # [P] position -> row
        self.row_pos = np.full(n_blocks * block_rows, -1, dtype=np.int64)  # [R] row -> position or -1
        self.block_live = np.zeros(n_blocks, dtype=np.int64)            # [n_blocks] live rows
        self.free = list(range(n_blocks))                               # neither lent nor in the pool
        self.moved = 0                                                  # vectors moved to free a block

    @staticmethod
    def bookkeeping_bytes(pool_size: int, block_rows: int, n_blocks: int) -> int:
        """Host bytes a Pool of these sizes allocates (live, row_pos, block_live, the free list):
        checked before allocating, since a huge buffer.pool_size would otherwise fill the RAM first."""
        return 8 * pool_size + 8 * n_blocks * block_rows + 8 * n_blocks + 40 * n_blocks

    def restore(self, count: int) -> None:
        """`count` saved vectors were written to rows 0..count-1, in pool order."""
        self._add(np.arange(count))
        self.free = self.free[-(-count // self.S):]

    def add_block(self, block: int, count: int) -> None:
        """Rows [block*S, block*S + count) of a returned (lent) block join the pool."""
        self._add(block * self.S + np.arange(count))

    def _add(self, rows: np.ndarray) -> None:
        n, count = self.n, len(rows)
        self.live[n:n + count] = rows
        self.row_pos[rows] = np.arange(n, n + count)
        self.block_live += np.bincount(rows // self.S, minlength=self.n_blocks)
        self.n += count

    def release(self, block: int) -> None:
        """A lent block returns unfilled: it is the next one lent again."""
        self.free.insert(0, block)

    def draw(self, k: int, rng: np.random.Generator) -> torch.Tensor:
        """Rows of k positions drawn uniformly without replacement: int64 [k]. The drawn positions are
        back-filled from the tail, so positions 0..n-k-1 stay the undrawn ones."""
        n, keep = self.n, self.n - k
        idx = rng.choice(n, k, replace=False)                           # [k] positions
        rows = self.live[idx]                                           # [k]
        tail_free = np.ones(k, dtype=bool)
        tail_free[idx[idx >= keep] - keep] = False
        dst = idx[idx < keep]                                           # holes below keep
        self.live[dst] = self.live[tail_free.nonzero()[0] + keep]
        self.row_pos[rows] = -1
        self.row_pos[self.live[dst]] = dst
        self.n = keep
        drawn = np.bincount(rows // self.S, minlength=self.n_blocks)
        self.block_live -= drawn
        self.free.extend(((drawn > 0) & (self.block_live == 0)).nonzero()[0].tolist())  # emptied
        return torch.from_numpy(rows)

    def free_block(self, acts: np.ndarray, ids: np.ndarray) -> int:
        """A block to lend: a free one, else the sparsest pool block after moving its live rows (with
        their acts and ids, numpy views of the segment) into holes of the densest pool blocks."""
        if self.free:
            return self.free.pop(0)
        S, in_pool = self.S, self.block_live > 0
        x = int(np.where(in_pool, self.block_live, S + 1).argmin())
        src = x * S + (self.row_pos[x * S:(x + 1) * S] >= 0).nonzero()[0]    # [m] rows
        if not in_pool[x] or len(src) >= S:  # cannot happen with at most n_slots blocks lent
            raise RuntimeError("shuffle pool: no block to free (more blocks lent than the ring has?)")
        order = np.argsort(-np.where(in_pool, self.block_live, -1), kind="stable")  # densest first
        dst, need = [], len(src)
        for b in order[:in_pool.sum()]:
            if b == x or need == 0:
                continue
            holes = b * S + (self.row_pos[b * S:(b + 1) * S] < 0).nonzero()[0][:need]
            dst.append(holes)
            need -= len(holes)
        dst = np.concatenate(dst)                                      # [m] rows
        acts[dst] = acts[src]
        ids[dst] = ids[src]
        pos = self.row_pos[src]
        self.live[pos], self.row_pos[dst], self.row_pos[src] = dst, pos, -1
        self.block_live += np.bincount(dst // S, minlength=self.n_blocks)
        self.block_live[x] = 0
        self.moved += len(src)
        return x


def shuffle_stats(batch_ctx: torch.Tensor, pool_ctx: torch.Tensor) -> dict:
    """How clumped a batch is by context, against a uniform draw without replacement from its pool.

    shared_frac: fraction of the batch's vectors with another vector of their context in the batch;
    same_ctx: mean number of other batch vectors from the same context. `*_expected`: exact
    (hypergeometric) expectations for the pool drawn from (pool_ctx includes the batch).
    shuffle_quality = same_ctx / same_ctx_expected: 1 for uniform sampling, > 1 when clumped."""
    B, N = len(batch_ctx), len(pool_ctx)
    _, inv, counts = torch.unique(batch_ctx, return_inverse=True, return_counts=True)
    shared = (counts[inv] > 1).double().mean().item()
    same = (counts[inv] - 1).double().mean().item()
    m = torch.unique(pool_ctx, return_counts=True)[1].double()          # [n_ctx] pool histogram
    p = m / N                                                            # a batch vector's context
    same_exp = (p * (B - 1) * (m - 1) / max(N - 1, 1)).sum().item()
    lg = torch.lgamma  # P(none of the other B-1 draws hits the context) = C(N-m, B-1) / C(N-1, B-1)
    none = torch.where(N - m >= B - 1, (lg(N - m + 1) - lg(N - m - B + 2) - math.lgamma(N)
                                        + math.lgamma(N - B + 1)).exp(), torch.zeros_like(m))
    shared_exp = min(1.0, max(0.0, (p * (1 - none)).sum().item()))
    return {"shuffle_shared_frac": shared, "shuffle_shared_frac_expected": shared_exp,
            "shuffle_same_ctx": same, "shuffle_same_ctx_expected": same_exp,
            "shuffle_quality": same / same_exp if same_exp > 0 else (1.0 if same == 0 else math.inf)}
