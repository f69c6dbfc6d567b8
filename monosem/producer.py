"""Activation producer: the process that runs the frozen LM and writes activations into shared memory.

ActivationBuffer (monosem.buffer) spawns one per rank; it is not started by hand. A *source* turns a
position in a stream into activation vectors, one context at a time: LMSource (TokenStream -> frozen LM
-> MLP post-activation, optionally a seeded random subset of positions per context) or SyntheticSource
(no LM: for tests and for measuring the ring + pool alone). The producer writes whole contexts straight
into the block of pool rows the consumer lent as a ring slot (SharedPool: the segment both sides map).

    src = LMSource(cfg, rank=0, world_size=1, lm_path="runs/tiny/lm", data_dir="runs/tiny/data")
    for acts, ids, state in src.contexts(None):   # [k, d_in] storage dtype, [k] int64, state after it
        break

Sharing the cores on a CPU-only machine (the rule the trainer and the buffer follow): the SAE step takes
every core (torch threads = cores / local processes); the producer runs `buffer.producer_threads` threads
at the lowest priority (`buffer.producer_nice`, default 19) while the trainer steps, and
`buffer.producer_wait_threads` (default: the trainer's cores) while the trainer waits for a slot: the
buffer raises TRAINER_WAITING in the segment header and the producer reads it before each forward pass
(so `buffer.producer_batch` is small, 8 contexts). The trainer's OpenMP threads spin only ~0.3 ms after a
parallel region (GOMP_SPINCOUNT=10000, set by `import monosem`; libgomp's default spins ~8 ms), so the
step's gaps reach the producer instead of a spinning thread. Measured at the quickstart's shapes (SAE
2048 features, batch 2048; 2 cores; benchmarks/bench_share.py; README, "How the producer shares the
cores"): before, one niced producer thread got almost nothing during the step and the trainer waited
~15 ms per ~97 ms step for it; with this rule it waits < 1 ms but the step slows by nearly as much: end
to end +2.6% (medians of 27 alternated runs each; within the VM's scatter); with the step ~15% faster
since, +3-4% there and +8% at n_features 4096 / batch 4096; end to end / step alone 0.98 and 1.00
(medians of 5 and 4 alternated rounds; 0.89 at the quickstart shapes while the loop still fed the
resampling reservoir with no resampling ahead). Giving the producer a core of its own halves the step on 2
cores; an equal-priority producer on top of a trainer on every core steals time slices in the middle of
the step's GEMMs (every OpenMP thread then waits for the slowest). On a GPU the producer keeps priority
0 and buffer.producer_threads.
"""
from __future__ import annotations

import copy
import ctypes
import functools
import os
import signal
import sys
import time
import traceback
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from monosem import dist
from monosem.config import Config
from monosem.errors import MonosemError
from monosem.segment import (BUSY_S, DTYPES, SLOTS, TRAINER_WAITING, VECTORS, WAIT_S, WAIT_THREAD_CONTEXTS,
                             WAITING, WRITE_S, End, Failed, Full, Lend, SharedPool, Spec, Stop)

Context = tuple[torch.Tensor, torch.Tensor, dict]  # acts [k, d_in], provenance ids [k], state after it
TABLE_ROWS = 4093  # prime: a synthetic vector is row (id mod TABLE_ROWS) of a fixed random table
PR_SET_NAME = 15   # prctl option: the 15-byte name in /proc/<pid>/comm (ps, top, pgrep)


class Source(Protocol):
    """What the producer runs: whole contexts from a resumable position (picklable: it is spawned)."""

    def contexts(self, state: dict | None) -> Iterator[Context]: ...


def keep_positions(seed: int, ctx_id: int, ctx_len: int, k: int) -> torch.Tensor:
    """Sorted positions kept from context `ctx_id` (all if k is 0 or >= ctx_len): int64 [k].
    Seeded by (run seed, ctx_id) alone, so a resumed producer re-derives exactly the same ones."""
    if k <= 0 or k >= ctx_len:
        return torch.arange(ctx_len, dtype=torch.int64)
    rng = np.random.default_rng([seed % 2**63, ctx_id])
    return torch.from_numpy(np.sort(rng.choice(ctx_len, size=k, replace=False)).astype(np.int64))


def producer_device(setting: str) -> str:
    """`auto`: cuda:<local rank> when there is a GPU (each rank's producer on its own GPU), else cpu."""
    if setting == "auto" and torch.cuda.is_available():
        return f"cuda:{dist.local_rank() % torch.cuda.device_count()}"
    return "cpu"


class LMSource:
    """This rank's disjoint TokenStream -> frozen LM -> hook-layer MLP post-activations.

    Forward passes take producer_batch contexts aligned to multiples of producer_batch counted from the
    start of the stream (the count is part of the state), so a resumed producer batches contexts exactly
    as an uninterrupted one did, and its activations are bit-identical."""

    def __init__(self, cfg: Config, rank: int, world_size: int, lm_path: str | Path | None,
                 data_dir: str | Path | None, loop: bool = True):
        if lm_path is None or data_dir is None:
            raise MonosemError("ActivationBuffer needs lm_path and data_dir (or a source)")
        self.cfg = copy.deepcopy(cfg)
        self.cfg.data.dir = str(data_dir)
        self.rank, self.world_size, self.lm_path, self.loop = rank, world_size, str(lm_path), loop

    def contexts(self, state: dict | None) -> Iterator[Context]:
        from monosem.lm import load_lm
        from monosem.stream import TokenStream

        cfg, b, T = self.cfg, self.cfg.buffer, self.cfg.data.ctx_len
        stream = TokenStream.from_config(cfg, "train", self.rank, self.world_size, loop=self.loop)
        if stream.ctx_len != T:
            raise MonosemError(f"shards in {cfg.data.dir} have ctx_len {stream.ctx_len}, "
                               f"data.ctx_len says {T}")
        if state:
            stream.load_state_dict(state["stream"])
        n = state["contexts"] if state else 0
        device = producer_device(b.producer_device)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)  # no stray context on cuda:0 from every rank's producer
        lm = load_lm(self.lm_path, device=device)
        if lm.cfg.d_mlp != cfg.sae.d_in:
            raise MonosemError(f"the LM at {self.lm_path} has d_mlp {lm.cfg.d_mlp}, sae.d_in says "
                               f"{cfg.sae.d_in}")
        k, storage, contexts = b.tokens_per_context or T, DTYPES[b.dtype], iter(stream)
        while True:
            group = []
            for tokens, ctx_id in contexts:
                group.append((tokens, ctx_id, stream.state_dict()))
                if (n + len(group)) % b.producer_batch == 0:
                    break
            if not group:
                return
            tokens = torch.from_numpy(np.stack([g[0] for g in group]).astype(np.int64))   # [b, T]
            pos = torch.stack([keep_positions(cfg.run.seed, cid, T, k) for _, cid, _ in group])  # [b, k]
            with torch.inference_mode():
                acts = lm.mlp_acts(tokens.to(device))                           # [b, T, d_mlp]
                if k < T:
                    index = pos.to(device)[:, :, None].expand(-1, -1, acts.shape[2])
                    acts = acts.gather(1, index)                                # [b, k, d_mlp]
                acts = acts.to(storage).cpu()  # cast on the device: fewer bytes over PCIe
            for j, (_, ctx_id, st) in enumerate(group):
                n += 1
                yield acts[j], ctx_id * T + pos[j], {"stream": st, "contexts": n}


@functools.lru_cache(maxsize=4)
def synthetic_table(d_in: int) -> torch.Tensor:
    """The fixed random float32 [TABLE_ROWS, d_in] table SyntheticSource draws its vectors from."""
    return torch.randn(TABLE_ROWS, d_in, generator=torch.Generator().manual_seed(TABLE_ROWS))


def synthetic_vectors(ids: torch.Tensor, d_in: int) -> torch.Tensor:
    """The float32 [len(ids), d_in] vectors SyntheticSource produces for these provenance ids."""
    return synthetic_table(d_in)[ids % TABLE_ROWS]


@dataclass
class SyntheticSource:
    """No LM: this rank's i-th context is ctx_id = i * world_size + rank, and the vector of provenance
    id p is synthetic_vectors(p), so a vector separated from its id shows. n_contexts None = endless."""
    d_in: int
    ctx_len: int
    tokens_per_context: int = 0
    n_contexts: int | None = None
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    dtype: str = "fp32"

    def contexts(self, state: dict | None) -> Iterator[Context]:
        table = synthetic_table(self.d_in).to(DTYPES[self.dtype])  # cast once: the buffer is what is measured
        i = state["next"] if state else 0
        while self.n_contexts is None or i < self.n_contexts:
            ctx_id = i * self.world_size + self.rank
            ids = ctx_id * self.ctx_len + keep_positions(self.seed, ctx_id, self.ctx_len,
                                                         self.tokens_per_context)
            i += 1
            yield table[ids % TABLE_ROWS], ids, {"next": i}


# ---- the process ---------------------------------------------------------------------------------

class ConsumerGone(Exception):
    """The trainer process is gone (its pipe closed or our parent changed): stop and unlink its segment."""


@dataclass
class ProducerJob:
    """Everything the spawned producer needs (pickled to it), besides its two pipe ends."""
    source: Source
    segment: str               # shared-memory name
    spec: Spec                 # the segment's layout
    rank: int                  # for the process name
    parent_pid: int            # the trainer: if our parent changes, it died
    state: dict | None         # source state to resume from (None = the start)
    contexts_per_slot: int
    threads: int               # torch threads
    poll_s: float              # how often a waiting producer checks that the trainer lives
    nice: int = 0              # added to the process's niceness (on a CPU-only machine, see below)
    wait_threads: int = 1      # torch threads while the trainer waits for a slot (TRAINER_WAITING)


def name_process(rank: int) -> str:
    """Name this process `monosem-prod-<rank>` in /proc/self/comm (ps -e, top, pgrep; 15 bytes at most)
    and, if the optional `setproctitle` package is installed, its full command line in ps -f."""
    with suppress(ImportError):
        import setproctitle  # optional: not a dependency

        setproctitle.setproctitle(f"monosem producer rank {rank} (trainer pid {os.getppid()})")
    comm = f"monosem-prod-{rank}"[:15]
    with suppress(OSError, AttributeError):  # not Linux: keep the interpreter's name
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, ctypes.c_char_p(comm.encode()), 0, 0, 0)
    return comm


def failure(exc: BaseException) -> Failed:
    """A MonosemError is the user's (a corrupt shard, a wrong LM): its message alone. Anything else is a
    bug: keep the traceback."""
    if isinstance(exc, MonosemError):
        return Failed(str(exc), traceback.format_exc(), "user")
    return Failed(f"{type(exc).__name__}: {exc}", traceback.format_exc(), "unexpected")


def run_producer(job: ProducerJob, full_w: Connection, free_r: Connection) -> None:
    """Process entry point: fill slots until the stream ends, the consumer says stop, or it is gone.
    An exception goes to the consumer as a Failed message; the exit code is then 1."""
    # Ctrl-C and a launcher's SIGTERM reach the whole process group: they are the trainer's to handle
    # (it checkpoints, then stops us); we leave when told, or when the trainer is gone
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    name_process(job.rank)
    torch.set_num_threads(job.threads)
    if job.nice:
        with suppress(OSError):
            os.nice(job.nice)
    shared, gone, failed = SharedPool(job.spec, name=job.segment), False, False
    try:
        produce(job.source.contexts(job.state), shared, full_w, free_r, job.parent_pid,
                job.contexts_per_slot, job.poll_s, (job.threads, job.wait_threads))
    except ConsumerGone:
        gone = True  # nobody else will unlink the segment
    except BaseException as e:  # noqa: BLE001 - every failure must reach the trainer
        failed = True
        with suppress(Exception):
            full_w.send(failure(e))
    finally:
        shared.close(unlink=gone)
    if failed:
        sys.exit(1)


def produce(contexts: Iterator[Context], shared: SharedPool, full_w: Connection, free_r: Connection,
            parent_pid: int, contexts_per_slot: int, poll_s: float,
            threads: tuple[int, int] = (1, 1)) -> None:
    """Whole contexts into the block of each lent slot; a slot is announced with the source state
    after its last context. threads: torch threads (while the trainer steps, while it waits)."""
    h = shared.header
    while True:
        block = wait_free(free_r, h, parent_pid, poll_s)
        if block is None:  # stop
            return
        t0 = time.perf_counter()
        count, state, ended, write_s = fill_slot(contexts, shared, block, contexts_per_slot, threads)
        h[BUSY_S] += time.perf_counter() - t0
        h[WRITE_S] += write_s
        if count:
            h[VECTORS] += count
            h[SLOTS] += 1
            send(full_w, Full(block, count, state))
        if ended:
            send(full_w, End())
            return


def fill_slot(contexts: Iterator[Context], shared: SharedPool, block: int, n_contexts: int,
              threads: tuple[int, int] = (1, 1)) -> tuple[int, dict | None, bool, float]:
    """Up to n_contexts whole contexts into the block's rows, one contiguous run -> (vectors written,
    source state after the last one, stream ended, seconds spent writing). Before each context (a
    forward pass starts at the first of every producer_batch) the thread count follows the trainer:
    threads[1] while it waits for a slot, threads[0] while it steps."""
    start = block * shared.S
    count, state, ended, write_s, ids = 0, None, False, 0.0, []
    h = shared.header
    for _ in range(n_contexts):
        waiting = bool(h[TRAINER_WAITING])
        if torch.get_num_threads() != threads[waiting]:
            torch.set_num_threads(threads[waiting])
        item = next(contexts, None)
        if item is None:
            ended = True
            break
        acts, ctx_ids, state = item                                       # [k, d_in], [k]
        t0 = time.perf_counter()
        shared.acts[start + count:start + count + len(ctx_ids)].copy_(acts)  # casts to the storage dtype
        write_s += time.perf_counter() - t0
        ids.append(ctx_ids)
        count += len(ctx_ids)
        h[WAIT_THREAD_CONTEXTS] += waiting and threads[1] != threads[0]
    if count:
        shared.ids[start:start + count].copy_(torch.cat(ids))
    return count, state, ended, write_s


def wait_free(free_r: Connection, h: torch.Tensor, parent_pid: int, poll_s: float) -> int | None:
    """The block of the next lent slot (None = stop); blocks while none is lent."""
    t0 = time.perf_counter()
    h[WAITING] = 1
    while not free_r.poll(poll_s):
        if os.getppid() != parent_pid:
            raise ConsumerGone
    try:
        msg = free_r.recv()
    except (EOFError, OSError):
        raise ConsumerGone from None
    h[WAITING] = 0
    h[WAIT_S] += time.perf_counter() - t0
    if isinstance(msg, Stop):
        return None
    if not isinstance(msg, Lend):
        raise RuntimeError(f"producer: unexpected message {msg!r}")
    return msg.block


def send(full_w: Connection, msg: Full | End) -> None:
    """One message to the trainer; a closed pipe means it is gone."""
    try:
        full_w.send(msg)
    except OSError:  # BrokenPipeError: the consumer closed its end or died
        raise ConsumerGone from None
