"""Launch state and collectives: with monosem.zero (DeepSpeed plumbing), the only modules that import
accelerate or torch.distributed.

Launch any trainer with `accelerate launch --multi_gpu --num_processes N --main_process_port 0 -m monosem
VERB ...` (also on CPU: the code asks accelerate for cpu=True itself) or torchrun. Without a launcher all
helpers are no-ops / identities, so the same code runs in one plain process.

    acc = make_accelerator(cfg)                     # checks the launch really is distributed
    model, opt = acc.prepare(model, opt)
    total = all_reduce_sum(torch.tensor([n]))       # identity in a single process
    with guard(acc): ...                            # success: clean teardown (no gloo SIGABRT); failure:
                                                    # abort, every rank exits within seconds
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
import traceback
from contextlib import suppress
from datetime import timedelta
from pathlib import Path
from typing import Iterator, NoReturn

import torch
import torch.distributed as tdist

from monosem.config import Config
from monosem.errors import MonosemError


def make_accelerator(cfg: Config, *, deepspeed: bool = False, mixed_precision: str = "no"):
    """An `accelerate.Accelerator` with a short collective timeout (cfg.dist.timeout_s), on CPU when
    there is no GPU; raises if the launcher started N processes but each one sees a world of 1."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist.timeout_s))]
    kwargs: dict = dict(mixed_precision=mixed_precision, kwargs_handlers=handlers)
    if deepspeed:
        from monosem.zero import deepspeed_kwargs

        kwargs.update(deepspeed_kwargs(cfg))
    elif "ACCELERATE_CONFIG_DS_FIELDS" in os.environ:  # set by accelerate's DeepSpeed launcher only
        raise MonosemError("launched with DeepSpeed (accelerate launch --use_deepspeed or a DEEPSPEED "
                           f"config) but dist.deepspeed_stage = {cfg.dist.deepspeed_stage}: pass "
                           "--dist.deepspeed_stage=1|2|3 (train-sae), or launch with --multi_gpu for DDP")
    else:
        # without cpu=True, a GPU-less multi-process launch silently gives every rank a world of 1
        kwargs["cpu"] = not torch.cuda.is_available()
    accelerator = Accelerator(**kwargs)
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise MonosemError(
            f"the launcher started WORLD_SIZE={expected} processes but accelerate sees "
            f"{accelerator.num_processes} (distributed type {accelerator.distributed_type}): each rank "
            "would train alone without gradient sync. Launch with `accelerate launch --multi_gpu "
            "--num_processes N` or torchrun (not `accelerate launch --cpu`), or set ACCELERATE_USE_CPU=1")
    return accelerator


def warn_emulated_bf16(device: torch.device, field: str, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Say once (rank 0) when bf16 is asked for on a CPU without bf16 instructions: torch emulates it
    there, ~35x slower than fp32 on an AVX2 machine. Returns whether it warned."""
    if device.type != "cpu" or not is_main():
        return False
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return False
    if any(f in flags for f in ("avx512_bf16", "amx_bf16")):
        return False
    print(f"monosem: warning: {field} = true, but this CPU has no bf16 instructions (no avx512_bf16 or "
          f"amx_bf16 in {cpuinfo}): bf16 is emulated, ~35x slower than fp32 here", file=sys.stderr)
    return True


def teardown(accelerator, *objects) -> None:
    """Shut down cleanly: drop the references to the DDP-wrapped model/optimizer (which hold the
    process group), free accelerate's copies, destroy the group, collect. Without this, ~10% of
    2-process gloo runs abort at exit (`terminate called without an active exception`).
    Callers must also `del` their own references to wrapped objects before calling."""
    del objects
    if is_distributed():
        tdist.barrier()
    accelerator.free_memory()
    accelerator.end_training()
    gc.collect()
    from accelerate.state import AcceleratorState

    # so that a later Accelerator in this process (tests, quickstart) starts from a clean state
    AcceleratorState._reset_state(reset_partial_state=True)


# ---- small helpers: identities when not distributed -------------------------------------------

def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this node (set by torchrun / accelerate launch)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def cpu_threads(setting: int) -> int:
    """torch threads of a CPU-only trainer process: `setting` (train_sae.threads), or 0 = this node's
    cores divided among its local processes."""
    return setting or max(1, (os.cpu_count() or 1) // local_world_size())


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns t."""
    if is_distributed():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks, in place; returns t."""
    if is_distributed():
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, in rank order; first dims may differ per rank."""
    if not is_distributed():
        return t
    sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world_size())]
    tdist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device))
    n_max = int(max(s.item() for s in sizes))
    padded = t.new_zeros((n_max, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    tdist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite t with rank src's values, in place; returns t."""
    if is_distributed():
        tdist.broadcast(t, src=src)
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank src's picklable object on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: object) -> list:
    """Every rank's picklable object, in rank order, on every rank ([obj] when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def any_flags(flags: list[bool]) -> list[bool]:
    """Each flag OR-ed over ranks, so that every rank takes the same branch (stop, diverged...)."""
    t = all_reduce_max(torch.tensor([float(bool(f)) for f in flags], dtype=torch.float64))
    return [bool(v) for v in t.tolist()]


def mean_float(x: float) -> float:
    """The mean of a Python number over ranks."""
    return all_reduce_sum(torch.tensor([float(x)], dtype=torch.float64)).item() / world_size()


def gather_chosen(values: torch.Tensor, rows: torch.Tensor, choose) -> torch.Tensor:
    """Pick rows from the union of every rank's `rows` [N_r, d] without gathering them all.

    values [N_r] are all-gathered (rank order), `choose(all_values) -> idx [n]` runs on every rank
    (it must be deterministic), and each chosen row is contributed by the rank that holds it
    (the others add zeros, so the sum is exact). Returns [n, d], the same on every rank."""
    all_values = all_gather_cat(values)                                    # [sum N_r]
    idx = choose(all_values).to(torch.int64).cpu()                         # [n]
    sizes = torch.tensor([int(s) for s in gather_objects(int(rows.shape[0]))])
    start = int(sizes[: rank()].sum())
    mine = (idx >= start) & (idx < start + rows.shape[0])
    out = rows.new_zeros((idx.shape[0], *rows.shape[1:]))                 # [n, d]
    out[mine.to(rows.device)] = rows[(idx[mine] - start).to(rows.device)]
    return all_reduce_sum(out)




# ---- failing fast: one rank's error stops every rank within seconds, its message first ----------
# A rank that fails would otherwise leave the others waiting in their next collective for the whole
# timeout (dist.timeout_s), and teardown's barrier would do the same. Instead the failing rank writes its
# message to the rendezvous store and exits at once; its closed connections make the others' collectives
# fail within milliseconds, and they read the store to say which rank failed, or was lost without a word.
_DOWN = "monosem/down/"


def _store():
    """The rendezvous key-value store, with a short timeout (None when there is none)."""
    try:
        store = tdist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=2))
        return store
    except Exception:  # noqa: BLE001 - no store, or its host is gone
        return None


def _origin(store, me: int) -> tuple[int, str] | None:
    """(rank, message) of another rank that failed on its own (not as a consequence), if any."""
    for r in range(world_size()):
        try:
            if r != me and store.check([f"{_DOWN}{r}"]):
                kind, msg = store.get(f"{_DOWN}{r}").decode().split("|", 1)
                if kind == "origin":
                    return r, msg
        except Exception:  # noqa: BLE001
            return None
    return None


def failure_message(exc: BaseException) -> tuple[str, bool]:
    """(what to tell the user, whether this rank's failure is its own): a collective that broke because
    another rank failed or vanished is explained by naming that rank."""
    from monosem.errors import MonosemError

    me, store = rank(), _store()
    own = (isinstance(exc, MonosemError) or not isinstance(exc, (tdist.DistError, RuntimeError))
           or not any(w in str(exc) for w in ("Connection", "closed", "peer", "Timed out", "recv",
                                              "send", "Gloo", "gloo", "NCCL", "timed out")))
    text = str(exc) if isinstance(exc, MonosemError) else "".join(traceback.format_exception(exc)).strip()
    if own:
        return text, True
    if store is None:
        return (f"lost contact with the other ranks (the rendezvous store is gone: rank 0's node "
                f"or the launcher died); {text.splitlines()[-1] if text else ''}"), False
    with suppress(Exception):
        store.set(f"{_DOWN}{me}", f"consequence|{text[:2000]}")
    deadline = time.monotonic() + 2.0  # give a failing rank's report (or the others') time to land
    while time.monotonic() < deadline:
        origin = _origin(store, me)
        if origin is not None:
            return f"stopping because rank {origin[0]} failed: {origin[1]}", False
        time.sleep(0.1)
    silent = [r for r in range(world_size()) if r != me and not _check(store, r)]
    if silent:
        return (f"lost rank {', '.join(map(str, silent))} (killed, out of memory, or its node went "
                f"down) at a collective: {text.splitlines()[-1] if text else ''}"), False
    return text, False


def _check(store, r: int) -> bool:
    try:
        return bool(store.check([f"{_DOWN}{r}"]))
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def guard(accelerator) -> Iterator[None]:
    """Run a trainer's body: on success tear down cleanly; on an error in a multi-process run abort at
    once (no barrier: every rank exits within seconds); in one process tear down and re-raise."""
    try:
        yield
    except BaseException as e:
        if is_distributed():
            abort(e)
        teardown(accelerator)
        raise
    teardown(accelerator)


def abort(exc: BaseException) -> NoReturn:
    """This rank failed (exc): report it to the other ranks and to the user, and exit now, without any
    barrier or teardown. Exit code 2 for a MonosemError (bad input, dead producer...), else 1."""
    from monosem.errors import MonosemError

    message, own = failure_message(exc)
    store = _store()
    if own and store is not None:
        with suppress(Exception):
            store.set(f"{_DOWN}{rank()}", f"origin|{message[:4000]}")
    print(f"monosem: error: rank {rank()}: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2 if isinstance(exc, MonosemError) or not own else 1)
