"""Activation producer: the process that runs the frozen LM and writes activations into shared memory.

ActivationBuffer (monosem.buffer) spawns one per rank; it is not started by hand. A *source* turns a
position in a stream into activation vectors, one context at a time: LMSource (TokenStream -> frozen LM
-> MLP post-activation, optionally a seeded random subset of positions per context) or SyntheticSource
(no LM: for tests and for measuring the ring + pool alone). The producer writes whole contexts straight
into the block of pool rows the consumer lent as a ring slot (SharedPool: the segment both sides map).

    src = LMSource(cfg, rank=0, world_size=1, lm_path="runs/tiny/lm", data_dir="runs/tiny/data")
    for acts, ids, state in src.contexts(None):   # [k, d_in] storage dtype, [k] int64, state after it
        break
"""
from __future__ import annotations

import copy
import functools
import os
import secrets
import signal
import sys
import time
import traceback
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Iterator

import numpy as np
import torch

from monosem.errors import MonosemError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHM_PREFIX = "monosem_"
# producer-written float64 header: seconds waiting for a lent slot, vectors, slots, waiting flag,
# seconds filling slots (source + writes), seconds writing vectors into the pool rows
WAIT_S, VECTORS, SLOTS, WAITING, BUSY_S, WRITE_S = range(6)
HEADER = 8


class SharedPool:
    """The segment: header float64 [8] | ids int64 [R] | acts [R, d_in] in the storage dtype, R rows in
    blocks of S (a ring slot lends one block). spec = (S, R, d_in, dtype name)."""

    def __init__(self, spec: tuple, name: str | None = None):
        S, R, d_in, dtype = self.spec = spec
        sizes = [HEADER * 8, R * 8, R * d_in * DTYPES[dtype].itemsize]
        create = name is None
        if create:        # consumer
            _check_room(sum(sizes))
            name = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
            self.shm = shared_memory.SharedMemory(name=name, create=True, size=sum(sizes))
        else:             # producer
            self.shm = shared_memory.SharedMemory(name=name)
        self.name, buf, off = name, self.shm.buf, np.cumsum([0] + sizes).tolist()
        self.header = torch.frombuffer(buf, dtype=torch.float64, count=HEADER)
        self.ids = torch.frombuffer(buf, dtype=torch.int64, count=R, offset=off[1])   # [R]
        self.acts = torch.frombuffer(buf, dtype=DTYPES[dtype], count=R * d_in, offset=off[2]
                                     ).view(R, d_in)                            # [R, d_in]
        # numpy views for scattered row moves: measured ~2x faster than torch's index_copy_
        self.acts_np, self.ids_np = bits(self.acts), self.ids.numpy()
        # map every page now: the first touch of a page by a process costs a page fault (~3x slower writes,
        # ~8x slower gathers while it lasts); the producer reads one element per page (restored rows live)
        if create:
            self.acts.zero_()
            self.ids.zero_()
        else:
            self.acts.view(-1)[::4096 // self.acts.element_size()].sum()
        self.S = S

    def close(self, unlink: bool) -> None:
        """Drop the views, unmap; unlink the name (first: that is what frees /dev/shm)."""
        self.header = self.ids = self.acts = self.acts_np = self.ids_np = None
        if unlink:
            with suppress(FileNotFoundError):
                self.shm.unlink()
        with suppress(BufferError):  # a view still alive elsewhere: the mapping goes with the process
            self.shm.close()


def bits(t: torch.Tensor) -> np.ndarray:
    """A numpy view of t's bytes as same-width integers (numpy has no bfloat16)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()


def _check_room(size: int) -> None:
    """Fail early instead of a SIGBUS later: containers often give /dev/shm only 64 MB."""
    if os.path.isdir("/dev/shm"):
        st = os.statvfs("/dev/shm")
        if size > st.f_bavail * st.f_frsize:
            raise MonosemError(
                f"the activation buffer needs {size / 2**20:.0f} MiB of shared memory, /dev/shm has "
                f"{st.f_bavail * st.f_frsize / 2**20:.0f} MiB free: lower buffer.pool_size, "
                f"buffer.n_slots, buffer.spare_fraction or buffer.slot_vectors, use buffer.dtype=bf16, "
                f"or enlarge /dev/shm (docker run --shm-size=...)")


Context = tuple[torch.Tensor, torch.Tensor, dict]  # acts [k, d_in], provenance ids [k], state after it
TABLE_ROWS = 4093  # prime: a synthetic vector is row (id mod TABLE_ROWS) of a fixed random table


def keep_positions(seed: int, ctx_id: int, ctx_len: int, k: int) -> torch.Tensor:
    """Sorted positions kept from context `ctx_id` (all if k is 0 or >= ctx_len): int64 [k].
    Seeded by (run seed, ctx_id) alone, so a resumed producer re-derives exactly the same ones."""
    if k <= 0 or k >= ctx_len:
        return torch.arange(ctx_len, dtype=torch.int64)
    rng = np.random.default_rng([seed % 2**63, ctx_id])
    return torch.from_numpy(np.sort(rng.choice(ctx_len, size=k, replace=False)).astype(np.int64))


def producer_device(setting: str, rank: int) -> str:
    """`auto`: cuda:<local rank> when there is a GPU, else cpu."""
    if setting == "auto" and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    return "cpu"


class LMSource:
    """This rank's disjoint TokenStream -> frozen LM -> hook-layer MLP post-activations.

    Forward passes take producer_batch contexts aligned to multiples of producer_batch counted from the
    start of the stream (the count is part of the state), so a resumed producer batches contexts exactly
    as an uninterrupted one did, and its activations are bit-identical."""

    def __init__(self, cfg, rank: int, world_size: int, lm_path, data_dir, loop: bool = True):
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
        device = producer_device(b.producer_device, self.rank)
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
                acts = acts.to(storage).cpu()
            for j, (_, ctx_id, st) in enumerate(group):
                n += 1
                yield acts[j], ctx_id * T + pos[j], {"stream": st, "contexts": n}


@functools.lru_cache(maxsize=4)
def synthetic_table(d_in: int) -> torch.Tensor:
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


def run_producer(source, name: str, spec: tuple, full_w, free_r, parent_pid: int,
                 state: dict | None, contexts_per_slot: int, threads: int, poll_s: float) -> None:
    """Process entry point: fill slots until the stream ends, the consumer says stop, or it is gone.
    An exception goes to the consumer as its formatted traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's: it checkpoints, stops us
    torch.set_num_threads(threads)
    shared, gone, failed = SharedPool(spec, name=name), False, False
    try:
        produce(source.contexts(state), shared, full_w, free_r, parent_pid, contexts_per_slot, poll_s)
    except ConsumerGone:
        gone = True  # nobody else will unlink the segment
    except BaseException:
        failed = True
        with suppress(Exception):
            full_w.send(("error", traceback.format_exc()))
    finally:
        shared.close(unlink=gone)
    if failed:
        sys.exit(1)


def produce(contexts: Iterator[Context], shared: SharedPool, full_w, free_r, parent_pid: int,
            contexts_per_slot: int, poll_s: float) -> None:
    """Whole contexts into the block of each lent slot; a slot is announced with the source state
    after its last context."""
    h = shared.header
    while True:
        block = wait_free(free_r, h, parent_pid, poll_s)
        if block is None:  # stop
            return
        t0 = time.perf_counter()
        count, state, ended, write_s = fill_slot(contexts, shared, block, contexts_per_slot)
        h[BUSY_S] += time.perf_counter() - t0
        h[WRITE_S] += write_s
        if count:
            h[VECTORS] += count
            h[SLOTS] += 1
            send(full_w, ("slot", block, count, state))
        if ended:
            send(full_w, ("end",))
            return


def fill_slot(contexts: Iterator[Context], shared: SharedPool, block: int,
              n_contexts: int) -> tuple[int, dict | None, bool, float]:
    """Up to n_contexts whole contexts into the block's rows, one contiguous run -> (vectors written,
    source state after the last one, stream ended, seconds spent writing)."""
    start = block * shared.S
    count, state, ended, write_s, ids = 0, None, False, 0.0, []
    for _ in range(n_contexts):
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
    if count:
        shared.ids[start:start + count].copy_(torch.cat(ids))
    return count, state, ended, write_s


def wait_free(free_r, h: torch.Tensor, parent_pid: int, poll_s: float) -> int | None:
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
    return msg


def send(full_w, msg: tuple) -> None:
    try:
        full_w.send(msg)
    except OSError:  # BrokenPipeError: the consumer closed its end or died
        raise ConsumerGone from None
