"""DeepSpeed ZeRO plumbing: the Accelerator kwargs for a ZeRO stage, and engine-independent access to the
SAE's weights and Adam state (plain module, DDP, or ZeRO 1/2/3). With monosem.dist, the only modules that
import accelerate, torch.distributed or deepspeed.

    kwargs = deepspeed_kwargs(cfg)                  # dist.make_accelerator does this for dist.deepspeed_stage > 0
    edit_params_(model, opt, ["W_dec"], lambda p, s: p["W_dec"].mul_(2))   # any engine; collective under ZeRO
    tensors = model_state_dict(model); opt_state = optimizer_state_dict(opt, model)
"""
from __future__ import annotations

import contextlib
import importlib
import os
from datetime import timedelta
from typing import Callable, Iterator

import torch

from monosem.config import Config
from monosem.errors import MonosemError


def deepspeed_kwargs(cfg: Config) -> dict:
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



# ---- engine-independent access to weights and optimizer state (plain / DDP / DeepSpeed ZeRO) -----
# Under ZeRO the fp32 master weights and Adam moments live in flat buffers partitioned over ranks, and
# the module's own parameters are only the low-precision copy the forward uses (ZeRO-3: partitioned too,
# empty outside forward). Editing `param.data` is therefore not enough: these helpers gather full fp32
# tensors, hand them over as plain dicts, and write both copies back. Every one of them is collective
# under ZeRO (call it on all ranks, in the same order); under DDP they touch only local memory.

def zero_stage(model) -> int:
    """The ZeRO stage of an accelerate-prepared model (0: plain module or DDP)."""
    return int(model.zero_optimization_stage()) if is_engine(model) else 0


def is_engine(model) -> bool:
    """Whether `model` is a DeepSpeed engine (any ZeRO stage), not a plain module or a DDP wrapper."""
    return hasattr(model, "zero_optimization_stage")


def backward(accelerator, model, loss: torch.Tensor) -> None:
    """Gradients of loss on any engine. Under DeepSpeed accelerate's backward also takes the optimizer
    step; the engine's own backward does not, so the trainer can check the loss on every rank first."""
    if is_engine(model):
        model.backward(loss)
    else:
        accelerator.backward(loss)


def step(accelerator, model, optimizer, grad_clip: float) -> None:
    """Clip (DeepSpeed: its engine clips, per its config), step and clear the gradients on any engine."""
    if is_engine(model):
        model.step()
        return
    if grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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
def gathered_params(model) -> Iterator[torch.nn.Module]:
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
