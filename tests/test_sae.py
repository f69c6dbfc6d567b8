"""Tests for monosem.sae against an independent float64 numpy reference written from the formulas.

    OMP_NUM_THREADS=1 python -m pytest -q -x tests/test_sae.py
"""
import json
import math

import numpy as np
import pytest
import torch

from monosem.config import SAEConfig
from monosem.errors import MonosemError
from monosem.sae import SAE, cfg_json, fired, geometric_median, input_scale, loss_convention
from monosem.trainee import l1_coeff_at, lr_factor

RECIPES = ["anthropic-2023", "anthropic-2024-04", "topk"]
D_IN, N_FEAT, K, AUX_K, LAM = 12, 40, 5, 6, 3e-2


def make_sae(recipe, dtype=torch.float64, seed=0, **kw):
    cfg = SAEConfig(recipe=recipe, d_in=D_IN, n_features=N_FEAT, l1_coeff=LAM, k=K, aux_k=AUX_K, **kw)
    sae = SAE(cfg, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.no_grad():  # generic parameters: nonzero biases, non-unit columns, a non-trivial scale
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_enc.copy_(0.1 * torch.randn(N_FEAT, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(D_IN, generator=g))
        sae.W_dec.mul_(1 + 0.2 * torch.rand(N_FEAT, generator=g))
        if recipe == "anthropic-2024-04":
            sae.W_enc.add_(0.1 * torch.randn(N_FEAT, D_IN, generator=g))
            sae.set_input_scale(1.7)
    return sae


def params_np(sae):
    return {n: p.detach().double().numpy().copy() for n, p in sae.named_parameters()} | {
        "scale": float(sae.scale)}


def ref_forward(p, x, recipe, lam, dead=None, aux_coeff=1 / 32):
    """Float64 reference of the three recipes; returns x_hat, f, mse, l1, loss, aux and internals."""
    W_enc, b_enc, W_dec, b_dec, s = p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], p["scale"]
    B = x.shape[0]
    xs = x * s
    xc = xs if recipe == "anthropic-2024-04" else xs - b_dec
    pre = xc @ W_enc.T + b_enc
    f = np.maximum(pre, 0.0)
    if recipe == "topk":
        keep = np.zeros_like(pre, dtype=bool)
        for b in range(B):
            keep[b, np.argsort(-pre[b])[:K]] = True
        f = np.where(keep, f, 0.0)
    xs_hat = f @ W_dec.T + b_dec
    mse = np.mean((xs_hat - xs) ** 2)
    col_norms = np.sqrt((W_dec ** 2).sum(0))
    l1 = np.mean((np.abs(f) * (col_norms if recipe == "anthropic-2024-04" else 1.0)).sum(1))
    aux, f_aux = 0.0, np.zeros_like(f)
    if recipe == "topk" and dead is not None and dead.any():
        cand = np.flatnonzero(dead)
        for b in range(B):
            top = cand[np.argsort(-pre[b, cand])][: min(AUX_K, len(cand))]
            f_aux[b, top] = np.maximum(pre[b, top], 0.0)
        e = xs - xs_hat
        aux = aux_coeff * ((f_aux @ W_dec.T - e) ** 2).sum() / (e ** 2).sum()
    loss = mse + (0.0 if recipe == "topk" else lam) * l1 + aux
    inner = dict(xs=xs, xc=xc, f_aux=f_aux, col_norms=col_norms)
    return xs_hat / s, f, mse, l1, loss, aux, inner


def ref_grads(p, x, recipe, lam, f, inner, aux_coeff=1 / 32):
    """Hand-derived float64 gradients of the loss, with the decoder projection for unit-norm recipes."""
    W_enc, W_dec, b_dec = p["W_enc"], p["W_dec"], p["b_dec"]
    B, d = x.shape
    xs, xc, f_aux, n = inner["xs"], inner["xc"], inner["f_aux"], inner["col_norms"]
    r = f @ W_dec.T + b_dec - xs
    g_xhat = 2 * r / (B * d)  # d mse / d xs_hat
    gW_dec, gb_dec, g_f = g_xhat.T @ f, g_xhat.sum(0), g_xhat @ W_dec
    if recipe == "anthropic-2023":
        g_f = g_f + lam / B
    elif recipe == "anthropic-2024-04":
        g_f = g_f + lam * n / B
        gW_dec = gW_dec + lam / B * (W_dec / n) * f.sum(0)
    g_pre = g_f * (f > 0)
    if recipe == "topk" and f_aux.any():
        e = -r  # residual, a constant for the aux loss
        g_eh = 2 * aux_coeff * (f_aux @ W_dec.T - e) / (e ** 2).sum()
        gW_dec = gW_dec + g_eh.T @ f_aux
        g_pre = g_pre + (g_eh @ W_dec) * (f_aux > 0)
    gW_enc, gb_enc = g_pre.T @ xc, g_pre.sum(0)
    if recipe != "anthropic-2024-04":
        gb_dec = gb_dec - (g_pre @ W_enc).sum(0)
        gW_dec = gW_dec - W_dec * (W_dec * gW_dec).sum(0) / (W_dec ** 2).sum(0)
    return {"W_enc": gW_enc, "b_enc": gb_enc, "W_dec": gW_dec, "b_dec": gb_dec}


def batch(seed=0, n=32):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dead_for(recipe):
    return (torch.arange(N_FEAT) % 3 == 0) if recipe == "topk" else None


@pytest.mark.parametrize("recipe", RECIPES)
def test_loss_parts_match_reference(recipe):
    sae, x = make_sae(recipe), batch()
    dead = dead_for(recipe)
    out = sae(x, dead_mask=dead)
    ref = ref_forward(params_np(sae), x.numpy(), recipe, LAM, None if dead is None else dead.numpy())
    for got, want, name in zip(out, ref[:6], ["x_hat", "f", "mse", "l1", "loss", "aux"]):
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10, atol=1e-12, err_msg=name)
    # an explicit l1_coeff overrides cfg.l1_coeff (topk never applies λ)
    out2 = sae(x, l1_coeff=2 * LAM, dead_mask=dead)
    want = ref_forward(params_np(sae), x.numpy(), recipe, 2 * LAM, None if dead is None else dead.numpy())[4]
    np.testing.assert_allclose(out2.loss.item(), want, rtol=1e-10)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_gradients_after_projection_match_reference(recipe, dtype, rtol):
    sae64 = make_sae(recipe)
    p = params_np(sae64)
    sae = make_sae(recipe, dtype=dtype)
    x = batch(1)
    dead = dead_for(recipe)
    _, f, *_, inner = ref_forward(p, x.numpy(), recipe, LAM, None if dead is None else dead.numpy())
    want = ref_grads(p, x.numpy(), recipe, LAM, f, inner)
    sae(x.to(dtype), dead_mask=dead).loss.backward()
    sae.project_decoder_grad()
    for name, param in sae.named_parameters():
        got = param.grad.double().numpy()
        scale = np.abs(want[name]).max()
        np.testing.assert_allclose(got, want[name], rtol=rtol, atol=rtol * scale, err_msg=name)
    if recipe != "anthropic-2024-04":  # projected decoder gradient is orthogonal to each column
        w, g = sae.W_dec.detach().double(), sae.W_dec.grad.double()
        assert (w * g).sum(0).abs().max() < 10 * rtol * g.abs().max()


@pytest.mark.parametrize("recipe", ["anthropic-2023", "topk"])
def test_unit_norm_columns_after_adam_steps(recipe):
    sae = make_sae(recipe, dtype=torch.float32)
    sae.normalize_decoder()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(5):
        opt.zero_grad()
        sae(batch(step).float(), dead_mask=dead_for(recipe)).loss.backward()
        sae.project_decoder_grad()
        opt.step()
        # Adam's per-element scaling breaks the tangent step: the norm drifts before renormalising
        if step == 0:
            assert (sae.W_dec.norm(dim=0) - 1).abs().max() > 1e-5
        sae.normalize_decoder()
        np.testing.assert_allclose(sae.W_dec.norm(dim=0).detach().numpy(), 1.0, atol=1e-6)


def test_2024_04_has_no_norm_constraint_and_april_init():
    cfg = SAEConfig(recipe="anthropic-2024-04", d_in=D_IN, n_features=N_FEAT)
    sae = SAE(cfg, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(sae.W_dec.norm(dim=0).detach().numpy(), 0.1, rtol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    sae.init_b_dec(batch().float() + 5)
    assert torch.count_nonzero(sae.b_dec) == 0 and torch.count_nonzero(sae.b_enc) == 0
    before = sae.W_dec.detach().clone()
    sae(batch().float()).loss.backward()
    grad = sae.W_dec.grad.clone()
    sae.project_decoder_grad()
    sae.normalize_decoder()
    assert torch.equal(sae.W_dec.grad, grad) and torch.equal(sae.W_dec, before)


def test_input_scale_makes_mean_norm_sqrt_d():
    x = 7.0 * batch(2, n=200).float()
    s = input_scale(x)
    mean_norm = (x.double() * s).norm(dim=1).mean().item()
    assert math.isclose(mean_norm, math.sqrt(D_IN), rel_tol=1e-6)
    with pytest.raises(MonosemError, match="mean norm"):
        input_scale(torch.zeros(4, D_IN))


def test_2024_04_scale_is_undone_on_x_hat():
    sae = make_sae("anthropic-2024-04")
    x = batch()
    out = sae(x)
    sae.set_input_scale(1.0)
    with torch.no_grad():  # same map in input units: fold the scale into the parameters
        sae.W_enc.mul_(1.7)
        sae.W_dec.div_(1.7)
        sae.b_dec.div_(1.7)
    want = out.x_hat.detach().numpy()
    np.testing.assert_allclose(sae(x).x_hat.detach().numpy(), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sae.decode(sae.encode(x)).detach().numpy(), want, rtol=1e-10, atol=1e-12)


def test_kaiming_init_unit_decoder_and_determinism():
    cfg = SAEConfig(recipe="anthropic-2023", d_in=D_IN, n_features=N_FEAT)
    a = SAE(cfg, generator=torch.Generator().manual_seed(5))
    b = SAE(cfg, generator=torch.Generator().manual_seed(5))
    c = SAE(cfg, generator=torch.Generator().manual_seed(6))
    for name, p in a.state_dict().items():
        assert torch.equal(p, b.state_dict()[name]), name
    assert not torch.equal(a.W_enc, c.W_enc)
    np.testing.assert_allclose(a.W_dec.norm(dim=0).detach().numpy(), 1.0, rtol=1e-6)
    bound = math.sqrt(6 / D_IN)  # kaiming uniform, fan_in = d_in, gain √2
    assert a.W_enc.abs().max() <= bound and a.W_enc.abs().max() > 0.9 * bound
    t = SAE(SAEConfig(recipe="topk", d_in=D_IN, n_features=N_FEAT, k=K),
            generator=torch.Generator().manual_seed(5))
    assert torch.equal(t.W_enc, t.W_dec.T)


def ref_weiszfeld(x, iters=2000):
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / np.maximum(np.sqrt(((x - y) ** 2).sum(1)), 1e-12)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


def test_geometric_median():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 5)) * [1, 2, 3, 0.5, 1] + 4.0
    x[:20] += 50.0  # outliers: the median barely moves, the mean does
    gm = geometric_median(torch.tensor(x), iters=500, eps=1e-12).numpy()
    np.testing.assert_allclose(gm, ref_weiszfeld(x), atol=1e-8)
    cost = lambda y: np.sqrt(((x - y) ** 2).sum(1)).sum()  # noqa: E731
    for u in rng.standard_normal((50, 5)):
        assert cost(gm) <= cost(gm + 1e-3 * u / np.linalg.norm(u))
    unit = (gm - x) / np.linalg.norm(gm - x, axis=1, keepdims=True)
    assert np.linalg.norm(unit.sum(0)) < 1e-4 * len(x)  # first-order optimality
    assert np.linalg.norm(gm - 4.0) < 1.0 < np.linalg.norm(x.mean(0) - 4.0)
    # 1-D: the geometric median is the median
    x1 = rng.standard_normal((101, 1)) ** 3
    gm1 = geometric_median(torch.tensor(x1, dtype=torch.float32), iters=2000)
    assert gm1.dtype == torch.float32
    assert abs(gm1.item() - np.median(x1)) < 1e-4


def test_init_b_dec_sets_geometric_median():
    sae = make_sae("anthropic-2023")
    x = batch(4, n=64) + 2
    sae.init_b_dec(x)
    np.testing.assert_allclose(sae.b_dec.detach().numpy(), ref_weiszfeld(x.numpy()), atol=1e-6)


def test_topk_exactly_k_active_and_fired():
    sae = make_sae("topk", dtype=torch.float32)
    f = sae(batch(5, n=64).float()).f
    assert ((f > 0).sum(1) == K).all()
    assert fired(f).dtype == torch.bool and fired(f).shape == (N_FEAT,)
    assert torch.equal(fired(f), (f > 0).sum(0) > 0)
    assert torch.equal(sae.encode(batch(5, n=64).float()), f)


def test_auxk_zero_without_dead_and_positive_with_dead_only_on_dead_rows():
    sae = make_sae("topk")
    x = batch(6)
    for dead in [None, torch.zeros(N_FEAT, dtype=torch.bool)]:
        out = sae(x, dead_mask=dead)
        assert out.aux.item() == 0.0 and out.loss.item() == out.mse.item()
    dead = torch.zeros(N_FEAT, dtype=torch.bool)
    dead[[1, 7, 20, 33]] = True
    out = sae(x, dead_mask=dead)
    assert out.aux > 0 and torch.isclose(out.loss, out.mse + out.aux)
    sae.zero_grad()
    out.aux.backward()  # the aux loss trains only the dead latents' encoder rows
    nonzero_rows = sae.W_enc.grad.abs().sum(1) > 0
    assert nonzero_rows.any() and not (nonzero_rows & ~dead).any()
    nonzero_cols = sae.W_dec.grad.abs().sum(0) > 0
    assert nonzero_cols.any() and not (nonzero_cols & ~dead).any()


def test_schedules():
    cfg = SAEConfig(l1_coeff=2.0)
    assert l1_coeff_at(0, cfg, 10) == 0.0 and l1_coeff_at(5, cfg, 10) == 1.0
    assert l1_coeff_at(10, cfg, 10) == 2.0 and l1_coeff_at(99, cfg, 10) == 2.0
    assert l1_coeff_at(0, cfg, 0) == 2.0
    assert l1_coeff_at(5, 4.0, 10) == 2.0
    assert lr_factor(0, 100, 0, 1.0) == 1.0 and lr_factor(99, 100, 0, 1.0) == 1.0
    assert lr_factor(0, 100, 4, 1.0) == 0.25 and lr_factor(3, 100, 4, 1.0) == 1.0
    assert lr_factor(79, 100, 0, 0.8) == 1.0 and lr_factor(80, 100, 0, 0.8) == 1.0
    assert lr_factor(90, 100, 0, 0.8) == 0.5 and lr_factor(99, 100, 0, 0.8) == pytest.approx(0.05)


def test_cfg_json_and_convention():
    cfg = SAEConfig(recipe="topk", d_in=8, n_features=16, k=2)
    d = json.loads(json.dumps(cfg_json(cfg)))
    assert (d["d_in"], d["n_features"], d["recipe"], d["k"]) == (8, 16, "topk", 2)
    assert "mean over batch and d_in" in d["loss_convention"]["mse"]
    assert "W_dec" in loss_convention("anthropic-2024-04")["l1"]
    with pytest.raises(MonosemError, match="recipe"):
        SAE(SAEConfig(recipe="nope"))


def planted_data(n, seed, d=16, n_atoms=32, active=3):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=torch.Generator().manual_seed(99))
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_atoms, generator=g).argsort(1)[:, :active]
    coef = torch.zeros(n, n_atoms).scatter(1, idx, 0.5 + torch.rand(n, active, generator=g))
    return coef @ atoms + 0.2  # an offset for b_dec to find


@pytest.mark.parametrize("recipe", RECIPES)
def test_loss_falls_on_planted_dictionary(recipe):
    torch.manual_seed(0)
    cfg = SAEConfig(recipe=recipe, d_in=16, n_features=64, l1_coeff=1e-3, k=4, aux_k=16)
    sae = SAE(cfg, generator=torch.Generator().manual_seed(0))
    sample = planted_data(1024, 0)
    if recipe == "anthropic-2024-04":
        sae.set_input_scale(input_scale(sample))
    sae.init_b_dec(sample)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    losses = []
    for step in range(100):
        out = sae(planted_data(256, step + 1), dead_mask=torch.zeros(64, dtype=torch.bool))
        opt.zero_grad()
        out.loss.backward()
        sae.project_decoder_grad()
        opt.step()
        sae.normalize_decoder()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-10:]) < 0.5 * losses[0], (losses[0], losses[-10:])


@pytest.mark.parametrize("recipe", RECIPES)
def test_init_from_data_reconstruct_and_cfg_json_method(recipe):
    cfg = SAEConfig(recipe=recipe, d_in=D_IN, n_features=N_FEAT, k=K)
    sae = SAE(cfg, generator=torch.Generator().manual_seed(0)).double()
    x = 3.0 * batch(8, n=64) + 1.0
    sae.init_from_data(x)
    if recipe == "anthropic-2024-04":
        assert math.isclose(sae.input_scale_value(), input_scale(x)) and not sae.b_dec.any()
    else:
        assert sae.input_scale_value() == 1.0
        np.testing.assert_allclose(sae.b_dec.detach().numpy(), ref_weiszfeld(x.numpy()), atol=1e-6)
    h = x.reshape(4, 16, D_IN)  # [b, t, d_mlp] as spliced into the LM
    np.testing.assert_allclose(sae.reconstruct(h).reshape(64, D_IN).detach().numpy(),
                               sae(x).x_hat.detach().numpy(), rtol=1e-12, atol=1e-12)
    d = json.loads(json.dumps(sae.cfg_json()))
    assert d["input_scale"] == sae.input_scale_value() and d["recipe"] == recipe
