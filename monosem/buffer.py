"""Activation buffer: a shuffle pool in shared memory, filled by a producer process, drawn by the trainer.

    with ActivationBuffer(cfg, rank=0, world_size=1, lm_path=cfg.lm_dir, data_dir=cfg.data_dir) as buf:
        x, ids = buf.next_batch(4096)      # float32 [4096, d_in], int64 provenance ids [4096]
        state = buf.state_dict()           # later: ActivationBuffer(..., state=state) continues exactly

One shared-memory segment (/dev/shm/monosem_<pid>_<hex>) holds R ~ (1 + spare_fraction) x pool_size +
n_slots x slot_vectors vector rows in blocks of slot_vectors rows. A ring slot is one free block that the
consumer lends to the producer (monosem.producer, spawned here); the producer writes whole contexts into it, one
contiguous run, and announces it over a pipe with its stream state after the slot's last context; the
consumer adds the rows to its pool (monosem.pool: row indices only, no vector is copied except into the
batch it returns, and the few moved to free a block). Backpressure: with n_slots blocks lent and none
returned the producer blocks; with no announced slot the consumer blocks. Either side dying is an
end-of-file on the other's pipe (or a dead pid, seen within buffer.timeout_s / 4): the consumer raises
MonosemError, the producer exits and unlinks the segment.

Pool: before every batch the pool takes announced slots while it has room for one (a rule of fill level
only, never of timing), then B positions are drawn uniformly WITHOUT replacement (a seeded numpy
Generator): every vector is delivered exactly once and runs are deterministic. A finite stream
(loop=False) drains the pool: the last batch may be short, the call after it raises StopIteration.

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
from monosem.pool import Pool, shuffle_stats
from monosem.producer import (BUSY_S, HEADER, SLOTS, VECTORS, WAIT_S, WRITE_S, LMSource, SharedPool,
                              run_producer)

STATE_FORMAT = "monosem-buffer/2"


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
        spare = math.ceil(b.spare_fraction * b.pool_size / self.S)
        n_blocks = -(-b.pool_size // self.S) + b.n_slots + spare
        self.R, self.pool = n_blocks * self.S, Pool(b.pool_size, self.S, n_blocks)
        self.ended, self.stream_state, self.last_ids, self.n_lent = False, None, None, 0
        self.rng = np.random.default_rng([cfg.run.seed % 2**63, rank, 0xB0F])
        self.counters = {"vectors_in": 0, "vectors_delivered": 0, "batches": 0, "slots": 0}
        self.consumer_wait_s, self.t_first, self.session_slots = 0.0, None, 0
        saved = self._load(state) if state is not None else None
        self._start(source or LMSource(cfg, rank, world_size, lm_path, data_dir, loop), saved)

    # ---- producer process and slots -----------------------------------------------------------
    def _start(self, source, saved: tuple | None) -> None:
        import torch.multiprocessing as tmp

        b, ctx = self.cfg.buffer, tmp.get_context("spawn")
        self.shared = SharedPool((self.S, self.R, self.d_in, b.dtype))
        if saved is not None:  # the saved pool goes to rows 0..n-1, in pool order
            self.shared.acts[:len(saved[0])].copy_(saved[0])
            self.shared.ids[:len(saved[0])].copy_(saved[1])
            self.pool.restore(len(saved[0]))
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
        """Lend blocks to the producer until n_slots are lent (there is always one: see Pool)."""
        while self.n_lent < self.n_slots and not self.ended:
            block = self.pool.free_block(self.shared.acts_np, self.shared.ids_np)
            try:
                self.free_w.send(block)
            except OSError:  # the producer is gone: _recv tells how (end of stream, error or death)
                self.pool.free.insert(0, block)
                return
            self.n_lent += 1

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
        _, block, count, self.stream_state = msg
        self.pool.add_block(block, count)
        self.n_lent -= 1
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
        while not self.ended and self.pool.n + self.S <= self.pool_size:
            self._take_slot()
        if self.pool.n == 0:
            raise StopIteration
        B = min(batch_size, self.pool.n)
        rows = self.pool.draw(B, self.rng)                              # [B] rows
        x = self.shared.acts.index_select(0, rows).float()              # [B, d_in]: the one copy
        ids = self.shared.ids.index_select(0, rows)                     # [B]
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
        rows = torch.from_numpy(self.pool.live[:self.pool.n if self.cfg.train_sae.save_pool else 0])
        return {"format": STATE_FORMAT, "dtype": self.cfg.buffer.dtype, "d_in": self.d_in,
                "stream": self.stream_state, "rng": self.rng.bit_generator.state,
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
        self.stream_state = state["stream"]
        self.rng.bit_generator.state = state["rng"]
        self.counters.update(state["counters"])
        return acts, ids

    # ---- stats -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Fill levels, waits, throughput, and shuffle quality of the last batch (1.0 = uniform)."""
        h = self.shared.header.tolist() if self.shared.header is not None else [0.0] * HEADER
        elapsed = time.perf_counter() - self.t_first if self.t_first else 0.0
        delivered = self.counters["vectors_delivered"]
        out = {"fill": self.pool.n / self.pool_size,
               "ring_fill": max(0.0, h[SLOTS] - self.session_slots) / self.n_slots,
               "producer_wait_s": h[WAIT_S], "producer_busy_s": h[BUSY_S],
               "producer_write_s": h[WRITE_S],
               "consumer_wait_s": self.consumer_wait_s, "vectors_produced": h[VECTORS],
               "vectors_delivered": float(delivered), "vectors_moved": float(self.pool.moved),
               "vectors_per_s": delivered / elapsed if elapsed > 0 else 0.0}
        if self.last_ids is not None:
            pool_ids = torch.from_numpy(self.shared.ids_np[self.pool.live[:self.pool.n]])
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
