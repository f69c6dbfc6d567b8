"""`train(cfg)`: sparse autoencoder(s) on streamed MLP activations, data parallel, one visible loop.

    monosem train-sae configs/quickstart.toml [--resume] [--section.key=value ...]
    accelerate launch --config_file launch/accelerate-cpu2.yaml -m monosem.train_sae configs/tiny.toml
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m monosem.train_sae configs/tiny.toml

Each rank runs its own producer process on disjoint shards (monosem.buffer); DDP all-reduces the
gradients, so the global batch is batch_size x processes. Every `[sweep]` entry is one more SAE trained
on the very same batches. Layout: `<run>/sae/step-N/<sae name>/{model.safetensors, cfg.json,
optimizer.pt}` + `state.json` + `rank<r>.pt` (stream position, shuffle pool, reservoir, fire counters),
TensorBoard runs in `<run>/sae/tb/<sae name>/`.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Callable

import torch
from tqdm import tqdm

from monosem import dist
from monosem.buffer import ActivationBuffer
from monosem.checkpoint import latest_checkpoint, load_checkpoint
from monosem.config import Config
from monosem.errors import MonosemError
from monosem.lm import load_lm, weights_identity
from monosem.resample import Reservoir
from monosem.trainee import (Trainee, build_trainees, eval_loss_recovered, init_from_batch,
                             log_metrics, resample_dead, save_all, sae_step)


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits 0."""

    def __init__(self) -> None:
        self.stop = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        self.stop = True

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def check_lm(cfg: Config) -> torch.nn.Module:
    """The frozen LM the producer runs; its d_mlp must be the SAEs' d_in."""
    lm = load_lm(cfg.lm_dir)
    if lm.cfg.d_mlp != cfg.sae.d_in:
        raise MonosemError(f"sae.d_in = {cfg.sae.d_in} but the LM in {cfg.lm_dir} has d_mlp = "
                           f"{lm.cfg.d_mlp}: set --sae.d_in={lm.cfg.d_mlp}")
    return lm


def resume_point(cfg: Config, resume: bool) -> tuple[int, object | None, dict]:
    """(start step, checkpoint or None, this rank's saved state)."""
    path = latest_checkpoint(cfg.sae_dir)
    if path is not None and not resume:  # never overwrite a trained SAE by accident
        raise MonosemError(f"{cfg.sae_dir} already holds checkpoints ({path.name}): pass --resume to "
                           "continue, or --train_sae.out=NAME to train another SAE on this run")
    if path is None:
        return 0, None, {}
    ckpt = load_checkpoint(path)
    if ckpt.state.get("world_size") != dist.world_size():
        raise MonosemError(f"{path} was written by {ckpt.state.get('world_size')} processes; resume "
                           f"with the same number (now {dist.world_size()})")
    name = f"rank{dist.rank()}"
    return ckpt.step, ckpt, (ckpt.load_object(name) if ckpt.has_object(name) else {})


def train(cfg: Config, resume: bool = False,
          on_batch: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> dict:
    """Train every SAE of the config for cfg.train_sae.steps steps; return the last metrics.

    on_batch(step, x [B, d_in], ids [B]) is called with every batch this rank consumes (analysis, tests)."""
    accelerator = dist.make_accelerator(cfg, deepspeed=cfg.dist.deepspeed_stage > 0)
    ts, rank, world = cfg.train_sae, dist.rank(), dist.world_size()
    if not torch.cuda.is_available():  # leave the producers their cores: oversubscription stalls both
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world_size()
                                  - cfg.buffer.producer_threads))
    lm = check_lm(cfg)
    step, ckpt, rank_state = resume_point(cfg, resume)
    torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank
    trainees = build_trainees(cfg, accelerator, ckpt, rank_state)
    reservoir = Reservoir(max(1, ts.resample_pool // world), d_in=cfg.sae.d_in,
                          seed=cfg.run.seed * 7919 + rank)
    if "reservoir" in rank_state:
        reservoir.load_state_dict(rank_state["reservoir"])
    buffer = ActivationBuffer(cfg, rank=rank, world_size=world, lm_path=cfg.lm_dir,
                              data_dir=cfg.data_dir, state=rank_state.get("buffer"))
    stopper, metrics, main_rank = StopFlag(), {}, dist.is_main()
    bar = tqdm(total=ts.steps, initial=step, disable=not main_rank, desc="train-sae",
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10)  # logs: a line/10 s
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < ts.steps:
            x, ids = buffer.next_batch(ts.batch_size)             # [B, d_in] float32, [B] int64
            if on_batch is not None:
                on_batch(step, x, ids)
            if step == 0:
                init_from_batch(trainees, x)
            reservoir.add(x)
            losses = [sae_step(t, x, step, cfg) for t in trainees]
            step, window_steps = step + 1, window_steps + 1
            stop, bad = dist.any_flags([stopper.stop, not all(map(math.isfinite, losses))])
            if bad:
                bad_saes = {t.name: loss for t, loss in zip(trainees, losses)}
                raise MonosemError(f"loss is not finite at step {step} ({bad_saes}); last good "
                                   f"checkpoint: {latest_checkpoint(cfg.sae_dir)}")
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
                save_all(cfg, step, trainees, reservoir, buffer)
            bar.update(1)
            if stop:
                print(f"monosem: stopped by signal at step {step}; checkpoint in {cfg.sae_dir}",
                      file=sys.stderr)
                break
        metrics["rank_identities"] = dist.gather_objects(
            {t.name: weights_identity(t.sae.state_dict()) for t in trainees})
    finally:
        bar.close()
        stopper.restore()
        buffer.close()
        for t in trainees:
            t.writer.close()
        dist.teardown(accelerator, trainees)
    if main_rank:  # (after teardown every process looks like rank 0)
        _report(cfg, metrics, trainees)
    return metrics


def _headline(m: dict, name: str) -> str:
    g = lambda k: m.get(f"{name}/{k}", float("nan"))  # noqa: E731
    return (f"loss {g('train/loss'):.4g} L0 {g('train/l0'):.1f} dead {g('features/dead_frac'):.2f} "
            f"vec/s {g('perf/vectors_per_s'):.0f}")


def _report(cfg: Config, metrics: dict, trainees: list[Trainee]) -> None:
    print(f"SAE checkpoints: {cfg.sae_dir}")
    for t in trainees:
        keys = ("train/loss", "train/l0", "train/fvu", "features/dead_frac",
                "features/ultralow_frac", "eval/loss_recovered")
        print(f"  {t.name}: " + ", ".join(f"{k.split('/')[1]}={metrics.get(f'{t.name}/{k}', float('nan')):.4g}"
                                       for k in keys))
    print(f"TensorBoard: tensorboard --logdir {cfg.sae_dir / 'tb'} --host 127.0.0.1")


def main(argv: list[str] | None = None) -> int:
    """`python -m monosem.train_sae CONFIG [--resume] [--section.key=value ...]`."""
    from monosem.cli import main as cli_main

    return cli_main(["train-sae", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
