"""`train(cfg)`: sparse autoencoder(s) on streamed MLP activations, data parallel, one visible loop.

    monosem train-sae configs/quickstart.toml [--resume] [--section.key=value ...]
    accelerate launch --config_file launch/accelerate-cpu2.yaml -m monosem train-sae configs/tiny.toml
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m monosem train-sae configs/tiny.toml

Each rank runs its own producer process on disjoint shards (monosem.buffer); DDP all-reduces the
gradients, so the global batch is batch_size x processes. Every `[sweep]` entry is one more SAE trained
on the very same batches. Layout: `<run>/sae/step-N/<sae name>/{model.safetensors, cfg.json,
optimizer.pt}` + `state.json` + `rank<r>.pt` (stream position, shuffle pool, reservoir, fire counters),
TensorBoard runs in `<run>/sae/tb/<sae name>/`. The lock, resume checks, stop flag, progress bar and
failure path come from monosem.loop; the per-SAE operations from monosem.trainee.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from monosem import dist, host
from monosem.buffer import ActivationBuffer
from monosem.config import Config
from monosem.errors import MonosemError
from monosem.lm import LM, load_lm, weights_identity
from monosem.loop import Run
from monosem.metrics import last_scalars
from monosem.resample import Reservoir
from monosem.trainee import (Trainee, build_trainees, cfg_lm_identity, eval_loss_recovered,
                             forward_backward, init_from_batch, log_metrics, optimizer_step,
                             resample_dead, resamples, save_all)


def check_lm(cfg: Config, device: torch.device) -> LM:
    """The frozen LM the producer runs (here: for the loss-recovered eval); its d_mlp must be d_in."""
    lm = load_lm(cfg.lm_dir, device=device)
    if lm.cfg.d_mlp != cfg.sae.d_in:
        raise MonosemError(f"sae.d_in = {cfg.sae.d_in} but the LM in {cfg.lm_dir} has d_mlp = "
                           f"{lm.cfg.d_mlp}: set --sae.d_in={lm.cfg.d_mlp}")
    return lm


def train(cfg: Config, resume: bool = False,
          on_batch: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> dict:
    """Train every SAE of the config for cfg.train_sae.steps steps; return the last metrics.

    on_batch(step, x [B, d_in], ids [B]) is called with every batch this rank consumes (analysis, tests)."""
    accelerator = dist.make_accelerator(cfg, deepspeed=cfg.dist.deepspeed_stage > 0)
    if cfg.train_sae.bf16:
        dist.warn_emulated_bf16(accelerator.device, "train_sae.bf16")
    if not torch.cuda.is_available():  # every core to the step; the producer runs niced in its gaps
        torch.set_num_threads(dist.cpu_threads(cfg.train_sae.threads))
        host.tune_allocator()  # the step's large tensors are reused, not faulted in again every step
    with dist.guard(accelerator):  # a failing rank stops every rank within seconds
        lm = check_lm(cfg, accelerator.device)
        expect = {"lm_identity": (cfg_lm_identity(cfg), "the LM")}
        with Run(cfg.sae_dir, "train-sae", total=cfg.train_sae.steps, resume=resume, expect=expect) as run:
            if run.finished:
                return _already_done(cfg, run.step)
            trainees, reservoir, buffer = _setup(cfg, accelerator, run)
            metrics = _loop(cfg, run, trainees, reservoir, buffer, lm, on_batch)
            names = [t.name for t in trainees]
            del trainees  # the DDP wrappers hold the process group: drop them before teardown
    if dist.is_main():  # (after teardown every process looks like rank 0)
        _report(cfg, metrics, names)
    return metrics


def _setup(cfg: Config, accelerator, run: Run) -> tuple[list[Trainee], Reservoir, ActivationBuffer]:
    """The SAEs (fresh or restored), this rank's reservoir, and its buffer with a running producer."""
    rank, world, ckpt = dist.rank(), dist.world_size(), run.checkpoint
    rank_state = ckpt.rank_state(rank) if ckpt is not None else {}
    torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank
    trainees = build_trainees(cfg, accelerator, ckpt, run)
    reservoir = Reservoir(max(1, cfg.train_sae.resample_pool // world), d_in=cfg.sae.d_in,
                          seed=cfg.run.seed * 7919 + rank)
    if "reservoir" in rank_state:
        reservoir.load_state_dict(rank_state["reservoir"])
    buffer = ActivationBuffer(cfg, rank=rank, world_size=world, lm_path=cfg.lm_dir,
                              data_dir=cfg.data_dir, state=rank_state.get("buffer"))
    run.on_exit(buffer.close)
    return trainees, reservoir, buffer


def _loop(cfg: Config, run: Run, trainees: list[Trainee], reservoir: Reservoir, buffer: ActivationBuffer,
          lm: LM, on_batch) -> dict:
    """The training loop: batch, step, log, resample, evaluate, checkpoint."""
    ts, world, device = cfg.train_sae, dist.world_size(), trainees[0].accelerator.device
    step, metrics, bar = run.step, {}, run.progress()
    window_start, window_steps = time.perf_counter(), 0
    last_resample = max(ts.resample_steps, default=0) if any(map(resamples, trainees)) else 0
    while step < ts.steps:
        x, ids = buffer.next_batch(ts.batch_size, device)         # [B, d_in] fp32 on device, [B] int64
        if on_batch is not None:
            on_batch(step, x, ids)
        if step == 0:
            init_from_batch(trainees, x)
        if step < last_resample:  # the reservoir (on the host) only feeds resampling still to come
            reservoir.add(x.cpu())
        losses = {t.name: forward_backward(t, x, step, cfg) for t in trainees}
        stop = run.check(step + 1, losses, f"train_sae.lr = {ts.lr:g}")  # before any optimizer step
        for t in trainees:
            optimizer_step(t, step, cfg)
        step, window_steps = step + 1, window_steps + 1
        if step % ts.log_every == 0 or step == ts.steps:
            elapsed = time.perf_counter() - window_start
            metrics = log_metrics(trainees, step, cfg, buffer.stats(),
                                  vectors_per_s=window_steps * ts.batch_size * world / elapsed)
            window_start, window_steps = time.perf_counter(), 0
            bar.set_postfix_str(_headline(metrics, trainees[0].name))
        if step in ts.resample_steps:
            for t in trainees:
                resample_dead(t, reservoir, step, cfg)
            reservoir.reset()
        if ts.eval_every and (step % ts.eval_every == 0 or step == ts.steps):
            metrics.update(eval_loss_recovered(trainees, lm, cfg, step))
        if step % ts.ckpt_every == 0 or step == ts.steps or stop:
            save_all(cfg, step, trainees, {"buffer": buffer, "reservoir": reservoir})
        bar.update(1)
        if stop:
            run.stopped(step)
            break
    metrics["rank_identities"] = dist.gather_objects(
        {t.name: weights_identity(t.sae.state_dict()) for t in trainees})
    return metrics


def _already_done(cfg: Config, step: int) -> dict:
    print(f"monosem: the SAE in {cfg.sae_dir} is already trained to step {step} (train_sae.steps = "
          f"{cfg.train_sae.steps}): nothing to do; raise --train_sae.steps to train further")
    return last_scalars(cfg.sae_dir / "tb")


def _headline(m: dict, name: str) -> str:
    g = lambda k: m.get(f"{name}/{k}", float("nan"))  # noqa: E731
    return (f"loss {g('train/loss'):.4g} L0 {g('train/l0'):.1f} dead {g('features/dead_frac'):.2f} "
            f"vec/s {g('perf/vectors_per_s'):.0f}")


def _report(cfg: Config, metrics: dict, names: list[str]) -> None:
    print(f"SAE checkpoints: {cfg.sae_dir}")
    for name in names:
        keys = ("train/loss", "train/l0", "train/fvu", "features/dead_frac",
                "features/ultralow_frac", "eval/loss_recovered")
        print(f"  {name}: " + ", ".join(f"{k.split('/')[1]}={metrics.get(f'{name}/{k}', float('nan')):.4g}"
                                     for k in keys))
    for r, identity in enumerate(metrics.get("rank_identities", [])):  # equal on every rank, or a bug
        print(f"  rank {r} weights: " + " ".join(f"{n}={h}" for n, h in identity.items()))
    print(f"TensorBoard: tensorboard --logdir {cfg.sae_dir / 'tb'} --host 127.0.0.1")
