"""One SAE being trained: its module, optimizer, fire counters and TensorBoard run, and the step,
logging, resampling, evaluation and checkpoint operations the loop in `train_sae.py` calls.

Several trainees share one stream of batches (a `[sweep]` over λ or n_features). Counters are local to
a rank and reduced over ranks only when read (logging, resampling), so a step costs no extra collective.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, replace

import torch

from monosem import dist, metrics, resample, sae as sae_lib
from monosem.checkpoint import commit, staging_dir, write_parts
from monosem.config import Config, SAEConfig
from monosem.configfile import to_toml
from monosem.lm import lm_identity
from monosem.metrics import MetricsWriter


@dataclass
class Trainee:
    name: str
    cfg: SAEConfig
    sae: sae_lib.SAE               # the module itself (what DDP wraps; shares its parameters)
    model: torch.nn.Module         # as prepared by accelerate (DDP / DeepSpeed engine)
    opt: torch.optim.Optimizer     # as prepared by accelerate
    accelerator: object
    writer: MetricsWriter
    last_fired: torch.Tensor       # [n_features] int64: step after which each feature last fired
    fire_counts: torch.Tensor    # [n_features] int64: fires since the start or the last resampling
    fire_vectors: int = 0
    last: dict = field(default_factory=dict)  # loss parts of the latest step (python floats)


def sweep(cfg: Config) -> list[tuple[str, SAEConfig]]:
    """(name, SAEConfig) for every SAE in the sweep: the cross product of [sweep] lists."""
    l1s = cfg.sweep.l1_coeff or [cfg.sae.l1_coeff]
    sizes = cfg.sweep.n_features or [cfg.sae.n_features]
    if len(l1s) * len(sizes) == 1:
        return [("sae", replace(cfg.sae, l1_coeff=l1s[0], n_features=sizes[0]))]
    return [(f"sae-n{n}-l1_{l1:g}", replace(cfg.sae, l1_coeff=l1, n_features=n))
            for n, l1 in itertools.product(sizes, l1s)]


def build_trainees(cfg: Config, accelerator, ckpt, rank_state: dict) -> list[Trainee]:
    """Create (or restore) every SAE and its Adam optimizer, prepared for data parallelism."""
    out = []
    for name, scfg in sweep(cfg):
        model = sae_lib.SAE(scfg)
        if ckpt is not None:
            model.load_state_dict(_load_tensors(ckpt.path / name))
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train_sae.lr)
        raw = model
        model, opt = accelerator.prepare(model, opt)
        if ckpt is not None:
            dist.load_optimizer_state_(model, opt, torch.load(ckpt.path / name / "optimizer.pt",
                                                              weights_only=True))
        saved = rank_state.get("trainees", {}).get(name, {})
        n = scfg.n_features
        writer = MetricsWriter(cfg.sae_dir / "tb" / name, enabled=dist.is_main(),
                               config_text=to_toml(cfg))
        out.append(Trainee(name, scfg, raw, model, opt, accelerator, writer,
                           saved.get("last_fired", torch.zeros(n, dtype=torch.int64)),
                           saved.get("fire_counts", torch.zeros(n, dtype=torch.int64)),
                           saved.get("fire_vectors", 0)))
    return out


def _load_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@torch.no_grad()
def init_from_batch(trainees: list[Trainee], x: torch.Tensor) -> None:
    """Data-dependent init from the first batch, gathered over ranks so every rank agrees. b_dec goes
    through dist.edit_params_: under DeepSpeed the optimizer holds its own fp32 copy of the weights."""
    sample = dist.all_gather_cat(x)                                     # [B * world, d_in]
    for t in trainees:
        t.sae.init_input_scale(sample)                                  # a buffer: no master copy
        dist.broadcast_(t.sae.scale)
        b_dec = t.sae.b_dec_from_data(sample)                           # [d_in] or None
        if b_dec is not None:
            dist.broadcast_(b_dec)
            dist.edit_params_(t.model, t.opt, ["b_dec"], lambda p, s, v=b_dec: p["b_dec"].copy_(v),
                              states=False)


def sae_step(t: Trainee, x: torch.Tensor, step: int, cfg: Config) -> float:
    """One optimizer step on batch x [B, d_in]; returns the loss (a python float)."""
    ts, sae = cfg.train_sae, t.sae
    lr = ts.lr * sae_lib.lr_factor(step, ts.steps, ts.warmup_steps, ts.decay_start)
    for g in t.opt.param_groups:
        g["lr"] = lr
    l1_coeff = sae_lib.l1_coeff_at(step, t.cfg.l1_coeff, ts.l1_warmup_steps)
    dead = resample.dead_mask(t.last_fired, step, ts.dead_window) if t.cfg.recipe == "topk" else None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=ts.bf16):
        out = t.model(x, l1_coeff=l1_coeff, dead_mask=dead)
    t.accelerator.backward(out.loss)  # W_dec's gradient is projected in forward; DeepSpeed steps here
    if ts.grad_clip:
        t.accelerator.clip_grad_norm_(t.model.parameters(), ts.grad_clip)
    t.opt.step()
    t.opt.zero_grad(set_to_none=True)
    if sae.unit_norm:  # renormalise the weights wherever the engine keeps them (DeepSpeed: fp32 masters)
        dist.edit_params_(t.model, t.opt, ["W_dec"], lambda p, s: sae_lib.normalize_columns_(p["W_dec"]),
                          states=False)
    with torch.no_grad():
        active = out.f > 0                                              # [B, n_features]
        t.last_fired[active.any(0).cpu()] = step + 1
        t.fire_counts += active.sum(0).cpu()
        t.fire_vectors += x.shape[0]
        t.last = {"loss": out.loss.item(), "mse": out.mse.item(), "l1": out.l1.item(),
                  "aux": float(out.aux), "l0": metrics.l0(out.f),
                  "fvu": metrics.fvu(x.float(), out.x_hat.float())}
    return t.last["loss"]


def log_metrics(trainees: list[Trainee], step: int, cfg: Config, buffer_stats: dict,
                vectors_per_s: float) -> dict:
    """Reduce every trainee's counters and loss parts over ranks; rank 0 writes TensorBoard."""
    out, world = {}, dist.world_size()
    tokens_per_vector = (cfg.data.ctx_len / cfg.buffer.tokens_per_context
                         if cfg.buffer.tokens_per_context else 1.0)
    keys = ("fill", "producer_wait_s", "consumer_wait_s", "shuffle_quality")
    sums = dist.all_reduce_sum(torch.tensor([float(buffer_stats.get(k, 0.0)) for k in keys],
                                            dtype=torch.float64))   # one collective for all four
    reduced_buffer = dict(zip(keys, (sums / world).tolist()))
    for t in trainees:
        keys = sorted(t.last)
        parts = dist.all_reduce_sum(torch.tensor([t.last[k] for k in keys], dtype=torch.float64))
        last_fired = dist.all_reduce_max(t.last_fired.clone())
        counts = dist.all_reduce_sum(t.fire_counts.clone())
        n_vectors = t.fire_vectors * world
        dead = resample.dead_mask(last_fired, step, cfg.train_sae.dead_window)
        density = (metrics.dead_and_ultralow(counts, n_vectors, ~dead) if n_vectors else
                   {"dead_frac": dead.float().mean().item(), "ultralow_frac": float("nan")})
        lr = t.opt.param_groups[0]["lr"]
        values = {f"train/{k}": v / world for k, v in zip(keys, parts.tolist())}
        values |= {"features/dead_frac": density["dead_frac"],
                   "features/ultralow_frac": density["ultralow_frac"], "train/lr": lr,
                   "perf/vectors_per_s": vectors_per_s,
                   "perf/tokens_per_s": vectors_per_s * tokens_per_vector}
        values |= {f"buffer/{k}": v for k, v in reduced_buffer.items()}
        t.writer.scalars(step, values)
        if n_vectors:
            t.writer.density(step, counts, n_vectors)
        out |= {f"{t.name}/{k}": v for k, v in values.items()}
    return out


@torch.no_grad()
def resample_dead(t: Trainee, reservoir: resample.Reservoir, step: int, cfg: Config) -> int:
    """The paper's resampling of features dead over the last dead_window steps; returns how many.

    Every rank computes the losses of its own reservoir; the losses are all-gathered, every rank draws
    the same inputs with the same generator, and the chosen vectors are shared by their owners."""
    if t.cfg.recipe != "anthropic-2023":
        return 0
    ts, sae = cfg.train_sae, t.sae
    dead = resample.dead_mask(dist.all_reduce_max(t.last_fired.clone()), step, ts.dead_window)
    dead_idx = dead.nonzero().squeeze(1)                                  # [n_dead]
    if len(dead_idx):
        x = reservoir.tensor().to(next(sae.parameters()).device)         # [N_rank, d_in]
        with dist.gathered_params(t.model):                             # ZeRO-3: collective
            l1_coeff = sae_lib.l1_coeff_at(step, t.cfg.l1_coeff, ts.l1_warmup_steps)  # as trained now
            losses = resample.resample_losses(sae, x, l1_coeff, terms=t.cfg.resample_loss)
        gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)
        inputs = dist.gather_chosen(losses, x, lambda all_losses: resample.choose_inputs(
            all_losses, len(dead_idx), ts.resample_power, gen))        # [n_dead, d_in]
        # weights and their Adam rows, wherever the engine keeps them (ZeRO: gathered, written back)
        dist.edit_params_(t.model, t.opt, list(resample.RESAMPLED_PARAMS),
                          lambda p, s: resample.resample_params_(p, s, dead_idx, inputs))
        t.last_fired[dead_idx] = step
    t.fire_counts.zero_()  # densities restart: resampled features begin anew
    t.fire_vectors = 0
    t.writer.scalars(step, {"features/resampled": float(len(dead_idx))})
    return len(dead_idx)


@torch.no_grad()
def eval_loss_recovered(trainees: list[Trainee], lm, cfg: Config, step: int,
                        _cache: dict = {}) -> dict:  # noqa: B006 - val tokens cached per process
    """Loss recovered on held-out contexts, on rank 0 (the others carry on)."""
    if not dist.is_main():
        for t in trainees:  # ZeRO-3 gathers the SAE's weights collectively: take part, carry on
            with dist.gathered_params(t.model):
                pass
        return {}
    key = (str(cfg.data_dir), cfg.train_sae.eval_contexts)
    if key not in _cache:
        from monosem.stream import TokenStream

        stream = TokenStream.from_config(cfg, "val", 0, 1, loop=False)
        _cache[key] = next(stream.batches(cfg.train_sae.eval_contexts))[0]
    tokens, out = _cache[key], {}
    for t in trainees:
        sae = t.sae
        # [b*t, d_mlp] -> same; in the SAE's own dtype (DeepSpeed bf16 keeps bf16 weights in the module)
        reconstruct = lambda h: sae.reconstruct(h.to(sae.W_dec.dtype)).to(h.dtype)  # noqa: E731
        with dist.gathered_params(t.model):
            r = metrics.loss_recovered(lm, tokens.to(next(lm.parameters()).device), reconstruct)
        values = {f"eval/{k}": float(v) for k, v in r.items()}
        t.writer.scalars(step, values)
        out |= {f"{t.name}/{k}": v for k, v in values.items()}
    return out


def save_all(cfg: Config, step: int, trainees: list[Trainee], reservoir: resample.Reservoir,
             buffer) -> None:
    """Every rank stages its own state; rank 0 stages the weights and commits the step folder.
    (Multi-node runs need the run folder on a shared filesystem.)"""
    tmp = staging_dir(cfg.sae_dir, step)
    per_rank = {"buffer": buffer.state_dict(), "reservoir": reservoir.state_dict(),
                "trainees": {t.name: {"last_fired": t.last_fired, "fire_counts": t.fire_counts,
                                      "fire_vectors": t.fire_vectors} for t in trainees}}
    dist.barrier()
    write_parts(tmp, objects={f"rank{dist.rank()}": per_rank})
    # full weights and Adam state (under ZeRO gathered from the partitions: every rank takes part)
    opt_states = [dist.optimizer_state_dict(t.opt, t.model) for t in trainees]
    weights = [dist.model_state_dict(t.model) for t in trainees]
    if dist.is_main():
        for t, opt_state, tensors in zip(trainees, opt_states, weights):
            write_parts(tmp / t.name, tensors=tensors, objects={"optimizer": opt_state})
            meta = {**t.sae.cfg_json(), "name": t.name, "step": step, "hook": "mlp_post",
                    "hook_layer": cfg.lm.hook_layer, "lm_identity": lm_identity(cfg.lm_dir)}
            (tmp / t.name / "cfg.json").write_text(json.dumps(meta, indent=2) + "\n")
        write_parts(tmp, state={"step": step, "world_size": dist.world_size(),
                                "saes": [t.name for t in trainees],
                                "zero_stage": dist.zero_stage(trainees[0].model)}, config=cfg)
    dist.barrier()
    if dist.is_main():
        commit(cfg.sae_dir, step, cfg.train_sae.keep_last)
    dist.barrier()
