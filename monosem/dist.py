"""Everything distributed: the only module that imports accelerate, torch.distributed or deepspeed.

Launch any trainer with `accelerate launch --multi_gpu --num_processes N --main_process_port 0 -m ...`
(also on CPU: the script asks for cpu=True itself) or torchrun. Without a launcher all helpers are
no-ops / identities, so the same code runs in one plain process. DeepSpeed ZeRO 1/2/3 (the SAE):
`accelerate launch --config_file launch/accelerate-deepspeed-cpu2.yaml -m monosem.train_sae CFG
--dist.deepspeed_stage=2`; the engine-independent helpers at the bottom (edit_params_, model_state_dict,
optimizer_state_dict, load_optimizer_state_, gathered_params) hide where the fp32 weights and Adam states live.

    acc = make_accelerator(cfg)                     # checks the launch really is distributed
    model, opt = acc.prepare(model, opt)
    total = all_reduce_sum(torch.tensor([n]))       # identity in a single process
    edit_params_(model, opt, ["W_dec"], lambda p, s: p["W_dec"].mul_(2))   # any engine; collective
    teardown(acc)                                   # clean exit (no gloo SIGABRT)
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import os
from datetime import timedelta
from typing import Callable

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


def _deepspeed_kwargs(cfg: Config) -> dict:
    """Accelerator kwargs for DeepSpeed ZeRO stage cfg.dist.deepspeed_stage, with the workarounds that
    accelerate 1.15 + DeepSpeed 0.19 need (ENVIRONMENT.md section 2). A DeepSpeed JSON named by the launch
    (`deepspeed_config_file`) supplies the ZeRO tuning; batch size, clipping and bf16 come from cfg."""
    stage, ts = cfg.dist.deepspeed_stage, cfg.train_sae
    n_saes = len(cfg.sweep.l1_coeff or [0]) * len(cfg.sweep.n_features or [0])
    if n_saes > 1:
        raise MonosemError(f"dist.deepspeed_stage = {stage} with a [sweep] of {n_saes} SAEs: accelerate's "
                           "DeepSpeed plugin drives one model per Accelerator; train them in separate runs "
                           "or use dist.deepspeed_stage = 0 (DDP)")
    if stage not in (1, 2, 3):
        raise MonosemError(f"dist.deepspeed_stage must be 0 (DDP), 1, 2 or 3; got {stage}")
    launched = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if launched is not None and int(launched) != stage:
        raise MonosemError(f"the launcher asked for ZeRO stage {launched} (--zero_stage) but "
                           f"dist.deepspeed_stage = {stage}: make them agree")
    import accelerate
    from accelerate.utils import DeepSpeedPlugin

    DeepSpeedPlugin.set_deepspeed_weakref = lambda self: None  # would import transformers (not installed)
    plugin = DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=1,
                             gradient_clipping=float(ts.grad_clip))
    where = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
    if plugin.zero_stage != stage:
        raise MonosemError(f"{where} says ZeRO stage {plugin.zero_stage} but dist.deepspeed_stage = {stage}")
    ds = plugin.deepspeed_config
    for key in ("optimizer", "scheduler", "fp16"):
        if key in ds and (key != "fp16" or str(ds[key].get("enabled")).lower() == "true"):
            raise MonosemError(f"{where}: remove the `{key}` section (monosem passes its own torch Adam "
                               "and LR schedule; a DeepSpeed optimizer JIT-builds fused_adam; fp16 is unsupported)")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # plain torchrun: accelerate would ignore the plugin
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # deepspeed.init_distributed JIT-builds a shared-memory allreduce op (~30 s) that training never uses
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        # else accelerate keeps num_processes == 1 on CPU while DeepSpeed runs a world of N
        accelerate.PartialState(backend="gloo", timeout=timedelta(seconds=cfg.dist.timeout_s))
    ds.update(train_micro_batch_size_per_gpu=ts.batch_size, train_batch_size="auto",
              gradient_accumulation_steps=1, gradient_clipping=float(ts.grad_clip),
              zero_allow_untested_optimizer=True)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bool(ts.bf16)}
    return {"deepspeed_plugin": plugin, "mixed_precision": "bf16" if ts.bf16 else "no"}


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


# ---- engine-independent access to weights and optimizer state (plain / DDP / DeepSpeed ZeRO) -----
# Under ZeRO the fp32 master weights and Adam moments live in flat buffers partitioned over ranks, and
# the module's own parameters are only the low-precision copy the forward uses (ZeRO-3: partitioned too,
# empty outside forward). Editing `param.data` is therefore not enough: these helpers gather full fp32
# tensors, hand them over as plain dicts, and write both copies back. Every one of them is collective
# under ZeRO (call it on all ranks, in the same order); under DDP they touch only local memory.

def zero_stage(model) -> int:
    """The ZeRO stage of an accelerate-prepared model (0: plain module or DDP)."""
    return int(model.zero_optimization_stage()) if hasattr(model, "zero_optimization_stage") else 0


def unwrap(model) -> torch.nn.Module:
    """The user's module inside a DDP wrapper or DeepSpeed engine."""
    return getattr(model, "module", model)


def _torch_optimizer(optimizer):
    """The torch optimizer at the bottom of accelerate's / DeepSpeed's wrappers (under ZeRO its
    parameters are the flat fp32 partitions)."""
    while not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _zero_state_keys(optimizer) -> list[str]:
    """Per-element state keys of the flat partitions (exp_avg, exp_avg_sq, ...); [] before the first step."""
    inner = _torch_optimizer(optimizer)
    for flat, state in inner.state.items():
        return [k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape]
    return []


@contextlib.contextmanager
def gathered_params(model):
    """Read-only access to the full parameters of the unwrapped module outside forward (ZeRO-3: gathered
    on every rank for the duration; collective). Yields the module."""
    module = unwrap(model)
    if zero_stage(model) == 3:
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield module
    else:
        yield module


@torch.no_grad()
def edit_params_(model, optimizer, names: list[str], fn: Callable[[dict, dict], None], *,
                 states: bool = True) -> None:
    """fn(params, states) edits, in place, full fp32 tensors of the named parameters ({name: tensor}) and
    their optimizer states ({name: {"exp_avg": tensor, ...}}, names without state yet left out; {} when
    states=False); the results become the parameters and optimizer state on every engine.

    DDP / plain: fn gets the parameters themselves and torch's own state dicts. ZeRO 1/2/3: full copies,
    gathered from the partitions, written back to the fp32 master partitions, the Adam partitions and
    the module's (low-precision / partitioned) parameters. fn must compute the same on every rank."""
    named = dict(unwrap(model).named_parameters())
    if zero_stage(model) == 0:
        opt_state = _torch_optimizer(optimizer).state if states else {}
        fn({n: named[n].data for n in names},
           {n: opt_state[named[n]] for n in names if named[n] in opt_state})
        return
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                                 safe_set_full_fp32_param, safe_set_full_optimizer_state)
    from deepspeed.runtime.zero import GatheredParameters

    params = {n: safe_get_full_fp32_param(named[n]).clone() for n in names}
    keys = _zero_state_keys(optimizer) if states else []
    opt_states = {n: {k: safe_get_full_optimizer_state(named[n], k).clone() for k in keys}
                  for n in names} if keys else {}
    fn(params, opt_states)
    for n, value in params.items():
        safe_set_full_fp32_param(named[n], value)
        for k, v in opt_states.get(n, {}).items():
            safe_set_full_optimizer_state(named[n], v, k)
    # the forward's copy: ZeRO 1/2 hold it whole on every rank; ZeRO-3 gathers, rank 0 writes,
    # and leaving the context broadcasts it and re-partitions
    with GatheredParameters([named[n] for n in names], modifier_rank=0):
        for n, value in params.items():
            named[n].data.copy_(value)


def model_state_dict(model) -> dict[str, torch.Tensor]:
    """The unwrapped module's state dict with full weights (ZeRO: the fp32 masters, gathered; collective)."""
    module = unwrap(model)
    if zero_stage(model) == 0:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(module.named_parameters())
    return {k: (safe_get_full_fp32_param(params[k]).clone() if k in params else v.detach().clone())
            for k, v in module.state_dict(keep_vars=True).items()}


def optimizer_state_dict(optimizer, model=None) -> dict:
    """The full optimizer state in torch's `Optimizer.state_dict()` format (call on every rank). Under ZeRO
    (pass the prepared model) the Adam moments are gathered from the partitions and numbered in the
    order of model.parameters(), as a torch Adam built on them would; so a checkpoint written under
    DDP or any ZeRO stage resumes under any other (same parameter order)."""
    if model is None and _torch_optimizer(optimizer) is not getattr(optimizer, "optimizer", optimizer):
        raise MonosemError("optimizer_state_dict of a DeepSpeed optimizer needs the prepared model too")
    if model is None or zero_stage(model) == 0:
        return optimizer.state_dict()
    from deepspeed.utils import safe_get_full_optimizer_state

    inner, keys = _torch_optimizer(optimizer), _zero_state_keys(optimizer)
    params = list(unwrap(model).parameters())
    state = {}
    if keys:
        step = next(iter(inner.state.values()))["step"]
        state = {i: {"step": step.clone(), **{k: safe_get_full_optimizer_state(p, k).clone() for k in keys}}
                 for i, p in enumerate(params)}
    group = {k: v for k, v in inner.param_groups[0].items() if k != "params"}
    return {"state": state, "param_groups": [{**group, "params": list(range(len(params)))}]}


def load_optimizer_state_(model, optimizer, state: dict) -> None:
    """Load a state written by optimizer_state_dict (call on every rank; collective under ZeRO)."""
    if zero_stage(model) == 0:
        optimizer.load_state_dict(state)
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    params, groups = list(unwrap(model).parameters()), state["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != len(params):
        raise MonosemError(f"optimizer state: {len(groups)} param groups with "
                           f"{[len(g['params']) for g in groups]} parameters; this model has 1 group of "
                           f"{len(params)}")
    inner = _torch_optimizer(optimizer)
    for group in inner.param_groups:
        group.update({k: v for k, v in groups[0].items() if k != "params"})
    if not state["state"]:
        return
    _init_zero_adam_state(optimizer)
    for i, p in enumerate(params):
        for k, v in state["state"][i].items():
            if k != "step":
                safe_set_full_optimizer_state(p, v.to(torch.float32), k)
    for flat_state in inner.state.values():
        flat_state["step"] = state["state"][0]["step"].clone().to(torch.float32)


def _init_zero_adam_state(optimizer) -> None:
    """Create torch Adam's (lazy) state on the flat fp32 partitions, as its first step would, and link it
    to the parameters' fragments (ZeRO 1/2 link it only after a step), so that it can be loaded."""
    inner, zero_opt = _torch_optimizer(optimizer), getattr(optimizer, "optimizer", optimizer)
    # ZeRO-3 detaches its partitions from the torch optimizer's param_groups between steps
    flats = next((getattr(zero_opt, a) for a in ("fp32_partitioned_groups_flat",
                  "single_partition_of_fp32_groups", "fp32_groups_flat_partition") if hasattr(zero_opt, a)),
                 None)
    if flats is None:
        raise MonosemError(f"cannot load optimizer state into {type(zero_opt).__name__}: unknown ZeRO optimizer")
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if inner.param_groups[0].get("amsgrad") else ())
    for flat in flats:
        if not inner.state.get(flat):
            inner.state[flat] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(flat) for k in keys}}
    if hasattr(zero_opt, "_lazy_init_hp_params_optimizer_state"):
        zero_opt._lazy_init_hp_params_optimizer_state()
