"""Tests for the SAE step's two paths (monosem.sparse via SAE.forward): the sparse and the dense step against
an independent float64 reference (the dense formulas through torch autograd, decoder projection by hand),
at planted sparsity (negative encoder bias, L0 ~ 1-3% of n_features): loss parts, every gradient, the
weights after Adam steps, for all three recipes; the `auto` switch; bf16 autocast; edge cases.

    OMP_NUM_THREADS=1 python -m pytest -q -x tests/test_sparse.py
"""
import math

import numpy as np
import pytest
import torch

from monosem.config import ConfigError, SAEConfig
from monosem.sae import SAE

RECIPES = ["anthropic-2023", "anthropic-2024-04", "topk"]
D_IN, N_FEAT, B, K, AUX_K, LAM = 24, 256, 96, 4, 8, 5e-2
PATHS = {"on": "sparse", "off": "dense"}


def batch(seed, n=B):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def planted_sae(recipe, mode="auto", dtype=torch.float64, density=0.02, seed=0):
    """An SAE whose encoder bias puts ~`density` of the entries above 0 on `batch` data."""
    cfg = SAEConfig(recipe=recipe, d_in=D_IN, n_features=N_FEAT, l1_coeff=LAM, k=K, aux_k=AUX_K)
    sae = SAE(cfg, generator=torch.Generator().manual_seed(seed), sparse=mode).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(0.2 * torch.randn(D_IN, generator=g, dtype=torch.float64))
        sae.W_dec.mul_(1 + 0.2 * torch.rand(N_FEAT, generator=g, dtype=torch.float64))
        if recipe == "anthropic-2024-04":
            sae.set_input_scale(1.3)
        xs = batch(100, 512) * sae.scale
        xc = xs if recipe == "anthropic-2024-04" else xs - sae.b_dec
        pre = xc @ sae.W_enc.T  # [512, N_FEAT]; a per-feature threshold at the (1 - density) quantile
        sae.b_enc.copy_(-torch.quantile(pre, 1 - density, dim=0)
                        + 0.05 * torch.randn(N_FEAT, generator=g, dtype=torch.float64))
    return sae.to(dtype)


def dead_for(recipe):
    return (torch.arange(N_FEAT) % 4 == 1) if recipe == "topk" else None


def ref_loss(p, x, recipe, lam, dead, scale, aux_coeff=1 / 32):
    """Float64 dense formulas of the three recipes: (mse, l1, aux, loss), differentiable in p."""
    xs = x * scale
    xc = xs if recipe == "anthropic-2024-04" else xs - p["b_dec"]
    pre = xc @ p["W_enc"].T + p["b_enc"]
    f = torch.relu(pre)
    if recipe == "topk":
        keep = torch.zeros_like(pre).scatter(1, pre.detach().argsort(1, descending=True)[:, :K], 1.0)
        f = f * keep
    xs_hat = f @ p["W_dec"].T + p["b_dec"]
    mse = (xs_hat - xs).pow(2).mean()
    weight = p["W_dec"].norm(dim=0) if recipe == "anthropic-2024-04" else 1.0
    l1 = (f * weight).sum(1).mean()
    aux = torch.zeros((), dtype=x.dtype)
    if recipe == "topk" and dead is not None and dead.any():
        cand = torch.where(dead[None, :], pre, torch.full_like(pre, -math.inf))
        top = cand.detach().argsort(1, descending=True)[:, :min(AUX_K, int(dead.sum()))]
        f_aux = torch.relu(pre) * torch.zeros_like(pre).scatter(1, top, 1.0)
        e = (xs - xs_hat).detach()
        aux = aux_coeff * (f_aux @ p["W_dec"].T - e).pow(2).sum() / e.pow(2).sum()
    return mse, l1, aux, mse + (0.0 if recipe == "topk" else lam) * l1 + aux


def ref_grads(sae, x, recipe, lam, dead):
    p = {n: t.detach().double().clone().requires_grad_() for n, t in sae.named_parameters()}
    parts = ref_loss(p, x.double(), recipe, lam, dead, float(sae.scale))
    parts[3].backward()
    g = {n: t.grad for n, t in p.items()}
    if recipe != "anthropic-2024-04":  # tangent to the unit-norm constraint, per decoder column
        w = p["W_dec"].detach()
        g["W_dec"] = g["W_dec"] - w * (w * g["W_dec"]).sum(0) / (w * w).sum(0)
    return [v.item() for v in parts], g


def assert_close(got, want, rtol, name):
    scale = want.abs().max().item()
    np.testing.assert_allclose(got.detach().double().numpy(), want.detach().numpy(), rtol=rtol,
                               atol=rtol * max(scale, 1e-12), err_msg=name)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 3e-4)])
def test_loss_parts_and_every_gradient_match_float64_reference(recipe, mode, dtype, rtol):
    sae, x, dead = planted_sae(recipe, mode, dtype), batch(1), dead_for(recipe)
    want_parts, want = ref_grads(sae, x, recipe, LAM, dead)
    out = sae(x.to(dtype), l1_coeff=LAM, dead_mask=dead)
    assert sae.last_path == PATHS[mode]
    if mode == "on":
        assert 0.005 < sae.last_density < 0.05, sae.last_density  # really sparse, really active
    for got, ref, name in zip([out.mse, out.l1, out.aux, out.loss], want_parts, ["mse", "l1", "aux", "loss"]):
        np.testing.assert_allclose(got.item(), ref, rtol=rtol, err_msg=name)
    if recipe == "topk":
        assert out.aux.item() > 0 and ((out.f > 0).sum(1) <= K).all()
    assert torch.equal(sae.last_counts, (out.f > 0).sum(0))  # the trainer's fire counts, either path
    out.loss.backward()
    for name, param in sae.named_parameters():
        assert param.grad.dtype == dtype and param.grad.shape == param.shape
        assert_close(param.grad, want[name], rtol, name)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("mode", ["on", "off"])
def test_weights_after_adam_steps_match_float64_reference(recipe, mode):
    sae, dead = planted_sae(recipe, mode), dead_for(recipe)
    p = {n: t.detach().clone().requires_grad_() for n, t in sae.named_parameters()}
    opt, ref_opt = torch.optim.Adam(sae.parameters(), lr=1e-2), torch.optim.Adam(p.values(), lr=1e-2)
    paths = set()
    for step in range(6):
        x = batch(10 + step)
        opt.zero_grad()
        sae(x, l1_coeff=LAM, dead_mask=dead).loss.backward()
        paths.add(sae.last_path)
        opt.step()
        sae.normalize_decoder()
        ref_opt.zero_grad()
        ref_loss(p, x, recipe, LAM, dead, float(sae.scale))[3].backward()
        with torch.no_grad():
            if recipe != "anthropic-2024-04":
                w, g = p["W_dec"], p["W_dec"].grad
                g -= w * (w * g).sum(0) / (w * w).sum(0)
            ref_opt.step()
            if recipe != "anthropic-2024-04":
                p["W_dec"] /= p["W_dec"].norm(dim=0)
    assert paths == {PATHS[mode]}
    for name, param in sae.named_parameters():
        moved = (param - planted_sae(recipe)._parameters[name]).abs().max()
        assert moved > 1e-3, name  # the test would see a wrong update
        assert_close(param, p[name], 1e-9, name)


def test_auto_switches_paths_by_density():
    sae = planted_sae("anthropic-2023", "auto", density=0.02)
    x = batch(2)
    sae(x)
    assert sae.last_path == "sparse" and 0.005 < sae.last_density < 0.05
    d = sae.last_density
    sae.sparse_threshold = 0.9 * d  # just below what this batch measures
    sae(x)
    assert sae.last_path == "dense" and sae.last_density == d
    sae.sparse_threshold = d  # at the threshold: sparse
    sae(x)
    assert sae.last_path == "sparse"
    dense = planted_sae("anthropic-2023", "auto", density=0.5)  # early training: half the entries active
    dense(x)
    assert dense.last_path == "dense" and dense.last_density > 0.3
    off = planted_sae("anthropic-2023", "off")
    off(x)
    assert off.last_path == "dense" and math.isnan(off.last_density)  # not measured when off
    topk = planted_sae("topk", "auto")  # K / N_FEAT = 1.6% active
    topk(x, dead_mask=dead_for("topk"))
    assert topk.last_path == "sparse" and topk.last_density <= K / N_FEAT
    with pytest.raises(ConfigError, match="train_sae.sparse"):
        SAE(SAEConfig(d_in=D_IN, n_features=N_FEAT), sparse="always")
    with pytest.raises(ConfigError, match="train_sae.sparse_threshold"):
        SAE(SAEConfig(d_in=D_IN, n_features=N_FEAT), sparse_threshold=1.5)


@pytest.mark.parametrize("recipe", RECIPES)
def test_sparse_path_at_high_density_and_with_no_active_entry(recipe):
    x, dead = batch(3), dead_for(recipe)
    sae = planted_sae(recipe, "on", density=0.5)
    want_parts, want = ref_grads(sae, x, recipe, LAM, dead)
    out = sae(x, dead_mask=dead)
    out.loss.backward()
    assert sae.last_path == "sparse"
    np.testing.assert_allclose(out.loss.item(), want_parts[3], rtol=1e-10)
    for name, param in sae.named_parameters():
        assert_close(param.grad, want[name], 1e-10, name)
    quiet = planted_sae(recipe, "on")
    with torch.no_grad():
        quiet.b_enc.fill_(-1e3)  # nothing fires: x̂ = b_dec, only b_dec learns (and AuxK finds nothing)
    out = quiet(x, dead_mask=dead)
    out.loss.backward()
    assert quiet.last_density == 0.0 and out.l1.item() == 0.0 and not out.f.any()
    assert torch.allclose(out.x_hat * quiet.scale, quiet.b_dec.expand_as(x))
    assert quiet.b_dec.grad.abs().max() > 0
    for name in ("W_enc", "b_enc", "W_dec"):
        assert not getattr(quiet, name).grad.any(), name


@pytest.mark.parametrize("recipe", RECIPES)
def test_bf16_autocast_both_paths_keep_float32_masters(recipe):
    x, dead = batch(4).float(), dead_for(recipe)
    _, want = ref_grads(planted_sae(recipe), x.double(), recipe, LAM, dead)
    grads = {}
    for mode in ("on", "off"):
        sae = planted_sae(recipe, mode, torch.float32)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae(x, l1_coeff=LAM, dead_mask=dead)
        assert sae.last_path == PATHS[mode]
        assert out.f.dtype == torch.bfloat16 and out.loss.dtype == out.x_hat.dtype == torch.float32
        out.loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in sae.named_parameters()}
        for name, p in sae.named_parameters():
            assert p.grad.dtype == torch.float32, name
            # bf16 inputs and encoder output: a few entries near the threshold (or the top-k edge) flip
            # activity and move whole rows, so compare whole tensors (a wrong formula is off by ~1)
            err = (p.grad.double() - want[name]).norm() / want[name].norm()
            assert err < 0.2, (name, err.item())
        opt.step()
        assert all(p.dtype == torch.float32 for p in sae.parameters())
        assert all(s.dtype == torch.float32 for st in opt.state.values() for s in st.values()
                   if s.dim() > 0)
    for name in grads["on"]:  # same bf16 encoder output: the two paths agree more closely
        assert_close(grads["on"][name], grads["off"][name], 0.05, name)


def test_leading_dims_and_input_gradients():
    sae = planted_sae("anthropic-2023", "on", density=0.05)
    x = batch(5).reshape(4, B // 4, D_IN)
    out = sae(x)
    assert sae.last_path == "sparse" and out.x_hat.shape == x.shape and out.f.shape == (4, B // 4, N_FEAT)
    flat = sae(x.reshape(B, D_IN))
    torch.testing.assert_close(out.x_hat.reshape(B, D_IN), flat.x_hat, rtol=1e-12, atol=1e-12)
    xg = x.clone().requires_grad_()
    out_g = sae(xg)  # gradients to the input: plain autograd
    assert sae.last_path == "autograd"
    out_g.loss.backward()
    assert xg.grad is not None and torch.isclose(out_g.loss, out.loss, rtol=1e-12)
