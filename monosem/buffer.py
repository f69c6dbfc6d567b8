"""Activation buffer: a shuffle pool in shared memory, filled by a producer process, drawn by the trainer.

    with ActivationBuffer(cfg, rank=0, world_size=1, lm_path=cfg.lm_dir, data_dir=cfg.data_dir) as buf:
        x, ids = buf.next_batch(4096, device)  # float32 [4096, d_in] on device, int64 ids [4096] (host)
        state = buf.state_dict()           # later: ActivationBuffer(..., state=state) continues exactly

One shared-memory segment (monosem.segment) holds R ~ (1 + spare_fraction) x pool_size +
n_slots x slot_vectors vector rows in blocks of slot_vectors rows. A ring slot is one free block that the
consumer lends to the producer (monosem.producer, spawned here); the producer writes whole contexts into it, one
contiguous run, and announces it over a pipe with its stream state after the slot's last context; the
consumer adds the rows to its pool (monosem.pool: row indices only, no vector is copied except into the
batch it returns, and the few moved to free a block). Backpressure: with n_slots blocks lent and none
returned the producer blocks; with no announced slot the consumer blocks. Either side dying is an
end-of-file on the other's pipe (or a dead pid, seen within buffer.timeout_s / 4): the consumer raises
MonosemError, the producer exits and unlinks the segment. A MonosemError in the producer (a corrupt
shard) arrives as its one-line message; any other exception with the producer's traceback.

Pool: before every batch the pool takes announced slots while it has room for one (a rule of fill level
only, never of timing), then B positions are drawn uniformly WITHOUT replacement (a seeded numpy
Generator): every vector is delivered exactly once and runs are deterministic. A finite stream
(loop=False) drains the pool: the last batch may be short, the call after it raises StopIteration.

Resume: state_dict() SAVES THE POOL's undelivered vectors (+ ids, in pool order), the sampling RNG and the
stream state after the last slot taken into the pool; slots still in the ring are discarded and produced
again by the new producer from that state, so the batches continue bit-identically. With
train_sae.save_pool = false the pool is left out and its undelivered vectors are skipped on resume.

On a GPU: the producer of rank r runs the frozen LM on cuda:<local rank> (buffer.producer_device = auto),
casts to buffer.dtype there and copies whole contexts into the HOST segment, as on the CPU.
next_batch(B, device=cuda) gathers the B drawn rows into one of two PINNED host staging tensors
(index_select(out=...)), copies it with non_blocking=True on the current stream and casts to float32 on
the device; the trainer queues its step while the DMA runs. A CUDA event is recorded behind each copy
and a staging tensor is refilled only two batches later, after waiting on its event: it is never
overwritten while its copy may be in flight. With device None or cpu nothing changes: one index_select
and the cast, no pinned memory, no extra copy. Why this and not a pool on the GPU shared through CUDA
IPC (torch.multiprocessing): (1) the pool's bookkeeping (draws, row moves) and the rows stay in one
place, the host, on every machine: exactly-once, the shuffle, backpressure and the saved pool for an
exact resume are the code the CPU tests run, not a second GPU-only path; (2) CUDA IPC memory belongs to
the process that allocated it: a producer killed by the OOM killer or a signal invalidates what the
trainer maps, and a trainer that dies leaves the producer holding device memory, where a /dev/shm name
is unlinked by whichever side survives; every slot would also need a cross-process event handshake;
(3) the device memory stays for the SAE and its Adam state (the paper's pool: 1M x 512 fp32 = 2 GiB
plus spares). The cost is PCIe: each vector crosses it twice (producer D2H, trainer H2D), 2 KiB in fp32
(1 KiB in bf16); a 4096 x 512 fp32 batch is 8 MiB, ~0.4 ms at 20 GB/s pinned, overlapped with the
previous step; a GPU SAE step at n_features 16384 takes several ms. Not measured on a GPU yet: the
benchmark's figures will say whether the host gather keeps up (benchmarks/bench_stream.py).
"""
from __future__ import annotations

import math
import os
import time
import weakref
from contextlib import suppress
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from monosem import dist
from monosem.config import Config, ConfigError
from monosem.configfile import validate
from monosem.errors import MonosemError
from monosem.pool import Pool, shuffle_stats
from monosem.producer import LMSource, ProducerJob, Source, run_producer
from monosem.segment import (BUSY_S, HEADER, SLOTS, TRAINER_WAITING, VECTORS, WAIT_S, WAIT_THREAD_CONTEXTS,
                             WRITE_S, End, Failed, Full, Lend, SharedPool, Staging, Stop, check_room,
                             segment_bytes)

STATE_FORMAT = "monosem-buffer/2"


def _shutdown(proc, shared: SharedPool, full_r: Connection, free_w: Connection, timeout_s: float) -> None:
    """Stop the producer (stop message, pipes closed, then terminate/kill) and free the segment."""
    with suppress(Exception):
        free_w.send(Stop())
    for conn in (free_w, full_r):
        with suppress(Exception):
            conn.close()
    if proc.pid is not None:  # None: it never started (its job failed to pickle, say)
        proc.join(timeout_s)
        for stop in (proc.terminate, proc.kill):
            if proc.is_alive():
                stop()
                proc.join(timeout_s)
    shared.close(unlink=True)


class ActivationBuffer:
    """Consumer side of one rank: owns the segment, the producer process and the pool bookkeeping."""

    def __init__(self, cfg: Config, *, rank: int, world_size: int, lm_path: str | Path | None = None,
                 data_dir: str | Path | None = None, state: dict | None = None,
                 source: Source | None = None, loop: bool = True):
        b = validate(cfg).buffer  # the cross-field rules of the buffer live there
        self.cfg, self.rank, self.d_in, self.ctx_len = cfg, rank, cfg.sae.d_in, cfg.data.ctx_len
        self.S, self.pool_size, self.n_slots = b.slot_vectors, b.pool_size, b.n_slots
        self.poll_s = min(0.5, b.timeout_s / 4)
        spare = math.ceil(b.spare_fraction * b.pool_size / self.S)
        n_blocks = -(-b.pool_size // self.S) + b.n_slots + spare
        self.R, self.spec = n_blocks * self.S, (self.S, n_blocks * self.S, self.d_in, b.dtype)
        # before any allocation: a huge pool_size must fail here, not after filling the RAM
        check_room(segment_bytes(self.spec), Pool.bookkeeping_bytes(b.pool_size, self.S, n_blocks),
                   b.pool_size)
        self.pool, self.staging = Pool(b.pool_size, self.S, n_blocks), Staging()
        self.ended, self.stream_state, self.last_ids, self.n_lent = False, None, None, 0
        self.rng = np.random.default_rng([cfg.run.seed % 2**63, rank, 0xB0F])
        self.counters = {"vectors_in": 0, "vectors_delivered": 0, "batches": 0, "slots": 0}
        self.consumer_wait_s, self.t_first, self.session_slots = 0.0, None, 0
        saved = self._load(state) if state is not None else None
        self._start(source or LMSource(cfg, rank, world_size, lm_path, data_dir, loop), saved)

    # ---- producer process and slots -----------------------------------------------------------
    def _start(self, source: Source, saved: tuple | None) -> None:
        self.shared = SharedPool(self.spec)
        # until the producer exists, closing frees the segment alone: an error below leaves no /dev/shm file
        self._finalizer = weakref.finalize(self, self.shared.close, True)
        try:
            self._spawn(source, saved)
        except BaseException:
            self._finalizer()
            raise
        self._lend()

    def _spawn(self, source: Source, saved: tuple | None) -> None:
        """Restore the saved pool into the segment and start the producer (its finalizer replaces
        _start's)."""
        import torch.multiprocessing as tmp

        b, ctx = self.cfg.buffer, tmp.get_context("spawn")
        if saved is not None:  # the saved pool goes to rows 0..n-1, in pool order
            self.shared.acts[:len(saved[0])].copy_(saved[0])
            self.shared.ids[:len(saved[0])].copy_(saved[1])
            self.pool.restore(len(saved[0]))
        self.full_r, full_w = ctx.Pipe(duplex=False)  # producer -> consumer: Full, End, Failed
        free_r, self.free_w = ctx.Pipe(duplex=False)  # consumer -> producer: Lend, Stop
        on_gpu = torch.cuda.is_available()
        job = ProducerJob(source, self.shared.name, self.spec, self.rank, os.getpid(), self.stream_state,
                          self.S // (b.tokens_per_context or self.ctx_len), b.producer_threads, self.poll_s,
                          0 if on_gpu else b.producer_nice,
                          # while the trainer waits, its own cores sit idle: 0 = as many threads
                          b.producer_threads if on_gpu else
                          b.producer_wait_threads or dist.cpu_threads(self.cfg.train_sae.threads))
        self.proc = ctx.Process(target=run_producer, name=f"monosem-producer-{self.rank}", daemon=False,
                                args=(job, full_w, free_r))
        # runs on close(), on garbage collection and at interpreter exit
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _shutdown, self.proc, self.shared, self.full_r,
                                           self.free_w, b.timeout_s)
        self.proc.start()
        full_w.close()  # only the producer holds these ends now: its death is an EOF here
        free_r.close()

    def _lend(self) -> None:
        """Lend blocks to the producer until n_slots are lent (there is always one: see Pool)."""
        while self.n_lent < self.n_slots and not self.ended:
            block = self.pool.free_block(self.shared.acts_np, self.shared.ids_np)
            try:
                self.free_w.send(Lend(block))
            except OSError:  # the producer is gone: _recv tells how (end of stream, error or death)
                self.pool.release(block)
                return
            self.n_lent += 1

    def _recv(self) -> Full | End | Failed:
        while True:
            if self.full_r.poll(self.poll_s):
                try:
                    return self.full_r.recv()
                except (EOFError, OSError):
                    self._raise_dead()
            if not self.proc.is_alive() and not self.full_r.poll(0):
                self._raise_dead()

    def _raise_dead(self, failed: Failed | None = None) -> None:
        """Close everything and raise: the producer's message (a user error) or its traceback."""
        self.proc.join(1.0)
        try:  # a Failed message may still be in the pipe
            while failed is None and self.full_r.poll(0):
                msg = self.full_r.recv()
                failed = msg if isinstance(msg, Failed) else None
        except (EOFError, OSError):
            pass
        code = self.proc.exitcode
        self.close()
        if failed is not None and failed.kind == "user":
            raise MonosemError(failed.message)
        if failed is not None:
            raise MonosemError(f"activation producer of rank {self.rank} failed:\n{failed.traceback}")
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise MonosemError(f"activation producer of rank {self.rank} died ({how}) without a message; "
                           f"see its stderr above (out of memory?)")

    def _take_slot(self) -> None:
        """Add the next announced slot's rows to the pool (blocks while none is announced)."""
        t0 = time.perf_counter()
        self.shared.header[TRAINER_WAITING] = 1  # the producer takes producer_wait_threads meanwhile
        try:
            msg = self._recv()
        finally:
            if self.shared.header is not None:  # (closed if the producer died)
                self.shared.header[TRAINER_WAITING] = 0
        self.consumer_wait_s += time.perf_counter() - t0
        if isinstance(msg, Failed):
            self._raise_dead(msg)
        if isinstance(msg, End):
            self.ended = True
            return
        self.stream_state = msg.state
        self.pool.add_block(msg.block, msg.count)
        self.n_lent -= 1
        self.counters["vectors_in"] += msg.count
        self.counters["slots"] += 1
        self.session_slots += 1
        self._lend()

    # ---- batches ---------------------------------------------------------------------------------
    def next_batch(self, batch_size: int, device: torch.device | str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 [B, d_in] on `device` (None: the host) and int64 provenance ids [B] on the host,
        drawn without replacement from the topped-up pool. Finite stream: the last batch may be short;
        once drained, raises StopIteration."""
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
        x = self.staging.gather(self.shared.acts, rows, torch.device(device or "cpu"))  # [B, d_in]
        ids = self.shared.ids.index_select(0, rows)                     # [B]
        self._lend()
        self.last_ids = ids
        self.counters["vectors_delivered"] += B
        self.counters["batches"] += 1
        return x, ids

    def batches(self, batch_size: int, device: torch.device | str | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """next_batch until a finite stream is drained."""
        while True:
            try:
                yield self.next_batch(batch_size, device)
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
               "producer_write_s": h[WRITE_S], "producer_wait_thread_contexts": h[WAIT_THREAD_CONTEXTS],
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
