"""Resampling of dead features (Towards Monosemanticity), as pure functions on given tensors.

The trainer keeps a Reservoir of the vectors it consumed, and at a resample step:

    dead = dead_mask(last_fired_step, step, cfg.train_sae.dead_window)          # [n_features] bool
    x = reservoir.tensor()                                  # (all-gathered across ranks by the trainer)
    losses = resample_losses(sae, x, terms=cfg.sae.resample_loss)                 # [N]
    idx = choose_inputs(losses, int(dead.sum()), cfg.train_sae.resample_power, generator)
    resample_(sae, optimizer.state, dead.nonzero().squeeze(1), x[idx])
    # or, on plain tensors (what the trainer hands over under DeepSpeed, via monosem.dist):
    resample_params_({"W_enc": ..., "b_enc": ..., "W_dec": ..., "b_dec": ...}, {name: adam_state},
                     dead_idx, x[idx])
New directions are the paper's raw inputs x; `centre=True` uses x − b_dec (what the encoder reads),
`adam="alive"` a per-row Adam warm-up (see reset_adam_rows_). Both are options for experiments.

The encoder bias of a new feature: the paper sets it to 0. MLP activations are non-negative, so a new
direction u >= 0 has (x − b_dec)·u > 0 for a large share of all inputs (measured: ~40%). On the
quickstart LM (4,096 features, λ 3e-3, lr 1e-3, dead window 150, resampling at 150/300/450), the 69
features resampled at step 300 took the MSE from 0.0033 to 23 in the next step (still ×13 thirty steps
later); while the SAE repaired it ~1,400 rarely firing features stopped firing, and at step 600 2,498
were alive with the paper's resampling against 3,862 without. Given `bias_sample` and `density` (what
the trainer passes by default, train_sae.resample_bias="density"), density_bias() instead starts each
new feature firing as often as the alive features do: 3,883 alive. benchmarks/resampling.py reproduces
these figures.
"""
from __future__ import annotations

import math

import torch

from monosem.errors import MonosemError

ENC_NORM_FACTOR = 0.2  # paper: new encoder rows get 0.2 x the mean norm of the alive encoder rows
ADAM_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# Defaults of resample_params_: the paper's (raw input x, Adam rows zeroed). Centring on x − b_dec was
# measured and is not better: with b_enc = 0 a centred direction fires on ~half of all inputs and stays
# dense (L0 454 vs 36 at 600 steps, same alive count); see benchmarks/resampling.py.
CENTRE, ADAM = False, "zero"


class Reservoir:
    """Uniform sample (Algorithm R, vectorised) of the vectors added since the last reset.

    Lives on the CPU. Deterministic given the seed and the sequence of added batches.
    """

    def __init__(self, capacity: int, d_in: int, seed: int = 0, dtype: torch.dtype = torch.float32):
        if capacity <= 0:
            raise MonosemError(f"Reservoir capacity must be > 0, got {capacity}")
        self.capacity, self.d_in = capacity, d_in
        self.data = torch.empty(capacity, d_in, dtype=dtype)  # [C, d_in]
        self.n_seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        """Offer x [B, d_in]; item t (counted since reset) takes slot r ~ U{0..t} if r < C (Algorithm R)."""
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise MonosemError(f"Reservoir.add: expected [B, {self.d_in}], got {tuple(x.shape)}")
        B, C = x.shape[0], self.capacity
        t = torch.arange(self.n_seen, self.n_seen + B)  # [B] global index of each vector
        fill = t < C
        slots, src = t[fill], fill.nonzero().squeeze(1)
        rest = (~fill).nonzero().squeeze(1)
        if len(rest):
            u = torch.rand(len(rest), generator=self.generator, dtype=torch.float64)
            r = torch.minimum((u * (t[rest] + 1).double()).floor().long(), t[rest])
            keep = r < C
            slots, src = torch.cat([slots, r[keep]]), torch.cat([src, rest[keep]])
        if len(slots):
            # a slot hit twice in one batch keeps the later vector, as the sequential algorithm would
            uniq, inv = torch.unique(slots, return_inverse=True)
            last = torch.full((len(uniq),), -1, dtype=torch.long).scatter_reduce(0, inv, src, "amax")
            self.data[uniq] = x.detach()[last.to(x.device)].to("cpu", self.data.dtype)
        self.n_seen += B

    def tensor(self) -> torch.Tensor:
        """[min(n_seen, C), d_in] (a view: clone it to keep it past the next add)."""
        return self.data[: min(self.n_seen, self.capacity)]

    def reset(self) -> None:
        """Forget the vectors seen so far (the RNG stream continues)."""
        self.n_seen = 0

    def state_dict(self) -> dict:
        return {"data": self.tensor().clone(), "n_seen": self.n_seen, "capacity": self.capacity,
                "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        data = state["data"]
        if state["capacity"] != self.capacity or data.shape[1:] != (self.d_in,):
            raise MonosemError(f"Reservoir state: capacity {state['capacity']} x d_in "
                               f"{tuple(data.shape[1:])} does not match this reservoir's "
                               f"{self.capacity} x {self.d_in}")
        self.n_seen = int(state["n_seen"])
        self.data[: len(data)] = data.to(self.data.dtype)
        self.generator.set_state(state["rng"])


def resample_losses(sae: torch.nn.Module, x: torch.Tensor, l1_coeff: float | None = None,
                    terms: str = "total", batch_size: int = 8192) -> torch.Tensor:
    """[N] per-input loss that weights the draw of resampling inputs.

    terms="total" (default): mse_i + λ·l1_i, the training loss on that input, because the paper says
    "the loss of the autoencoder on that input" and that is the loss it trains on (the mean over
    inputs equals the batch loss; topk has no λ, so it is mse_i). terms="mse": reconstruction only,
    as many reproductions do. mse_i is a mean over d_in elements, as in training.
    """
    if terms not in ("total", "mse"):
        raise MonosemError(f"sae.resample_loss must be 'total' or 'mse'; got {terms!r}")
    lam = sae.cfg.l1_coeff if l1_coeff is None else l1_coeff
    if terms == "mse" or sae.recipe == "topk":
        lam = 0.0
    device = sae.W_dec.device
    out = []
    for chunk in x.split(batch_size):
        mse_i, l1_i = sae.losses_per_input(chunk.to(device, sae.W_dec.dtype))
        out.append(mse_i + lam * l1_i)
    return torch.cat(out) if out else x.new_zeros(0)


def choose_inputs(losses: torch.Tensor, n_dead: int, power: float = 2.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """LongTensor [n_dead]: indices drawn with replacement, P(i) ∝ losses[i]^power (uniform if all are 0).

    power 2 is the paper's "square", 0.5 the seed notes' sqrt. Deterministic given the generator (CPU).
    """
    w = losses.detach().double().cpu().clamp_min(0.0)  # [N]
    if n_dead == 0:
        return torch.zeros(0, dtype=torch.long)
    if len(w) == 0:
        raise MonosemError(f"choose_inputs: no candidate inputs to resample {n_dead} dead features from")
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise MonosemError(f"choose_inputs: {bad} of {len(w)} losses are not finite")
    top = w.max()
    w = (w / top) ** power if top > 0 else torch.ones_like(w)  # divide by the max: no overflow at power 2
    return torch.multinomial(w, n_dead, replacement=True, generator=generator)


def reset_adam_rows_(param_state: dict, index: torch.Tensor, dim: int, adam: str = "zero") -> None:
    """Reset the Adam moments of one parameter at `index` along `dim`.

    adam="zero": exp_avg, exp_avg_sq and max_exp_avg_sq zeroed. torch keeps one `step` count per
    parameter (left alone), so at a large step the bias corrections are ~1 and the first updates of a
    zeroed row are ~lr·(1−β1)/√(1−β2) ≈ 3.2·lr per element (no warm-up). adam="alive": exp_avg
    zeroed, the second moments set to their mean over the rows not reset, so the first updates are
    ~(1−β1)·lr·g/rms(g) and grow to ~lr over ~1/(1−β1) steps: a warm-up for those rows alone.
    """
    keep = None
    if adam == "alive":
        sizes = [v.shape[dim] for v in param_state.values() if isinstance(v, torch.Tensor) and v.ndim]
        if sizes:
            keep = torch.ones(sizes[0], dtype=torch.bool)
            keep[index.cpu()] = False
    for key in ADAM_MOMENT_KEYS:
        moment = param_state.get(key)
        if not isinstance(moment, torch.Tensor) or moment.ndim == 0:
            continue
        idx = index.to(moment.device)
        if key == "exp_avg" or keep is None or not keep.any():
            moment.index_fill_(dim, idx, 0.0)
            continue
        mean = moment.index_select(dim, keep.nonzero()[:, 0].to(moment.device)).mean(dim, keepdim=True)
        moment.index_copy_(dim, idx, mean.expand_as(moment.index_select(dim, idx)).contiguous())


RESAMPLED_PARAMS = ("W_enc", "b_enc", "W_dec")  # what resampling writes (and the dim of a feature in each)
FEATURE_DIM = {"W_enc": 0, "b_enc": 0, "W_dec": 1}  # (pass "b_dec" too, read only, for centre=True)


@torch.no_grad()
def resample_(sae: torch.nn.Module, optimizer_state: dict, dead_idx: torch.Tensor,
              inputs: torch.Tensor, **how) -> None:
    """Give dead feature dead_idx[j] the direction of inputs[j] ([n_dead, d_in]), in place, on a module
    whose optimizer state is `optimizer.state` ({param: {"exp_avg": ...}}). See resample_params_."""
    params = {name: getattr(sae, name) for name in (*RESAMPLED_PARAMS, "b_dec")}
    states = {name: optimizer_state[p] for name, p in params.items() if p in optimizer_state}
    resample_params_(params, states, dead_idx, inputs, **how)


@torch.no_grad()
def density_bias(W_rows: torch.Tensor, b_dec: torch.Tensor, sample: torch.Tensor, density: float,
                 chunk_elems: int = 1 << 24) -> torch.Tensor:
    """[n] encoder biases that make each feature with encoder rows W_rows [n, d_in] fire on a fraction
    `density` of sample [S, d_in]: b = −(the k-th largest of (sample − b_dec)·w), k = ⌈density·S⌉."""
    S = sample.shape[0]
    k = min(S, max(1, math.ceil(density * S)))
    xc = (sample.to(W_rows.device, W_rows.dtype) - b_dec.to(W_rows.device, W_rows.dtype))  # [S, d_in]
    step = max(1, chunk_elems // max(1, S))
    out = [-(xc @ W_rows[lo:lo + step].T).topk(k, dim=0).values[-1] for lo in range(0, len(W_rows), step)]
    return torch.cat(out) if out else W_rows.new_zeros(0)


@torch.no_grad()
def resample_params_(params: dict[str, torch.Tensor], states: dict[str, dict], dead_idx: torch.Tensor,
                     inputs: torch.Tensor, *, centre: bool = CENTRE, adam: str = ADAM,
                     bias_sample: torch.Tensor | None = None, density: float = 0.0) -> None:
    """Resampling on plain tensors, in place: params {"W_enc" [n_features, d_in], "b_enc" [n_features],
    "W_dec" [d_in, n_features], optionally "b_dec" [d_in]}, states {name: Adam state dict} (missing
    names: no state yet).

    u = x − b_dec if centre (and b_dec is given) else x; W_dec[:, i] = u / ‖u‖;
    W_enc[i] = u / ‖u‖ · 0.2 · mean alive ‖W_enc[j]‖ (all if none); b_enc[i] = 0 (the paper), or, given
    bias_sample [S, d_in] and density > 0 (needs "b_dec"), density_bias(): each new feature starts firing
    on that fraction of the sample instead of on about half of it; the Adam moments of those
    columns/rows/entries reset as reset_adam_rows_(adam=...). b_dec itself is only read.
    """
    W_enc, b_enc, W_dec = (params[name] for name in ("W_enc", "b_enc", "W_dec"))
    n_features, d_in = W_enc.shape
    dead_idx = dead_idx.to(W_enc.device).long()
    if dead_idx.ndim != 1 or inputs.shape != (len(dead_idx), d_in):
        raise MonosemError(f"resample_: dead_idx {tuple(dead_idx.shape)} and inputs "
                           f"{tuple(inputs.shape)} must be [n_dead] and [n_dead, {d_in}]")
    if len(dead_idx) == 0:
        return
    if len(dead_idx.unique()) != len(dead_idx) or dead_idx.min() < 0 or dead_idx.max() >= n_features:
        raise MonosemError(f"resample_: dead_idx must be distinct features in [0, {n_features}); "
                           f"got {dead_idx.tolist()[:10]}")
    x = inputs.to(W_enc.device, W_enc.dtype)
    centred = centre and "b_dec" in params
    if centred:  # the encoder reads x − b_dec: point the feature at that
        x = x - params["b_dec"].to(x.device, x.dtype)
    norms = x.norm(dim=1, keepdim=True)  # [n_dead, 1]
    if (norms == 0).any():
        raise MonosemError(f"resample_: zero {'centred (x = b_dec) ' if centred else ''}input vector "
                           f"chosen for feature(s) "
                           f"{dead_idx[(norms[:, 0] == 0)].tolist()}")
    alive = torch.ones(n_features, dtype=torch.bool, device=dead_idx.device)
    alive[dead_idx] = False
    enc_norms = W_enc.norm(dim=1)  # [n_features]
    ref = enc_norms[alive].mean() if alive.any() else enc_norms.mean()  # all dead: mean over all rows
    direction = x / norms  # [n_dead, d_in]
    W_dec[:, dead_idx] = direction.T.to(W_dec.dtype)
    W_enc[dead_idx] = direction * (ENC_NORM_FACTOR * ref)
    b_enc[dead_idx] = 0.0
    if bias_sample is not None and density > 0:
        if "b_dec" not in params:
            raise MonosemError("resample_: a density bias needs params['b_dec']")
        b_enc[dead_idx] = density_bias(W_enc[dead_idx], params["b_dec"], bias_sample, density).to(b_enc.dtype)
    for name, state in states.items():
        if name in FEATURE_DIM:
            reset_adam_rows_(state, dead_idx, FEATURE_DIM[name], adam)


def dead_mask(last_fired_step: torch.Tensor, step: int, dead_window: int) -> torch.Tensor:
    """[n_features] bool: step - last_fired_step >= dead_window, both counted on the same clock.

    E.g. with step = steps completed: last_fired_step starts at 0, becomes step + 1 for the features
    that fired in step `step` (0-based), and `step` for resampled features (a fresh window).
    """
    return (step - last_fired_step) >= dead_window
