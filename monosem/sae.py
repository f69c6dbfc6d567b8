"""The sparse autoencoder: encode/decode, loss parts, decoder-norm constraint, init, schedules.

Pure tensor maths (no distribution, no I/O). Three recipes (`cfg.recipe`):
  anthropic-2023     Towards Monosemanticity: f = ReLU(W_enc (x - b_dec) + b_enc), x̂ = W_dec f + b_dec;
                     unit-norm decoder columns (gradient projection + renormalisation); Kaiming-uniform
                     init; b_dec = geometric median of a sample.
  anthropic-2024-04  The April 2024 update: f = ReLU(W_enc x + b_enc) (no pre-encoder bias), L1 weighted
                     by decoder column norms, no norm constraint, inputs scaled so E‖x‖ = √d_in (buffer
                     `scale`, applied inside forward), W_dec columns random with norm 0.1, W_enc = W_dec.T,
                     biases 0. λ warmup and LR decay: `trainee.l1_coeff_at`, `trainee.lr_factor`.
  topk               OpenAI's TopK SAE: the k largest pre-activations, then ReLU; no L1 (reported, not
                     applied); unit-norm decoder; W_enc = W_dec.T at init; AuxK loss on dead latents.
Units: forward multiplies x by `scale` (1 except anthropic-2024-04); mse, l1 and loss are in that scaled
space (so λ means the same on any data), x_hat and decode() come back in input units. MSE is a mean over
d_in elements for every recipe (the April update writes a sum: its λ is ours × d_in).

    sae = SAE(cfg.sae, generator=torch.Generator().manual_seed(0)); sae.init_from_data(sample)
    out = sae(x, l1_coeff=lam, dead_mask=dead)            # SAEOutput(x_hat, f, mse, l1, loss, aux)
    out.loss.backward(); opt.step(); sae.normalize_decoder()     # W_dec's gradient is projected in forward
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from monosem.config import ConfigError, SAEConfig
from monosem.errors import MonosemError
from monosem.sparse import MODES, SAEStep, StepSpec, column_norms, project_columns

RECIPES = ("anthropic-2023", "anthropic-2024-04", "topk")
DEC_INIT_NORM_2024 = 0.1  # April 2024 update: decoder columns start as random directions of norm 0.1
SPARSE_THRESHOLD = 0.05  # auto: sparse step at or below this density (it wins up to ~10% in fp32)


def loss_convention(recipe: str = "anthropic-2023") -> dict:
    """How the loss parts are reduced (goes into cfg.json: it changes the meaning of λ by a factor d_in)."""
    l1 = "sum over features of |f_i|"
    if recipe == "anthropic-2024-04":
        l1 += " * ||W_dec[:, i]||"
    return {
        "mse": "mean over batch and d_in elements of (x_hat - x)^2, in the SAE's input space (x * scale)",
        "l1": l1 + ", mean over batch (unweighted by l1_coeff)",
        "loss": "mse + aux" if recipe == "topk" else "mse + l1_coeff * l1",
        "aux": ("aux_coeff * sum ||e - e_hat||^2 / sum ||e||^2 over the batch, e = x - x_hat "
                "(detached), e_hat = W_dec @ top-aux_k dead latents") if recipe == "topk" else "0",
        "input_scale": "forward multiplies x by the buffer `scale`; x_hat is returned in input units",
    }


def cfg_json(cfg: SAEConfig) -> dict:
    """What a checkpoint needs to rebuild and interpret the SAE."""
    return {"d_in": cfg.d_in, "n_features": cfg.n_features, "recipe": cfg.recipe,
            "l1_coeff": cfg.l1_coeff, "k": cfg.k, "aux_k": cfg.aux_k, "aux_coeff": cfg.aux_coeff,
            "resample_loss": cfg.resample_loss, "loss_convention": loss_convention(cfg.recipe)}


class SAEOutput(NamedTuple):
    x_hat: torch.Tensor  # [B, d_in] in input units
    f: torch.Tensor      # [B, n_features] feature activations
    mse: torch.Tensor    # scalar
    l1: torch.Tensor     # scalar, not multiplied by λ
    loss: torch.Tensor   # scalar: mse + λ·l1 (+ aux)
    aux: torch.Tensor    # scalar AuxK loss (topk), else 0


def geometric_median(x: torch.Tensor, iters: int = 100, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm in float64 from the mean; eps floors distances and stops on a tiny step."""
    xd = x.detach().double()  # [N, d]
    y = xd.mean(0)
    for _ in range(iters):
        w = 1.0 / (xd - y).norm(dim=1).clamp_min(eps)  # [N]
        y_new = (w.unsqueeze(1) * xd).sum(0) / w.sum()
        done = (y_new - y).norm() <= eps * (1.0 + y.norm())
        y = y_new
        if done:
            break
    return y.to(x.dtype)


def input_scale(sample: torch.Tensor) -> float:
    """Scale that makes E‖x·scale‖ = √d_in on this sample (anthropic-2024-04)."""
    mean_norm = sample.detach().double().norm(dim=1).mean().item()
    if not mean_norm > 0 or not math.isfinite(mean_norm):
        raise MonosemError(f"input_scale: sample of shape {tuple(sample.shape)} has mean norm {mean_norm}")
    return math.sqrt(sample.shape[1]) / mean_norm


def normalize_columns_(W_dec: torch.Tensor) -> torch.Tensor:
    """Rescale each column of W_dec [d_in, n_features] to unit norm, in place; returns W_dec."""
    return W_dec.div_(column_norms(W_dec, keepdim=True).clamp_min(1e-12))


class _ProjectColumnGrad(torch.autograd.Function):
    """Identity forward; backward removes from each column of the gradient its part parallel to that
    column of W_dec: g - w (w·g) / (w·w). Inside the graph, so it holds under any engine (DDP, or DeepSpeed
    ZeRO where `W_dec.grad` is never exposed between backward and step); linear, so projecting each rank's
    gradient before the reduction equals projecting the reduced one. Saves a detached copy of W_dec, since
    ZeRO-3 frees the gathered parameter after forward. (Used by the autograd path; SAEStep projects itself.)"""

    @staticmethod
    def forward(ctx, W_dec: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(W_dec.detach().clone())
        return W_dec.view_as(W_dec)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        return project_columns(g, w)


class SAE(nn.Module):
    """`sparse` (auto | on | off) and `sparse_threshold` choose the training step's path: `auto` runs the
    sparse step when the batch's active entries / (B x n_features) <= sparse_threshold (train_sae.sparse,
    train_sae.sparse_threshold). After each forward, `last_path` is "sparse", "dense" or "autograd" (input
    that requires grad), `last_density` the measured density (nan when not measured) and `last_counts`
    how many vectors each feature fired on ([n_features] int64; None after the autograd path)."""

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None, sparse: str = "auto",
                 sparse_threshold: float = SPARSE_THRESHOLD):
        super().__init__()
        if sparse not in MODES:
            raise ConfigError(f"train_sae.sparse must be one of {', '.join(MODES)}; got {sparse!r}")
        if not 0.0 <= sparse_threshold <= 1.0:
            raise ConfigError(f"train_sae.sparse_threshold must be in [0, 1]; got {sparse_threshold}")
        self.sparse_mode, self.sparse_threshold = sparse, float(sparse_threshold)
        self.last_path, self.last_density, self.last_counts = "", float("nan"), None
        if cfg.recipe not in RECIPES:
            raise MonosemError(f"sae.recipe must be one of {', '.join(RECIPES)}; got {cfg.recipe!r}")
        if cfg.recipe == "topk" and not 0 < cfg.k <= cfg.n_features:
            raise MonosemError(f"sae.k must be in [1, sae.n_features={cfg.n_features}]; got {cfg.k}")
        self.cfg = cfg
        self.recipe = cfg.recipe
        self.unit_norm = cfg.recipe != "anthropic-2024-04"  # decoder columns constrained to norm 1
        self.pre_bias = cfg.recipe != "anthropic-2024-04"   # subtract b_dec before encoding
        d_in, n = cfg.d_in, cfg.n_features
        self.W_enc = nn.Parameter(torch.empty(n, d_in))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(d_in, n))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(()))  # input scale (≠ 1 only for anthropic-2024-04)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if self.recipe == "anthropic-2024-04":
            self.W_dec.normal_(generator=generator)
            self.W_dec.mul_(DEC_INIT_NORM_2024 / self.W_dec.norm(dim=0, keepdim=True))
            self.W_enc.copy_(self.W_dec.T)
        else:
            nn.init.kaiming_uniform_(self.W_dec, generator=generator)
            self.normalize_decoder()
            if self.recipe == "topk":  # OpenAI: encoder starts as the decoder's transpose
                self.W_enc.copy_(self.W_dec.T)
            else:
                nn.init.kaiming_uniform_(self.W_enc, generator=generator)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def b_dec_from_data(self, sample: torch.Tensor) -> torch.Tensor | None:
        """The geometric median of a (scaled) sample [N, d_in]; None for anthropic-2024-04 (b_dec stays 0)."""
        if self.recipe == "anthropic-2024-04":
            return None
        return geometric_median(sample.to(self.scale.device) * self.scale)

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor) -> None:
        """b_dec = geometric median of a sample of inputs; anthropic-2024-04 keeps b_dec = 0."""
        value = self.b_dec_from_data(sample)
        if value is not None:
            self.b_dec.copy_(value)

    @torch.no_grad()
    def init_input_scale(self, sample: torch.Tensor) -> None:
        """The data-dependent input scale (a buffer; anthropic-2024-04 only)."""
        if self.recipe == "anthropic-2024-04":
            self.set_input_scale(input_scale(sample))

    @torch.no_grad()
    def set_input_scale(self, value: float) -> None:
        self.scale.fill_(value)

    def input_scale_value(self) -> float:
        return float(self.scale)

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor) -> None:
        """All data-dependent init from a sample [N, d_in]: the input scale (anthropic-2024-04), then b_dec."""
        self.init_input_scale(sample)
        self.init_b_dec(sample)

    def cfg_json(self) -> dict:
        """cfg_json(self.cfg) plus the input scale."""
        return cfg_json(self.cfg) | {"input_scale": self.input_scale_value()}

    # ---- forward pieces --------------------------------------------------------------------
    def _pre_acts(self, xs: torch.Tensor) -> torch.Tensor:
        if self.pre_bias:
            xs = xs - self.b_dec
        return xs @ self.W_enc.T + self.b_enc  # [B, n_features]

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.recipe != "topk":
            return torch.relu(pre)
        # keep the k largest pre-activations, then ReLU (same nonzeros as ReLU then top-k)
        vals, idx = pre.topk(self.cfg.k, dim=-1)  # [B, k]
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._activate(self._pre_acts(x * self.scale))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction in input units."""
        return (f @ self.W_dec.T + self.b_dec) / self.scale

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x_hat for x of any leading shape [..., d_in] (splicing into the LM), in input units."""
        return self.decode(self.encode(x))

    def _terms(self, xs: torch.Tensor, xs_hat: torch.Tensor,
               f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mse_i = (xs_hat - xs).pow(2).mean(-1)  # [B]
        if self.recipe == "anthropic-2024-04":
            l1_i = f.abs() @ self.W_dec.norm(dim=0)  # [B]
        else:
            l1_i = f.abs().sum(-1)  # [B]
        return mse_i, l1_i

    def _auxk(self, xs: torch.Tensor, xs_hat: torch.Tensor, pre: torch.Tensor,
              dead_mask: torch.Tensor | None, W_dec: torch.Tensor) -> torch.Tensor:
        """OpenAI's AuxK: explain the residual with the top aux_k dead latents (0 if none are dead)."""
        zero = xs_hat.new_zeros(())
        if self.recipe != "topk" or dead_mask is None or self.cfg.aux_k == 0:
            return zero
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return zero
        masked = pre.masked_fill(~dead_mask.to(pre.device), float("-inf"))
        vals, idx = masked.topk(min(self.cfg.aux_k, n_dead), dim=-1)  # [B, k_aux]
        f_aux = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        e = (xs - xs_hat).detach()  # [B, d_in] residual the dead latents should explain
        e_hat = f_aux @ W_dec.T
        return self.cfg.aux_coeff * (e_hat - e).pow(2).sum() / e.pow(2).sum().clamp_min(1e-12)

    def forward(self, x: torch.Tensor, l1_coeff: float | None = None,
                dead_mask: torch.Tensor | None = None) -> SAEOutput:
        """x [..., d_in]. The training step with a hand-written backward (monosem.sparse.SAEStep), sparse or
        dense by measured density; plain autograd when x itself requires grad. Under autocast the dense
        GEMMs run in its dtype and f comes back in it; x_hat and the loss parts stay float32."""
        lam = 0.0 if self.recipe == "topk" else (self.cfg.l1_coeff if l1_coeff is None else l1_coeff)
        if x.requires_grad:
            self.last_path, self.last_density, self.last_counts = "autograd", float("nan"), None
            return self._forward_autograd(x, lam, dead_mask)
        lead, d_in = x.shape[:-1], self.cfg.d_in
        xs = (x * self.scale).reshape(-1, d_in)  # [B, d_in] in the SAE's working space
        dev = xs.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.W_enc.dtype
        dead_idx = None
        if self.recipe == "topk" and dead_mask is not None:
            dead_idx = dead_mask.to(xs.device).nonzero().flatten()  # [n_dead]
        spec = StepSpec(self.recipe, self.sparse_mode, self.sparse_threshold, cd, self.cfg.k,
                        self.cfg.aux_k, self.cfg.aux_coeff, dead_idx, self.unit_norm)
        info: dict = {}
        with torch.autocast(dev, enabled=False):
            xs_hat, f, mse, l1, aux = SAEStep.apply(self.W_enc, self.b_enc, self.W_dec, self.b_dec, xs,
                                                    spec, info)
        self.last_path, self.last_density, self.last_counts = info["path"], info["density"], info["counts"]
        x_hat = (xs_hat / self.scale).reshape(*lead, d_in)
        return SAEOutput(x_hat, f.reshape(*lead, -1), mse, l1, mse + lam * l1 + aux, aux)

    def _forward_autograd(self, x: torch.Tensor, lam: float,
                          dead_mask: torch.Tensor | None) -> SAEOutput:
        xs = x * self.scale  # [..., d_in] in the SAE's working space
        pre = self._pre_acts(xs)
        f = self._activate(pre)
        # unit-norm recipes: W_dec's gradient (both paths: reconstruction and AuxK) comes back projected
        W_dec = _ProjectColumnGrad.apply(self.W_dec) if self.unit_norm else self.W_dec
        xs_hat = f @ W_dec.T + self.b_dec
        mse_i, l1_i = self._terms(xs, xs_hat, f)
        mse, l1 = mse_i.mean(), l1_i.mean()
        aux = self._auxk(xs, xs_hat, pre, dead_mask, W_dec)
        return SAEOutput(xs_hat / self.scale, f, mse, l1, mse + lam * l1 + aux, aux)

    @torch.no_grad()
    def losses_per_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-input (mse [B], l1 [B]) with the same reductions as forward (for resampling)."""
        xs = x * self.scale
        f = self._activate(self._pre_acts(xs))
        return self._terms(xs, f @ self.W_dec.T + self.b_dec, f)

    # ---- decoder-norm constraint -----------------------------------------------------------
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from W_dec.grad the part parallel to each decoder column (no-op without the constraint).
        forward() already projects inside the graph, so after `loss.backward()` this is a (harmless)
        second projection; it is kept for gradients that did not come through forward()."""
        g = self.W_dec.grad
        if not self.unit_norm or g is None:
            return
        g.copy_(project_columns(g, self.W_dec))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder columns to unit norm (no-op for anthropic-2024-04)."""
        if self.unit_norm:
            normalize_columns_(self.W_dec)


def fired(f: torch.Tensor) -> torch.Tensor:
    """[n_features] bool: which features were active on any vector of this batch."""
    return (f > 0).any(dim=0)
