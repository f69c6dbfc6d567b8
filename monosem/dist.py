"""Everything distributed: the only module that imports accelerate or torch.distributed.

Launch any trainer with `accelerate launch --multi_gpu --num_processes N --main_process_port 0 -m ...`
(also on CPU: the script asks for cpu=True itself) or torchrun. Without a launcher all helpers are
no-ops / identities, so the same code runs in one plain process.

    acc = make_accelerator(cfg)                     # checks the launch really is distributed
    model, opt = acc.prepare(model, opt)
    total = all_reduce_sum(torch.tensor([n]))       # identity in a single process
    teardown(acc)                                   # clean exit (no gloo SIGABRT)
"""
from __future__ import annotations

import gc
import os
from datetime import timedelta

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
        kwargs.update(_deepspeed_kwargs(cfg))
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


def _deepspeed_kwargs(cfg: Config) -> dict:
    """Hook for the DeepSpeedPlugin (ENVIRONMENT.md section 2 workarounds go here)."""
    raise MonosemError(f"dist.deepspeed_stage = {cfg.dist.deepspeed_stage}: DeepSpeed is not wired in yet")


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
    idx = choose(all_values).to(torch.int64)                               # [n]
    sizes = torch.tensor([int(s) for s in gather_objects(int(rows.shape[0]))])
    start = int(sizes[: rank()].sum())
    mine = (idx >= start) & (idx < start + rows.shape[0])
    out = rows.new_zeros((idx.shape[0], *rows.shape[1:]))                 # [n, d]
    out[mine] = rows[idx[mine] - start]
    return all_reduce_sum(out)


def optimizer_state_dict(optimizer) -> dict:
    """The full optimizer state (call on every rank: under ZeRO it will have to be gathered)."""
    return optimizer.state_dict()


def resample_optimizer_(optimizer, fn) -> None:
    """Run fn(state) on the optimizer's per-parameter state ({param: {"exp_avg": ..., ...}}) to reset
    resampled rows in place (under ZeRO the state is partitioned: the DeepSpeed path goes here)."""
    fn(getattr(optimizer, "optimizer", optimizer).state)
