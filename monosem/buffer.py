"""Activation buffer: a shuffle pool in shared memory, filled by a producer process, drawn by the trainer.

    with ActivationBuffer(cfg, rank=0, world_size=1, lm_path=cfg.lm_dir, data_dir=cfg.data_dir) as buf:
        x, ids = buf.next_batch(4096)      # float32 [4096, d_in], int64 provenance ids [4096]
        state = buf.state_dict()           # later: ActivationBuffer(..., state=state) continues exactly

One shared-memory segment (/dev/shm/monosem_<pid>_<hex>) holds R = pool_size + n_slots * slot_vectors
vector rows and a ring of n_slots fixed slots; a slot is slot_vectors free rows that the consumer lends
to the producer (monosem.producer, spawned here). The producer writes whole contexts straight into the
rows of a lent slot and announces it over a pipe with its stream state after the slot's last context;
the consumer adds the rows to its pool (row indices only: no vector is copied except into the batch it
returns). Backpressure: with every slot lent and none returned the producer blocks; with no announced
slot the consumer blocks. Either side dying is an end-of-file on the other's pipe (or a dead pid, seen
within buffer.timeout_s / 4): the consumer raises MonosemError, the producer exits and unlinks the segment.

Pool: before every batch the pool takes announced slots while it has room for one (a rule of fill level
only, never of timing), then B rows are drawn uniformly WITHOUT replacement (a seeded torch.Generator)
and their rows lent again: every vector is delivered exactly once and runs are deterministic. A finite
stream (loop=False) drains the pool: the last batch may be short, the call after it raises StopIteration.

Resume: state_dict() SAVES THE POOL's undelivered vectors (+ ids, in pool order), the sampling RNG and the
stream state after the last slot taken into the pool; slots still in the ring are discarded and produced
again by the new producer from that state, so the batches continue bit-identically. With
train_sae.save_pool = false the pool is left out and its undelivered vectors are skipped on resume.
"""
from __future__ import annotations

import math
import os
import time
import weakref
from contextlib import suppress

import numpy as np
import torch

from monosem.config import Config, ConfigError
from monosem.errors import MonosemError
from monosem.producer import (BUSY_S, HEADER, SLOTS, VECTORS, WAIT_S, WRITE_S, LMSource, SharedPool,
                              run_producer)

STATE_FORMAT = "monosem-buffer/1"


def sample_distinct(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct indices in [0, n), a uniform k-subset in random order: int64 [k]. Large n: iid draws
    with duplicates redrawn (a permutation-symmetric procedure, hence uniform) at O(k log k), not O(n)."""
    if n < 32 * k:  # measured: randperm is cheaper up to here
        return torch.randperm(n, generator=gen)[:k]
    picked = torch.empty(0, dtype=torch.int64)
    while len(picked) < k:
        draw = torch.randint(n, (k - len(picked),), generator=gen)
        picked = torch.unique(torch.cat([picked, draw]))
    return picked[torch.randperm(k, generator=gen)]


def _shutdown(proc, shared: SharedPool, full_r, free_w, timeout_s: float) -> None:
    """Stop the producer (stop message, pipes closed, then terminate/kill) and free the segment."""
    with suppress(Exception):
        free_w.send(None)
    for conn in (free_w, full_r):
        with suppress(Exception):
            conn.close()
    proc.join(timeout_s)
    for stop in (proc.terminate, proc.kill):
        if proc.is_alive():
            stop()
            proc.join(timeout_s)
    shared.close(unlink=True)


class ActivationBuffer:
    """Consumer side of one rank: owns the segment, the producer process and the pool bookkeeping."""

    def __init__(self, cfg: Config, *, rank: int, world_size: int, lm_path=None, data_dir=None,
                 state: dict | None = None, source=None, loop: bool = True):
        b = cfg.buffer
        self.cfg, self.rank, self.d_in, self.ctx_len = cfg, rank, cfg.sae.d_in, cfg.data.ctx_len
        self.S, self.pool_size, self.n_slots = b.slot_vectors, b.pool_size, b.n_slots
        per_context = b.tokens_per_context or cfg.data.ctx_len
        if per_context > b.slot_vectors:
            raise ConfigError(f"buffer.slot_vectors ({b.slot_vectors}) must hold one context's "
                              f"{per_context} vectors (buffer.tokens_per_context or data.ctx_len)")
        if b.pool_size < 2 * b.slot_vectors:
            raise ConfigError(f"buffer.pool_size ({b.pool_size}) must be >= 2 x buffer.slot_vectors "
                              f"({b.slot_vectors})")
        self.poll_s = min(0.5, b.timeout_s / 4)
        self.R = b.pool_size + b.n_slots * b.slot_vectors
        self.live = torch.empty(b.pool_size, dtype=torch.int64)  # [P] pool position -> row
        self.n, self.ended, self.stream_state, self.last_ids = 0, False, None, None
        seed = int(np.random.SeedSequence([cfg.run.seed % 2**63, rank, 0xB0F]).generate_state(1)[0])
        self.gen = torch.Generator().manual_seed(seed)
        self.counters = {"vectors_in": 0, "vectors_delivered": 0, "batches": 0, "slots": 0}
        self.consumer_wait_s, self.t_first, self.session_slots = 0.0, None, 0
        saved = self._load(state) if state is not None else None
        self._start(source or LMSource(cfg, rank, world_size, lm_path, data_dir, loop), saved)

    # ---- producer process and slots -----------------------------------------------------------
    def _start(self, source, saved: tuple | None) -> None:
        import torch.multiprocessing as tmp

        b, ctx = self.cfg.buffer, tmp.get_context("spawn")
        self.shared = SharedPool((b.n_slots, self.S, self.R, self.d_in, b.dtype))
        if saved is not None:  # the saved pool goes to rows 0..n-1, in pool order
            self.shared.acts[:self.n].copy_(saved[0])
            self.shared.ids[:self.n].copy_(saved[1])
            self.live[:self.n] = torch.arange(self.n)
        self.free_rows, self.free_slots = torch.arange(self.n, self.R), list(range(b.n_slots))
        self.full_r, full_w = ctx.Pipe(duplex=False)  # producer -> consumer: full slots, end, error
        free_r, self.free_w = ctx.Pipe(duplex=False)  # consumer -> producer: lent slots, stop
        per_slot = self.S // (b.tokens_per_context or self.ctx_len)
        self.proc = ctx.Process(
            target=run_producer, name=f"monosem-producer-{self.rank}", daemon=False,
            args=(source, self.shared.name, self.shared.spec, full_w, free_r, os.getpid(),
                  self.stream_state, per_slot, b.producer_threads, self.poll_s))
        # runs on close(), on garbage collection and at interpreter exit
        self._finalizer = weakref.finalize(self, _shutdown, self.proc, self.shared, self.full_r,
                                           self.free_w, b.timeout_s)
        self.proc.start()
        full_w.close()  # only the producer holds these ends now: its death is an EOF here
        free_r.close()
        self._lend()

    def _lend(self) -> None:
        """Lend free slots to the producer while there are slot_vectors free rows for each."""
        while self.free_slots and len(self.free_rows) >= self.S:
            slot = self.free_slots.pop(0)  # ascending rows: ~20% faster writes than scattered ones
            self.shared.table[slot].copy_(self.free_rows[:self.S].sort().values)
            self.free_rows = self.free_rows[self.S:]
            try:
                self.free_w.send(slot)
            except OSError:  # the producer is gone
                self._raise_dead()

    def _recv(self):
        while True:
            if self.full_r.poll(self.poll_s):
                try:
                    return self.full_r.recv()
                except (EOFError, OSError):
                    self._raise_dead()
            if not self.proc.is_alive() and not self.full_r.poll(0):
                self._raise_dead()

    def _raise_dead(self, traceback: str | None = None) -> None:
        """Close everything and raise: with the producer's traceback if it sent one."""
        self.proc.join(1.0)
        try:  # a traceback may still be in the pipe
            while traceback is None and self.full_r.poll(0):
                msg = self.full_r.recv()
                traceback = msg[1] if msg[0] == "error" else None
        except (EOFError, OSError):
            pass
        code = self.proc.exitcode
        self.close()
        if traceback is not None:
            raise MonosemError(f"activation producer of rank {self.rank} failed:\n{traceback}")
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise MonosemError(f"activation producer of rank {self.rank} died ({how}) without a message; "
                           f"see its stderr above (out of memory?)")

    def _take_slot(self) -> None:
        """Add the next announced slot's rows to the pool (blocks while none is announced)."""
        t0 = time.perf_counter()
        msg = self._recv()
        self.consumer_wait_s += time.perf_counter() - t0
        if msg[0] == "error":
            self._raise_dead(msg[1])
        if msg[0] == "end":
            self.ended = True
            return
        _, slot, count, self.stream_state = msg
        rows = self.shared.table[slot]                                   # [S]
        self.live[self.n:self.n + count] = rows[:count]
        self.free_rows = torch.cat([self.free_rows, rows[count:]])      # a short last slot
        self.free_slots.append(slot)
        self.n += count
        self.counters["vectors_in"] += count
        self.counters["slots"] += 1
        self.session_slots += 1
        self._lend()

    # ---- batches ---------------------------------------------------------------------------------
    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 [B, d_in] and int64 ids [B], drawn without replacement from the topped-up pool.
        Finite stream: the last batch may be short; once drained, raises StopIteration."""
        if not 0 < batch_size <= self.pool_size - self.S:
            raise ConfigError(f"batch size {batch_size} must be in 1..buffer.pool_size - "
                              f"buffer.slot_vectors = {self.pool_size - self.S}")
        self.t_first = self.t_first or time.perf_counter()
        while not self.ended and self.n + self.S <= self.pool_size:
            self._take_slot()
        if self.n == 0:
            raise StopIteration
        n, B = self.n, min(batch_size, self.n)
        idx = sample_distinct(n, B, self.gen)                           # [B] pool positions
        rows = self.live[idx]                                           # [B]
        x = self.shared.acts.index_select(0, rows).float()              # [B, d_in]: the one copy
        ids = self.shared.ids.index_select(0, rows)                     # [B]
        keep = n - B  # back-fill the drawn positions below `keep` with the undrawn ones of the tail
        tail_free = torch.ones(B, dtype=torch.bool)
        tail_free[idx[idx >= keep] - keep] = False
        self.live[idx[idx < keep]] = self.live[tail_free.nonzero().squeeze(1) + keep]
        self.n = keep
        self.free_rows = torch.cat([self.free_rows, rows])
        self._lend()
        self.last_ids = ids
        self.counters["vectors_delivered"] += B
        self.counters["batches"] += 1
        return x, ids

    def batches(self, batch_size: int):
        """next_batch until a finite stream is drained."""
        while True:
            try:
                yield self.next_batch(batch_size)
            except StopIteration:
                return

    # ---- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors, dicts and numbers only (torch.load(weights_only=True) reads it back)."""
        rows = self.live[:self.n if self.cfg.train_sae.save_pool else 0]
        return {"format": STATE_FORMAT, "dtype": self.cfg.buffer.dtype, "d_in": self.d_in,
                "stream": self.stream_state, "rng": self.gen.get_state(),
                "pool": {"acts": self.shared.acts.index_select(0, rows),
                         "ids": self.shared.ids.index_select(0, rows)},
                "counters": dict(self.counters)}

    def _load(self, state: dict) -> tuple:
        if state.get("format") != STATE_FORMAT:
            raise MonosemError(f"buffer state format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        for key, field, want in (("dtype", "buffer.dtype", self.cfg.buffer.dtype),
                                 ("d_in", "sae.d_in", self.d_in)):
            if state[key] != want:
                raise ConfigError(f"saved buffer has {key}={state[key]!r}, {field}={want!r}")
        acts, ids = state["pool"]["acts"], state["pool"]["ids"]
        if len(acts) > self.pool_size:
            raise ConfigError(f"saved pool holds {len(acts)} vectors > buffer.pool_size {self.pool_size}")
        self.n, self.stream_state = len(acts), state["stream"]
        self.gen.set_state(state["rng"])
        self.counters.update(state["counters"])
        return acts, ids

    # ---- stats -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Fill levels, waits, throughput, and shuffle quality of the last batch (1.0 = uniform)."""
        h = self.shared.header.tolist() if self.shared.header is not None else [0.0] * HEADER
        elapsed = time.perf_counter() - self.t_first if self.t_first else 0.0
        delivered = self.counters["vectors_delivered"]
        out = {"fill": self.n / self.pool_size,
               "ring_fill": max(0.0, h[SLOTS] - self.session_slots) / self.n_slots,
               "producer_wait_s": h[WAIT_S], "producer_busy_s": h[BUSY_S],
               "producer_write_s": h[WRITE_S],
               "consumer_wait_s": self.consumer_wait_s, "vectors_produced": h[VECTORS],
               "vectors_delivered": float(delivered),
               "vectors_per_s": delivered / elapsed if elapsed > 0 else 0.0}
        if self.last_ids is not None:
            pool_ids = self.shared.ids.index_select(0, self.live[:self.n])
            out |= shuffle_stats(self.last_ids // self.ctx_len,
                                 torch.cat([pool_ids, self.last_ids]) // self.ctx_len)
        return out

    def close(self) -> None:
        """Stop the producer, unlink the shared memory; safe to call twice."""
        self._finalizer()

    def __enter__(self) -> "ActivationBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
