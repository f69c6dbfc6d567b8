"""The shared-memory segment between a trainer rank and its producer process, and their pipe protocol.

Layout of one segment (/dev/shm/monosem_<trainer pid>_<hex>), R rows in blocks of S rows:

    header float64 [HEADER] | ids int64 [R] | acts [R, d_in] in the storage dtype (buffer.dtype)

The header is written by the producer (wait/busy/write seconds, vectors, slots, waiting flag), except
TRAINER_WAITING, which the trainer raises while it blocks on a slot (the producer then takes more
threads); the trainer reads the rest for its stats. A ring slot is one block of S rows that the trainer
lends.

Pipe protocol (typed messages, pickled by multiprocessing.Connection):
    trainer -> producer:  Lend(block) | Stop()
    producer -> trainer:  Full(block, count, state) | End() | Failed(message, traceback, kind)
Failed.kind is "user" for a MonosemError (a corrupt shard, a wrong LM: the message is the whole story)
and "unexpected" for anything else (the traceback is kept for the bug report).

    shared = SharedPool((S, R, d_in, "fp32"))                 # trainer: create (check_room first)
    shared = SharedPool(spec, name=shared.name)               # producer: attach
    shared.acts[rows], shared.ids[rows], shared.header[VECTORS]
    x = Staging().gather(shared.acts, rows, torch.device("cuda:0"))   # float32 [B, d_in] on the device
"""
from __future__ import annotations

import os
import secrets
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Literal

import numpy as np
import torch

from monosem.errors import MonosemError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHM_PREFIX = "monosem_"
# float64 header, producer-written: seconds waiting for a lent slot, vectors, slots, waiting flag,
# seconds filling slots (source + writes), seconds writing vectors into the pool rows, contexts taken
# while the trainer waited (with buffer.producer_wait_threads); consumer-written: TRAINER_WAITING, 1 while
# the trainer blocks on a slot
WAIT_S, VECTORS, SLOTS, WAITING, BUSY_S, WRITE_S, TRAINER_WAITING, WAIT_THREAD_CONTEXTS = range(8)
HEADER = 8

Spec = tuple[int, int, int, str]  # (S rows per block, R rows, d_in, dtype name)


# ---- messages ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lend:
    """Trainer -> producer: fill this block (one ring slot)."""
    block: int


@dataclass(frozen=True)
class Stop:
    """Trainer -> producer: exit now (the segment stays the trainer's to unlink)."""


@dataclass(frozen=True)
class Full:
    """Producer -> trainer: rows [block*S, block*S + count) hold whole contexts; `state` is the source
    state after the last of them (where a resumed producer starts)."""
    block: int
    count: int
    state: dict | None


@dataclass(frozen=True)
class End:
    """Producer -> trainer: a finite stream is exhausted; nothing follows."""


@dataclass(frozen=True)
class Failed:
    """Producer -> trainer: the producer stopped on an exception. kind "user": a MonosemError, whose
    message names the shard/file at fault; kind "unexpected": a bug, with its formatted traceback."""
    message: str
    traceback: str
    kind: Literal["user", "unexpected"]


# ---- sizes and room -------------------------------------------------------------------------------

def segment_bytes(spec: Spec) -> int:
    """Bytes of the segment of this spec."""
    S, R, d_in, dtype = spec
    return HEADER * 8 + R * 8 + R * d_in * DTYPES[dtype].itemsize


def _mem_available() -> int | None:
    """Host memory available for new allocations (Linux MemAvailable), None where unknown."""
    with suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def _size(n: float) -> str:
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
    raise AssertionError


def check_room(shm_bytes: int, host_bytes: int, pool_size: int) -> None:
    """Refuse a buffer that cannot fit, BEFORE anything is allocated: the segment in /dev/shm (else a
    SIGBUS later; containers often give /dev/shm only 64 MB) and the pool's bookkeeping in host memory."""
    advice = ("lower buffer.pool_size, buffer.n_slots, buffer.spare_fraction or buffer.slot_vectors, "
              "use buffer.dtype=bf16")
    if os.path.isdir("/dev/shm"):
        st = os.statvfs("/dev/shm")
        free = st.f_bavail * st.f_frsize
        if shm_bytes > free:
            raise MonosemError(
                f"buffer.pool_size = {pool_size} needs {shm_bytes:,} bytes ({_size(shm_bytes)}) of shared "
                f"memory, /dev/shm has {free:,} bytes ({_size(free)}) free: {advice}, or enlarge "
                f"/dev/shm (docker run --shm-size=...)")
    avail = _mem_available()
    if avail is not None and host_bytes > avail:
        raise MonosemError(
            f"buffer.pool_size = {pool_size} needs {host_bytes:,} bytes ({_size(host_bytes)}) of host "
            f"memory for the shuffle pool's bookkeeping, {avail:,} bytes ({_size(avail)}) are "
            f"available: {advice}")


# ---- the segment -----------------------------------------------------------------------------------

class SharedPool:
    """The mapped segment: header float64 [HEADER], ids int64 [R], acts [R, d_in] (torch views, plus
    numpy views acts_np/ids_np for scattered row moves). name None creates it (the trainer), a name
    attaches to it (the producer)."""

    def __init__(self, spec: Spec, name: str | None = None):
        S, R, d_in, dtype = self.spec = tuple(spec)
        sizes = [HEADER * 8, R * 8, R * d_in * DTYPES[dtype].itemsize]
        create = name is None
        if create:
            name = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
            self.shm = shared_memory.SharedMemory(name=name, create=True, size=sum(sizes))
        else:
            self.shm = shared_memory.SharedMemory(name=name)
        self.name, self.S, buf, off = name, S, self.shm.buf, np.cumsum([0] + sizes).tolist()
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


class Staging:
    """Drawn segment rows -> a float32 batch on the device. CPU: one index_select + cast. CUDA: a gather
    into one of two pinned host tensors, a non-blocking copy, an event behind it (see monosem.buffer)."""

    def __init__(self) -> None:
        self.host: list[torch.Tensor | None] = [None, None]  # pinned [capacity, d_in], storage dtype
        self.copied: list = [None, None]                      # torch.cuda.Event behind each one's copy
        self.turn = 0

    def gather(self, acts: torch.Tensor, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        """float32 [len(rows), d_in] on device, of acts [R, d_in] (the segment) at rows [B]."""
        if device.type != "cuda":
            return acts.index_select(0, rows).to(device).float()     # [B, d_in]: the one copy
        i, self.turn = self.turn, 1 - self.turn
        if self.copied[i] is not None:
            self.copied[i].synchronize()  # the copy that last read host[i] is done: refill it
        host = self.host[i]
        if host is None or len(host) < len(rows) or host.dtype != acts.dtype:
            host = self.host[i] = torch.empty(len(rows), acts.shape[1], dtype=acts.dtype, pin_memory=True)
        staged = torch.index_select(acts, 0, rows, out=host[:len(rows)])  # [B, d_in] pinned
        x = staged.to(device, non_blocking=True)
        self.copied[i] = torch.cuda.Event()
        self.copied[i].record(torch.cuda.current_stream(device))
        return x.float()                                               # cast on the device
