"""One SAE being trained: its module, optimizer, fire counters and TensorBoard run, and the step,
logging, resampling, evaluation and checkpoint operations the loop in `train_sae.py` calls.

Several trainees share one stream of batches (a `[sweep]` over λ or n_features). Counters are local to
a rank and reduced over ranks only when read (logging, resampling), so a step costs no extra collective.
Everything with a tensor lives on the SAE's device (accelerator.device); checkpoints hold CPU copies.
"""
from __future__ import annotations

import itertools
import json
import weakref
from dataclasses import dataclass, field, replace

import torch

from monosem import checkpoint, dist, metrics, resample, sae as sae_lib, zero
from monosem.config import Config, SAEConfig
from monosem.configfile import to_toml
from monosem.errors import MonosemError
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
    fire_counts: torch.Tensor      # [n_features] int64: fires since the start or the last resampling
    fire_vectors: int = 0
    last: dict = field(default_factory=dict)  # loss parts of the latest step (python floats)

    def state_dict(self) -> dict:
        """This rank's counters (CPU copies: a checkpoint loads on any device)."""
        return {"last_fired": self.last_fired.cpu(), "fire_counts": self.fire_counts.cpu(),
                "fire_vectors": self.fire_vectors}

    def load_state_dict(self, state: dict) -> None:
        self.last_fired = state["last_fired"].to(self.last_fired.device)
        self.fire_counts = state["fire_counts"].to(self.fire_counts.device)
        self.fire_vectors = int(state["fire_vectors"])


def l1_coeff_at(step: int, cfg: SAEConfig | float, warmup_steps: int) -> float:
    """λ ramped linearly from 0 at step 0 to its full value at step warmup_steps (0 = no warmup)."""
    lam = cfg.l1_coeff if isinstance(cfg, SAEConfig) else float(cfg)
    return lam if warmup_steps <= 0 else lam * min(1.0, step / warmup_steps)


def lr_factor(step: int, total: int, warmup: int, decay_start: float) -> float:
    """LR multiplier: linear warmup over `warmup` steps (first step > 0), then constant, then a linear
    decay to 0 at `total` starting at fraction `decay_start` of training (1.0 = no decay)."""
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    decay_from = int(decay_start * total)
    if decay_start < 1.0 and step >= decay_from:
        factor = min(factor, max(0.0, (total - step) / max(1, total - decay_from)))
    return factor


def sweep(cfg: Config) -> list[tuple[str, SAEConfig]]:
    """(name, SAEConfig) for every SAE in the sweep: the cross product of [sweep] lists."""
    l1s = cfg.sweep.l1_coeff or [cfg.sae.l1_coeff]
    sizes = cfg.sweep.n_features or [cfg.sae.n_features]
    if len(l1s) * len(sizes) == 1:
        return [("sae", replace(cfg.sae, l1_coeff=l1s[0], n_features=sizes[0]))]
    return [(f"sae-n{n}-l1_{l1:g}", replace(cfg.sae, l1_coeff=l1, n_features=n))
            for n, l1 in itertools.product(sizes, l1s)]


def build_trainees(cfg: Config, accelerator, ckpt: checkpoint.Checkpoint | None,
                   run=None) -> list[Trainee]:
    """Create (or restore) every SAE and its Adam optimizer on accelerator.device, prepared for data
    parallelism; `run` (monosem.loop.Run) makes the TensorBoard writers (None: disabled writers, for
    benchmarks and tests that time or check the step alone)."""
    out, device = [], accelerator.device
    rank_state = ckpt.rank_state(dist.rank()) if ckpt is not None else {}
    for name, scfg in sweep(cfg):
        model = sae_lib.SAE(scfg, sparse=cfg.train_sae.sparse, sparse_threshold=cfg.train_sae.sparse_threshold)
        if ckpt is not None:
            model.load_state_dict(ckpt.tensors(name))
        if model.W_enc.device != device:  # initialised on the host: the same SAE on any device
            model = model.to(device)
        # fused: one kernel per tensor (CPU: ~7x faster than foreach); ZeRO steps it on its fp32 partitions
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train_sae.lr, fused=True)
        raw = model
        model, opt = accelerator.prepare(model, opt)
        if ckpt is not None:
            zero.load_optimizer_state_(model, opt, ckpt.load_object("optimizer", name))
        n = scfg.n_features
        logdir = cfg.sae_dir / "tb" / name
        writer = (run.writer(logdir, config_text=to_toml(cfg)) if run is not None
                  else MetricsWriter(logdir, enabled=False))
        t = Trainee(name, scfg, raw, model, opt, accelerator, writer,
                    torch.zeros(n, dtype=torch.int64, device=device),
                    torch.zeros(n, dtype=torch.int64, device=device))
        if f"trainee/{name}" in rank_state:
            t.load_state_dict(rank_state[f"trainee/{name}"])
        out.append(t)
    return out


@torch.no_grad()
def init_from_batch(trainees: list[Trainee], x: torch.Tensor) -> None:
    """Data-dependent init from the first batch x [B, d_in] (on the SAE's device), gathered over ranks
    so every rank agrees. b_dec goes through zero.edit_params_: under DeepSpeed the optimizer holds its
    own fp32 copy of the weights."""
    sample = dist.all_gather_cat(x)                                     # [B * world, d_in]
    for t in trainees:
        t.sae.init_input_scale(sample)                                  # a buffer: no master copy
        dist.broadcast_(t.sae.scale)
        b_dec = t.sae.b_dec_from_data(sample)                           # [d_in] or None
        if b_dec is not None:
            dist.broadcast_(b_dec)
            zero.edit_params_(t.model, t.opt, ["b_dec"], lambda p, s, v=b_dec: p["b_dec"].copy_(v),
                              states=False)


def forward_backward(t: Trainee, x: torch.Tensor, step: int, cfg: Config) -> float:
    """Loss and gradients on batch x [B, d_in]; counts the features that fired. Returns the loss (a
    python float): the loop checks it on every rank before any optimizer step."""
    ts = cfg.train_sae
    l1_coeff = l1_coeff_at(step, t.cfg.l1_coeff, ts.l1_warmup_steps)
    dead = resample.dead_mask(t.last_fired, step, ts.dead_window) if t.cfg.recipe == "topk" else None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=ts.bf16):
        out = t.model(x, l1_coeff=l1_coeff, dead_mask=dead)
    zero.backward(t.accelerator, t.model, out.loss)  # W_dec's gradient comes back projected
    with torch.no_grad():
        counts = t.sae.last_counts                                      # [n_features] (sparse: no pass over f)
        if counts is None:
            counts = (out.f > 0).sum(0)
        t.last_fired[counts > 0] = step + 1
        t.fire_counts += counts
        t.fire_vectors += x.shape[0]
        mse = out.mse.item()  # in the SAE's scaled space; FVU wants ‖x − x̂‖² in input units
        t.last = {"loss": out.loss.item(), "mse": mse, "l1": out.l1.item(),
                  "aux": float(out.aux), "l0": counts.sum().item() / x.shape[0],
                  "sparse_step": float(t.sae.last_path == "sparse"),  # which path ran (train_sae.sparse)
                  "fvu": metrics.fvu_from_sse(mse * x.numel() / t.sae.input_scale_value() ** 2, x)}
    return t.last["loss"]


def optimizer_step(t: Trainee, step: int, cfg: Config) -> None:
    """Adam at the scheduled LR, then the decoder renormalisation (wherever the engine keeps weights)."""
    ts = cfg.train_sae
    lr = ts.lr * lr_factor(step, ts.steps, ts.warmup_steps, ts.decay_start)
    for g in t.opt.param_groups:
        g["lr"] = lr
    try:
        zero.step(t.accelerator, t.model, t.opt, ts.grad_clip)
    except RuntimeError as e:  # e.g. an LR so large that Adam's step size overflows float32
        raise MonosemError(f"{t.name}: the optimizer step failed at step {step + 1} with train_sae.lr = "
                           f"{ts.lr:g} (lr now {lr:g}): {str(e).splitlines()[0]}") from None
    if t.sae.unit_norm:  # renormalise the weights wherever the engine keeps them (DeepSpeed: fp32 masters)
        zero.edit_params_(t.model, t.opt, ["W_dec"], lambda p, s: sae_lib.normalize_columns_(p["W_dec"]),
                          states=False)


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
        last_fired = dist.all_reduce_max(t.last_fired.clone()).cpu()
        counts = dist.all_reduce_sum(t.fire_counts.clone()).cpu()
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
        if n_vectors:  # the picture costs ~0.3 s of matplotlib: at evaluations and the end only
            t.writer.density(step, counts, n_vectors, image=step == cfg.train_sae.steps or bool(
                cfg.train_sae.eval_every and step % cfg.train_sae.eval_every == 0))
        out |= {f"{t.name}/{k}": v for k, v in values.items()}
    return out


BIAS_SAMPLE = 16384  # reservoir rows (over all ranks) on which a resampled feature's bias is set


def _bias_target(t: Trainee, x: torch.Tensor, n_dead: int) -> dict:
    """The same on every rank: the first rows of each rank's reservoir (a uniform sample), and the alive
    features' mean density in this step's batch (L0 / alive features, averaged over ranks)."""
    sample = dist.all_gather_cat(x[: max(1, BIAS_SAMPLE // dist.world_size())])      # [S, d_in]
    l0 = dist.all_reduce_sum(torch.tensor([t.last.get("l0", 0.0)], dtype=torch.float64,
                                          device=x.device)).item() / dist.world_size()
    return {"bias_sample": sample, "density": l0 / max(1, t.sae.cfg.n_features - n_dead)}


def resamples(t: Trainee) -> bool:
    """Whether train_sae.resample_steps apply: anthropic-2023 resamples dead features the paper's way;
    anthropic-2024-04 never does and topk revives them through AuxK."""
    return t.cfg.recipe == "anthropic-2023"


@torch.no_grad()
def resample_dead(t: Trainee, reservoir: resample.Reservoir, step: int, cfg: Config) -> int:
    """The paper's resampling of features dead over the last dead_window steps; returns how many.

    Every rank computes the losses of its own reservoir; the losses are all-gathered, every rank draws
    the same inputs with the same generator, and the chosen vectors are shared by their owners."""
    if not resamples(t):
        return 0
    ts, sae = cfg.train_sae, t.sae
    dead = resample.dead_mask(dist.all_reduce_max(t.last_fired.clone()), step, ts.dead_window)
    dead_idx = dead.nonzero().squeeze(1)                                  # [n_dead]
    if len(dead_idx):
        x = reservoir.tensor().to(next(sae.parameters()).device)         # [N_rank, d_in]
        with zero.gathered_params(t.model):                             # ZeRO-3: collective
            l1_coeff = l1_coeff_at(step, t.cfg.l1_coeff, ts.l1_warmup_steps)  # as trained now
            losses = resample.resample_losses(sae, x, l1_coeff, terms=t.cfg.resample_loss)
        gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)  # on the CPU: same on any device
        inputs = dist.gather_chosen(losses, x, lambda all_losses: resample.choose_inputs(
            all_losses.cpu(), len(dead_idx), ts.resample_power, gen))  # [n_dead, d_in]
        bias = _bias_target(t, x, len(dead_idx)) if ts.resample_bias == "density" else {}
        # weights and their Adam rows, wherever the engine keeps them (ZeRO: gathered, written back)
        zero.edit_params_(t.model, t.opt, [*resample.RESAMPLED_PARAMS, "b_dec"],
                          lambda p, s: resample.resample_params_(p, s, dead_idx, inputs, **bias))
        t.last_fired[dead_idx] = step
    t.fire_counts.zero_()  # densities restart: resampled features begin anew
    t.fire_vectors = 0
    t.writer.scalars(step, {"features/resampled": float(len(dead_idx))})
    return len(dead_idx)


# the frozen LM's clean and zero-ablated CE on the eval contexts, per LM (gone with it) and token set
_BASELINES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def eval_loss_recovered(trainees: list[Trainee], lm, cfg: Config, step: int,
                        _cache: dict = {}) -> dict:  # noqa: B006 - val tokens cached per process
    """Loss recovered on held-out contexts, on rank 0 (the others carry on). The LM is frozen, so its
    clean and zero-ablated CE are computed once per process and LM: later evaluations run the spliced
    pass only."""
    if not dist.is_main():
        for t in trainees:  # ZeRO-3 gathers the SAE's weights collectively: take part, carry on
            with zero.gathered_params(t.model):
                pass
        return {}
    key = (str(cfg.data_dir), cfg.train_sae.eval_contexts)
    if key not in _cache:
        from monosem.stream import TokenStream

        stream = TokenStream.from_config(cfg, "val", 0, 1, loop=False)
        _cache[key] = next(stream.batches(cfg.train_sae.eval_contexts))[0]
    tokens, out, baselines = _cache[key], {}, _BASELINES.setdefault(lm, {})
    for t in trainees:
        sae = t.sae
        # [b*t, d_mlp] -> same; in the SAE's own dtype (DeepSpeed bf16 keeps bf16 weights in the module)
        reconstruct = lambda h: sae.reconstruct(h.to(sae.W_dec.dtype)).to(h.dtype)  # noqa: E731
        with zero.gathered_params(t.model):
            r = metrics.loss_recovered(lm, tokens.to(sae.W_dec.device), reconstruct,
                                       baseline=baselines.get(key))
        baselines[key] = {k: r[k] for k in ("ce_clean", "ce_zero")}
        values = {f"eval/{k}": float(v) for k, v in r.items()}
        t.writer.scalars(step, values)
        out |= {f"{t.name}/{k}": v for k, v in values.items()}
    return out


def save_all(cfg: Config, step: int, trainees: list[Trainee], parts: dict) -> None:
    """Checkpoint every trainee (weights + Adam state on rank 0, gathered from ZeRO partitions by every
    rank) and every rank's stateful `parts` (buffer, reservoir) and counters. Refuses non-finite weights,
    so the last good checkpoint stays the latest."""
    bad = [t.name for t in trainees if not all(torch.isfinite(p).all() for p in t.sae.parameters())]
    if dist.any_flags([bool(bad)])[0]:
        raise MonosemError(f"weights are not finite after step {step} ({bad or 'on another rank'}): not "
                           f"saved; last good checkpoint: {checkpoint.latest_checkpoint(cfg.sae_dir)}")
    rank_state = {name: part.state_dict() for name, part in parts.items()}
    rank_state |= {f"trainee/{t.name}": t.state_dict() for t in trainees}
    opt_states = [zero.optimizer_state_dict(t.opt, t.model) for t in trainees]
    weights = [zero.model_state_dict(t.model) for t in trainees]

    def write_main(tmp) -> None:
        for t, opt_state, tensors in zip(trainees, opt_states, weights):
            checkpoint.write_parts(tmp / t.name, tensors=tensors, objects={"optimizer": opt_state})
            meta = {**t.sae.cfg_json(), "name": t.name, "step": step, "hook": "mlp_post",
                    "hook_layer": cfg.lm.hook_layer, "lm_identity": cfg_lm_identity(cfg)}
            (tmp / t.name / "cfg.json").write_text(json.dumps(meta, indent=2) + "\n")

    checkpoint.save(cfg.sae_dir, step, rank_state=rank_state, write_main=write_main,
                    state={"saes": [t.name for t in trainees], "lm_identity": cfg_lm_identity(cfg),
                           "zero_stage": zero.zero_stage(trainees[0].model)},
                    config=cfg, keep_last=cfg.train_sae.keep_last)


def cfg_lm_identity(cfg: Config) -> str:
    """The identity of the frozen LM the SAEs read (recorded with every checkpoint, checked on resume)."""
    from monosem.lm import lm_identity

    return lm_identity(cfg.lm_dir)
