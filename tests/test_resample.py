"""Tests for monosem.resample: reservoir, per-input losses, the draw, the resampling update, dead masks.

    OMP_NUM_THREADS=1 python -m pytest -q -x tests/test_resample.py
"""
import math

import numpy as np
import pytest
import torch

from monosem.config import SAEConfig
from monosem.errors import MonosemError
from monosem.resample import (Reservoir, choose_inputs, dead_mask, reset_adam_rows_, resample_,
                              resample_losses)
from monosem.sae import SAE, fired

D_IN, N_FEAT = 12, 40


def items(start, n, d=3):
    """Vectors whose first coordinate is their id, so we can tell which ones were kept."""
    x = torch.zeros(n, d)
    x[:, 0] = torch.arange(start, start + n, dtype=torch.float32)
    return x


def feed(res, sizes, d=3):
    start = 0
    for n in sizes:
        res.add(items(start, n, d))
        start += n


# ---- reservoir -----------------------------------------------------------------------------
def test_reservoir_keeps_everything_until_full_then_capacity():
    res = Reservoir(10, 3, seed=0)
    assert res.tensor().shape == (0, 3)
    feed(res, [3, 4])
    assert torch.equal(res.tensor()[:, 0], torch.arange(7.0))
    feed(res, [3, 4, 50])
    assert res.tensor().shape == (10, 3) and res.n_seen == 64
    with pytest.raises(MonosemError, match=r"\[B, 3\]"):
        res.add(torch.zeros(2, 4))


@pytest.mark.parametrize("capacity,sizes", [(6, [5, 1, 9, 9]), (2, [1, 1, 3])])
def test_reservoir_inclusion_is_uniform(capacity, sizes):
    n_items, n_seeds = sum(sizes), 2000
    counts = np.zeros(n_items)
    for seed in range(n_seeds):
        res = Reservoir(capacity, 3, seed=seed)
        feed(res, sizes)  # batches larger than C: slots hit twice in one batch
        ids = res.tensor()[:, 0].long().numpy()
        assert len(set(ids.tolist())) == capacity  # distinct items
        counts[ids] += 1
    freq = counts / n_seeds
    sigma = np.sqrt(capacity / n_items * (1 - capacity / n_items) / n_seeds)
    assert np.abs(freq - capacity / n_items).max() < 5 * sigma, freq


def test_reservoir_deterministic_and_resumable():
    a, b, c = Reservoir(8, 3, seed=1), Reservoir(8, 3, seed=1), Reservoir(8, 3, seed=2)
    for r in (a, b, c):
        feed(r, [4, 7, 11, 13])
    assert torch.equal(a.tensor(), b.tensor()) and not torch.equal(a.tensor(), c.tensor())
    # interrupt after two batches, restore into a fresh reservoir with another seed, continue
    full = Reservoir(8, 3, seed=3)
    half = Reservoir(8, 3, seed=3)
    batches = [items(i * 10, 10) for i in range(6)]
    for x in batches:
        full.add(x)
    for x in batches[:2]:
        half.add(x)
    state = half.state_dict()
    resumed = Reservoir(8, 3, seed=99)
    resumed.load_state_dict(state)
    for x in batches[2:]:
        resumed.add(x)
    assert torch.equal(full.tensor(), resumed.tensor()) and resumed.n_seen == full.n_seen
    with pytest.raises(MonosemError, match="capacity"):
        Reservoir(9, 3).load_state_dict(state)


def test_reservoir_reset_starts_over():
    res = Reservoir(5, 3, seed=0)
    feed(res, [20])
    res.reset()
    assert res.n_seen == 0 and res.tensor().shape == (0, 3)
    res.add(items(100, 2))
    assert torch.equal(res.tensor()[:, 0], torch.tensor([100.0, 101.0]))


# ---- per-input losses and the draw ------------------------------------------------------------
def make_sae(recipe="anthropic-2023", l1=3e-2, seed=0):
    cfg = SAEConfig(recipe=recipe, d_in=D_IN, n_features=N_FEAT, l1_coeff=l1, k=5)
    sae = SAE(cfg, generator=torch.Generator().manual_seed(seed)).double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_enc.copy_(0.1 * torch.randn(N_FEAT, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(D_IN, generator=g))
        if recipe == "anthropic-2024-04":
            sae.set_input_scale(1.5)
    return sae


def ref_per_input(sae, x, recipe, lam):
    W_enc, b_enc, W_dec, b_dec = (p.detach().numpy() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    s = float(sae.scale)
    xs = x * s
    pre = (xs if recipe == "anthropic-2024-04" else xs - b_dec) @ W_enc.T + b_enc
    f = np.maximum(pre, 0)
    if recipe == "topk":
        thresh = -np.sort(-pre, axis=1)[:, 4:5]  # 5th largest
        f = np.where(pre >= thresh, f, 0)
    mse = ((f @ W_dec.T + b_dec - xs) ** 2).mean(1)
    w = np.sqrt((W_dec ** 2).sum(0)) if recipe == "anthropic-2024-04" else 1.0
    return mse, (f * w).sum(1)


@pytest.mark.parametrize("recipe", ["anthropic-2023", "anthropic-2024-04", "topk"])
def test_resample_losses_match_reference(recipe):
    sae = make_sae(recipe)
    x = torch.randn(50, D_IN, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    mse, l1 = ref_per_input(sae, x.numpy(), recipe, 3e-2)
    lam = 0.0 if recipe == "topk" else 3e-2
    got = resample_losses(sae, x, batch_size=16)  # chunked
    np.testing.assert_allclose(got.numpy(), mse + lam * l1, rtol=1e-10)
    np.testing.assert_allclose(resample_losses(sae, x, terms="mse").numpy(), mse, rtol=1e-10)
    lam1 = 0.0 if recipe == "topk" else 1.0
    np.testing.assert_allclose(resample_losses(sae, x, l1_coeff=1.0).numpy(), mse + lam1 * l1, rtol=1e-10)
    # the mean of the per-input losses is the batch loss of forward
    assert np.isclose(got.mean().item(), sae(x).loss.item(), rtol=1e-10)
    with pytest.raises(MonosemError, match="resample_loss"):
        resample_losses(sae, x, terms="l2")


@pytest.mark.parametrize("power", [2.0, 0.5])
def test_choose_inputs_matches_reference_draw(power):
    losses = torch.rand(300, generator=torch.Generator().manual_seed(0)) * 3
    got = choose_inputs(losses, 25, power, torch.Generator().manual_seed(11))
    ref_w = torch.from_numpy(np.asarray(losses.numpy(), dtype=np.float64) ** power)
    want = torch.multinomial(ref_w, 25, replacement=True, generator=torch.Generator().manual_seed(11))
    assert got.dtype == torch.long and torch.equal(got, want)
    assert torch.equal(got, choose_inputs(losses, 25, power, torch.Generator().manual_seed(11)))


@pytest.mark.parametrize("power", [2.0, 0.5])
def test_choose_inputs_frequencies(power):
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0])
    n = 40000
    idx = choose_inputs(losses, n, power, torch.Generator().manual_seed(1))
    freq = np.bincount(idx.numpy(), minlength=5) / n
    want = losses.double().numpy() ** power
    np.testing.assert_allclose(freq, want / want.sum(), atol=0.012)
    assert freq[4] == 0


def test_choose_inputs_edge_cases():
    idx = choose_inputs(torch.zeros(4), 8000, 2.0, torch.Generator().manual_seed(0))  # all zero: uniform
    np.testing.assert_allclose(np.bincount(idx.numpy(), minlength=4) / 8000, 0.25, atol=0.025)
    assert choose_inputs(torch.ones(3), 0, 2.0).shape == (0,)
    big = torch.tensor([1e200, 2e200], dtype=torch.float64)  # squaring would overflow
    assert set(choose_inputs(big, 50, 2.0, torch.Generator().manual_seed(0)).tolist()) <= {0, 1}
    with pytest.raises(MonosemError, match="not finite"):
        choose_inputs(torch.tensor([1.0, float("nan")]), 2, 2.0)
    with pytest.raises(MonosemError, match="no candidate"):
        choose_inputs(torch.zeros(0), 2, 2.0)


# ---- the resampling update --------------------------------------------------------------------
def trained_sae_and_adam(amsgrad=True):
    sae = make_sae()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2, amsgrad=amsgrad)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        opt.zero_grad()
        sae(torch.randn(64, D_IN, generator=g, dtype=torch.float64)).loss.backward()
        sae.project_decoder_grad()
        opt.step()
        sae.normalize_decoder()
    return sae, opt


def test_resample_sets_weights_and_zeroes_adam_rows():
    sae, opt = trained_sae_and_adam()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    state_before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in sae.named_parameters()}
    dead = torch.tensor([3, 17, 31])
    x = torch.randn(3, D_IN, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    resample_(sae, opt.state, dead, x, centre=False)  # the paper's raw-input directions

    # float64 reference of the formulas
    W_enc = before["W_enc"].numpy()
    alive = np.setdiff1d(np.arange(N_FEAT), dead.numpy())
    ref_norm = np.linalg.norm(W_enc[alive], axis=1).mean()
    u = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(sae.W_dec[:, dead].detach().numpy(), u.T, rtol=1e-12)
    np.testing.assert_allclose(sae.W_enc[dead].detach().numpy(), 0.2 * ref_norm * u, rtol=1e-12)
    assert torch.count_nonzero(sae.b_enc[dead]) == 0
    none = torch.tensor([], dtype=torch.long)
    touched = {"W_enc": (0, dead), "b_enc": (0, dead), "W_dec": (1, dead), "b_dec": (0, none)}
    for name, p in sae.named_parameters():
        dim, idx = touched[name]
        keep = torch.ones(p.shape[dim], dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(p.detach().index_select(dim, keep.nonzero()[:, 0]),
                           before[name].index_select(dim, keep.nonzero()[:, 0])), name
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            now, old = opt.state[p][key], state_before[name][key]
            assert torch.count_nonzero(now.index_select(dim, idx)) == 0, (name, key)
            assert torch.equal(now.index_select(dim, keep.nonzero()[:, 0]),
                               old.index_select(dim, keep.nonzero()[:, 0])), (name, key)
            assert torch.count_nonzero(old.index_select(dim, idx)) > 0 or name == "b_dec"
        assert torch.equal(opt.state[p]["step"], state_before[name]["step"])
    # the optimizer still steps, and the decoder stays unit-norm
    opt.zero_grad()
    sae(x).loss.backward()
    sae.project_decoder_grad()
    opt.step()
    sae.normalize_decoder()
    assert torch.isfinite(sae.W_enc).all()
    np.testing.assert_allclose(sae.W_dec.norm(dim=0).detach().numpy(), 1.0, rtol=1e-12)


@pytest.mark.parametrize("density", [0.01, 0.1, 0.3])
def test_density_bias_makes_new_features_fire_at_the_target_density(density):
    """resample_ with bias_sample: b_enc of each resampled feature = −(k-th largest centred
    pre-activation on the sample), k = ⌈density·S⌉ (float64 reference, by sorting), so it fires on exactly
    k sample rows, where the paper's b_enc = 0 fires on a large share (non-negative, MLP-like inputs)."""
    sae, opt = trained_sae_and_adam()
    g = torch.Generator().manual_seed(5)
    sample = torch.rand(3000, D_IN, generator=g, dtype=torch.float64) ** 3    # [S, d_in] >= 0, skewed
    dead = torch.tensor([2, 9, 30, 33])
    chosen = sample[:4] * 2
    b_dec = sae.b_dec.detach().clone()
    resample_(sae, opt.state, dead, chosen, bias_sample=sample, density=density)
    k = math.ceil(density * len(sample))
    pre = (sample - b_dec).numpy() @ sae.W_enc[dead].detach().numpy().T         # [S, 4]
    b_ref = -np.sort(pre, axis=0)[::-1][k - 1]
    np.testing.assert_allclose(sae.b_enc[dead].detach().numpy(), b_ref, rtol=1e-12)
    fires = (pre + sae.b_enc[dead].detach().numpy() > 0).sum(0)
    assert ((fires == k - 1) | (fires == k)).all()  # the k-th largest sits at 0, up to rounding
    paper, popt = trained_sae_and_adam()
    resample_(paper, popt.state, dead, chosen)
    paper_fires = ((sample - b_dec) @ paper.W_enc[dead].detach().T > 0).double().mean(0)
    assert (paper_fires > 0.25).all() and torch.count_nonzero(paper.b_enc[dead]) == 0
    with pytest.raises(MonosemError, match="b_dec"):
        from monosem.resample import resample_params_
        resample_params_({k: getattr(sae, k).detach() for k in ("W_enc", "b_enc", "W_dec")}, {},
                         dead, chosen, bias_sample=sample, density=density)


def test_reset_adam_rows_on_plain_state_and_missing_keys():
    state = {"exp_avg": torch.ones(4, 3), "exp_avg_sq": torch.ones(4, 3), "step": torch.tensor(5.0)}
    reset_adam_rows_(state, torch.tensor([2]), dim=1)
    assert torch.equal(state["exp_avg"][:, 2], torch.zeros(4)) and state["exp_avg"][:, :2].eq(1).all()
    assert state["exp_avg_sq"][:, 2].eq(0).all() and state["step"] == 5


def test_resample_rejects_bad_input():
    sae, opt = trained_sae_and_adam(amsgrad=False)
    x = torch.randn(2, D_IN, dtype=torch.float64)
    with pytest.raises(MonosemError, match="distinct"):
        resample_(sae, opt.state, torch.tensor([1, 1]), x)
    with pytest.raises(MonosemError, match="must be"):
        resample_(sae, opt.state, torch.tensor([1, 2, 3]), x)
    with pytest.raises(MonosemError, match="zero input"):
        resample_(sae, opt.state, torch.tensor([1, 2]), torch.cat([x[:1], 0 * x[:1]]), centre=False)
    with pytest.raises(MonosemError, match=r"zero centred \(x = b_dec\) input"):
        resample_(sae, opt.state, torch.tensor([1, 2]), torch.cat([x[:1], sae.b_dec.detach()[None]]),
                  centre=True)
    resample_(sae, {}, torch.tensor([4]), x[:1])  # before the first step there is no Adam state
    assert torch.isclose(sae.W_dec[:, 4].norm(), torch.tensor(1.0, dtype=torch.float64))


def test_dead_mask():
    last = torch.tensor([-1, 0, 5, 9])
    assert dead_mask(last, 9, 10).tolist() == [True, False, False, False]
    assert dead_mask(last, 9, 5).tolist() == [True, True, False, False]


def test_planted_dead_features_are_found_and_revived():
    """The whole resampling path: track firing, find the dead, draw from a reservoir, resample."""
    sae = make_sae()
    planted = torch.tensor([2, 9, 30])
    with torch.no_grad():
        sae.b_enc[planted] = -1e3  # never fire
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    res = Reservoir(256, D_IN, seed=0, dtype=torch.float64)
    last_fired = torch.full((N_FEAT,), -1, dtype=torch.long)
    g = torch.Generator().manual_seed(5)
    for step in range(6):
        x = torch.randn(64, D_IN, generator=g, dtype=torch.float64)
        res.add(x)
        out = sae(x)
        last_fired[fired(out.f)] = step
        opt.zero_grad()
        out.loss.backward()
        sae.project_decoder_grad()
        opt.step()
        sae.normalize_decoder()
    dead = dead_mask(last_fired, 5, 6)
    assert torch.equal(dead.nonzero()[:, 0], planted)
    pool = res.tensor()
    idx = choose_inputs(resample_losses(sae, pool), int(dead.sum()), 2.0, torch.Generator().manual_seed(0))
    resample_(sae, opt.state, dead.nonzero()[:, 0], pool[idx])
    assert fired(sae(pool[idx]).f)[planted].all()  # each revived feature fires on its own input


# ---- the fix: centred directions, and a per-row Adam warm-up ----------------------------------
def test_centred_directions_point_at_what_the_encoder_reads():
    sae, opt = trained_sae_and_adam()
    dead = torch.tensor([2, 11])
    x = torch.rand(2, D_IN, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 1.0
    b_dec = sae.b_dec.detach().clone()
    resample_(sae, opt.state, dead, x, centre=True)
    u = (x - b_dec).numpy()
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    np.testing.assert_allclose(sae.W_dec[:, dead].detach().numpy(), u.T, rtol=1e-12)
    enc = sae.W_enc[dead].detach().numpy()
    np.testing.assert_allclose(enc / np.linalg.norm(enc, axis=1, keepdims=True), u, rtol=1e-12)
    assert torch.equal(sae.b_dec.detach(), b_dec)  # read, never written
    # a revived feature's pre-activation on its own input is 0.2·ref·‖x − b_dec‖ > 0
    assert (sae.encode(x)[torch.arange(2), dead] > 0).all()


def first_update(adam: str, steps: int = 300, lr: float = 1e-3) -> float:
    """Largest |ΔW_enc| per element of a resampled row in the first step after a resampling at a large
    step count, in units of lr."""
    sae = make_sae()
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        opt.zero_grad()
        sae(torch.randn(64, D_IN, generator=g, dtype=torch.float64)).loss.backward()
        opt.step()
        sae.normalize_decoder()
    dead = torch.tensor([4])
    x = torch.randn(64, D_IN, generator=g, dtype=torch.float64)
    resample_(sae, opt.state, dead, x[:1] + 3.0, centre=True, adam=adam)
    if adam == "alive":
        state = opt.state[sae.W_enc]
        assert torch.count_nonzero(state["exp_avg"][4]) == 0
        mean = torch.cat([state["exp_avg_sq"][:4], state["exp_avg_sq"][5:]]).mean(0)
        assert torch.allclose(state["exp_avg_sq"][4], mean)
    before = sae.W_enc[4].detach().clone()
    opt.zero_grad()
    sae(x).loss.backward()
    opt.step()
    return float((sae.W_enc[4] - before).abs().max().detach() / lr)


def test_zeroed_adam_rows_take_a_3_lr_first_step_and_the_alive_mean_does_not():
    """DESIGN.md's fact: with the moments zeroed at step t, the first update of an element with a
    non-zero gradient is lr·(1−β1)/√(1−β2) · √(1−β2^t)/(1−β1^t) (≈ 3.16·lr for t >> 1000); with the alive rows' second moments it is
    about (1−β1)·lr·|g|/rms(g), well under lr."""
    zero, alive = first_update("zero"), first_update("alive")
    assert zero == pytest.approx(0.1 / math.sqrt(1 - 0.999 ** 1) * math.sqrt(1 - 0.999 ** 301)
                                 / (1 - 0.9 ** 301), rel=1e-3)
    assert alive < 0.5 < 1.5 < zero  # -> 3.16 as t grows; 1.61 at t = 301
