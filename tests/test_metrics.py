"""Tests for monosem.metrics: real TensorBoard event files read back, metrics vs float64 references.

    OMP_NUM_THREADS=1 python -m pytest -q -x tests/test_metrics.py
"""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from monosem.errors import MonosemError
from monosem.metrics import (DEAD_LOG10, FIG_DPI, FIG_SIZE, TAGS, MetricsWriter, dead_and_ultralow,
                             feature_density, fvu, fvu_from_sse, l0, loss_recovered, read_histograms,
                             read_images, read_scalars, read_texts)

PNG_W, PNG_H = int(FIG_SIZE[0] * FIG_DPI), int(FIG_SIZE[1] * FIG_DPI)


# ---- writer: real event files, read back with EventAccumulator ---------------------------------
def test_scalars_every_tag_read_back(tmp_path):
    logdir = tmp_path / "tb"
    with MetricsWriter(logdir, config_text="[sae]\nl1_coeff = 0.001\n") as tb:
        for step in (0, 10, 20):
            tb.scalars(step, {tag: i + step / 100 for i, tag in enumerate(TAGS)})
        tb.scalars(30, {"train/loss": torch.tensor(0.25)})            # a 0-dim tensor is accepted
    got = read_scalars(logdir)
    assert set(got) == set(TAGS)
    for i, tag in enumerate(TAGS):
        want = [(s, i + s / 100) for s in (0, 10, 20)] + ([(30, 0.25)] if tag == "train/loss" else [])
        assert [s for s, _ in got[tag]] == [s for s, _ in want]
        np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in want], rtol=1e-6)
    (text,) = read_texts(logdir)["config/text_summary"]
    assert "l1_coeff = 0.001" in text[1] and "[sae]" in text[1]


def test_density_histogram_and_image(tmp_path):
    logdir, png_path = tmp_path / "tb", tmp_path / "report" / "density.png"
    n_features, n_vectors = 300, 50_000
    gen = torch.Generator().manual_seed(0)
    fire_counts = torch.randint(1, n_vectors + 1, (n_features,), generator=gen)
    fire_counts[:37] = 0                                               # 37 dead features
    fire_counts[37:40] = torch.tensor([1, 2, n_vectors])               # min resolvable density and 1.0
    with MetricsWriter(logdir) as tb:
        tb.density(5, fire_counts, n_vectors, png_path=png_path)
        tb.density(6, fire_counts, n_vectors)
    hists = read_histograms(logdir)["features/log10_density"]
    assert [s for s, _ in hists] == [5, 6]                             # size_guidance 0 keeps both
    h = hists[0][1]
    assert sum(h["bucket"]) == n_features and h["num"] == n_features
    assert h["min"] == DEAD_LOG10 and h["max"] == pytest.approx(0.0)
    # float64 reference: dead bucket holds exactly the dead features, alive sum matches
    dens = fire_counts.numpy().astype(np.float64) / n_vectors
    logd = np.where(dens > 0, np.log10(np.where(dens > 0, dens, 1.0)), DEAD_LOG10)
    assert h["sum"] == pytest.approx(logd.sum(), rel=1e-9)
    dead_bucket = [c for lim, c in zip(h["bucket_limit"], h["bucket"]) if DEAD_LOG10 < lim < DEAD_LOG10 + 0.1]
    assert dead_bucket == [37]

    images = read_images(logdir)["features/density_png"]
    assert [s for s, *_ in images] == [5, 6]
    _, png, width, height = images[0]
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (PNG_W, PNG_H) == (width, height)
    arr = np.asarray(img.convert("RGB"))
    assert arr.std() > 0                                               # something was drawn
    saved = Image.open(png_path)
    assert saved.format == "PNG" and saved.size == (PNG_W, PNG_H)
    np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), arr)   # same picture as in TB


def test_density_without_image(tmp_path):
    with MetricsWriter(tmp_path) as tb:
        tb.density(3, torch.tensor([0, 4, 9]), 10, image=False)
    assert "features/log10_density" in read_histograms(tmp_path)
    assert read_images(tmp_path) == {}


def test_density_floor_moves_below_resolution(tmp_path):
    n_vectors = 10**11                                                 # 1/n = 1e-11 < DEAD_LOG10
    fire_counts = torch.tensor([0, 1, 10**6], dtype=torch.int64)
    with MetricsWriter(tmp_path) as tb:
        tb.density(0, fire_counts, n_vectors)
    (_, h), = read_histograms(tmp_path)["features/log10_density"]
    assert h["min"] == -12.0 and sum(h["bucket"]) == 3
    assert h["sum"] == pytest.approx(-12.0 - 11.0 - 5.0)


def test_disabled_writer_writes_nothing(tmp_path):
    logdir = tmp_path / "tb"
    with MetricsWriter(logdir, enabled=False, config_text="x = 1") as tb:
        tb.scalars(1, {"train/loss": 1.0})
        tb.density(1, torch.tensor([0, 3]), 10, png_path=tmp_path / "d.png")
        tb.flush()
    assert not logdir.exists() and not (tmp_path / "d.png").exists()
    assert list(tmp_path.iterdir()) == []


def test_purge_step_on_resume_drops_later_events(tmp_path):
    with MetricsWriter(tmp_path) as tb:
        for step in range(10):
            tb.scalars(step, {"train/loss": float(step)})
    with MetricsWriter(tmp_path, purge_step=5) as tb:                   # resumed from step 5
        for step in range(5, 8):
            tb.scalars(step, {"train/loss": 100.0 + step})
    got = read_scalars(tmp_path)["train/loss"]
    assert got == [(s, float(s)) for s in range(5)] + [(s, 100.0 + s) for s in range(5, 8)]


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(MonosemError, match="does not exist"):
        read_scalars(tmp_path / "nope")
    with MetricsWriter(tmp_path) as tb, pytest.raises(MonosemError, match="tag"):
        tb.scalars(0, {"": 1.0})
    with pytest.raises(MonosemError, match="differ in shape"):
        fvu(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(MonosemError, match="1-D"):
        feature_density(torch.zeros(2, 3), 10)
    with pytest.raises(MonosemError, match="n_vectors"):
        feature_density(torch.zeros(3), 0)
    with pytest.raises(MonosemError, match=r"\[0, n_vectors=10\]"):
        feature_density(torch.tensor([11]), 10)
    with pytest.raises(MonosemError, match="window_fire"):
        dead_and_ultralow(torch.zeros(3), 10, torch.zeros(4, dtype=torch.bool))


# ---- pure metrics vs float64 references --------------------------------------------------------
def test_l0_fvu_density_vs_float64():
    gen = torch.Generator().manual_seed(1)
    f = torch.relu(torch.randn(64, 50, generator=gen) - 1.0)           # [N, n_features], ~16 % active
    assert l0(f) == pytest.approx(np.count_nonzero(f.numpy()) / 64, rel=1e-12)
    assert l0(f.reshape(4, 16, 50)) == pytest.approx(l0(f), rel=1e-12)

    x = torch.randn(200, 16, generator=gen) * 3 + 1
    x_hat = x + 0.3 * torch.randn(200, 16, generator=gen)
    x64, xh64 = x.numpy().astype(np.float64), x_hat.numpy().astype(np.float64)
    ref = ((x64 - xh64) ** 2).sum() / ((x64 - x64.mean(axis=0)) ** 2).sum()
    assert fvu(x, x_hat) == pytest.approx(ref, rel=1e-9)
    assert fvu(x, x) == 0.0
    assert fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0, rel=1e-9)
    assert math.isnan(fvu(torch.ones(5, 3), torch.zeros(5, 3)))
    # the trainer's cheap form, from the error sum its step already has: a large common offset must not
    # cost it digits (float32, centred before squaring)
    for offset in (0.0, 1e3):
        xo, xho = x + offset, x_hat + offset
        sse = float(((x64 - xh64) ** 2).sum())
        assert fvu_from_sse(sse, xo) == pytest.approx(ref, rel=1e-5)
    assert fvu_from_sse(sse, x.reshape(10, 20, 16)) == pytest.approx(ref, rel=1e-5)
    assert math.isnan(fvu_from_sse(1.0, torch.ones(5, 3)))

    counts = torch.tensor([0, 1, 2**25 + 1, 3 * 10**9], dtype=torch.int64)
    dens = feature_density(counts, 3 * 10**9)
    assert dens.dtype == torch.float64
    np.testing.assert_array_equal(dens.numpy(), np.array([0, 1, 2**25 + 1, 3e9]) / 3e9)


def test_dead_and_ultralow():
    counts = torch.tensor([0, 0, 5, 50, 10**4, 10**6], dtype=torch.int64)
    window_mask = torch.tensor([False, False, True, False, True, True])
    window_counts = torch.tensor([0, 0, 2, 0, 7, 99])
    n = 10**8                                                          # >= 10 / 1e-6: ultralow is judged
    for window in (window_mask, window_counts):
        d = dead_and_ultralow(counts, n, window)
        assert d["dead_count"] == 3 and d["dead_frac"] == 0.5 and d["n_features"] == 6
        # alive features with density < 1e-6: counts 5 (5e-8); counts 50 (5e-7) is dead in the window
        assert d["ultralow_count"] == 1 and d["ultralow_frac"] == pytest.approx(1 / 6)
    d = dead_and_ultralow(counts, n, window_mask, threshold=1e-3)    # 1e4 / 1e8 = 1e-4 now counts too
    assert d["ultralow_count"] == 2
    d = dead_and_ultralow(counts, 10**6, window_mask)                   # too few vectors to tell
    assert d["dead_count"] == 3
    assert math.isnan(d["ultralow_frac"]) and math.isnan(d["ultralow_count"])


# ---- loss recovered ----------------------------------------------------------------------------
class TinyLM(nn.Module):
    """Stand-in with the LM's forward signature: embed -> ReLU MLP (hook) -> residual -> tied head."""

    def __init__(self, vocab: int = 11, d_model: int = 8, d_mlp: int = 16):
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.E = nn.Parameter(torch.randn(vocab, d_model, generator=gen))
        self.W_in = nn.Parameter(torch.randn(d_model, d_mlp, generator=gen) / d_model**0.5)
        self.W_out = nn.Parameter(torch.randn(d_mlp, d_model, generator=gen) / d_mlp**0.5)

    def forward(self, tokens, targets=None, mlp_fn=None):
        x = self.E[tokens]                                             # [B, T, d_model]
        h = torch.relu(x @ self.W_in)                                  # [B, T, d_mlp]
        if mlp_fn is not None:
            h = mlp_fn(h)
        logits = (x + h @ self.W_out) @ self.E.T                       # [B, T, vocab]
        loss = None if targets is None else nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten())
        return logits, loss


def _ce_float64(lm: TinyLM, tokens: torch.Tensor, mlp_fn) -> float:
    """Independent numpy float64 cross entropy of the stand-in."""
    E, W_in, W_out = (p.detach().numpy().astype(np.float64) for p in (lm.E, lm.W_in, lm.W_out))
    inp, tgt = tokens[:, :-1].numpy(), tokens[:, 1:].numpy()
    x = E[inp]
    logits = (x + mlp_fn(np.maximum(x @ W_in, 0.0)) @ W_out) @ E.T
    m = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    return float((logz - np.take_along_axis(logits, tgt[..., None], -1)[..., 0]).mean())


def test_loss_recovered_identity_zero_and_half():
    lm = TinyLM()
    tokens = torch.randint(0, 11, (5, 9), generator=torch.Generator().manual_seed(3))
    seen = []
    ident = loss_recovered(lm, tokens, lambda h: seen.append(h.shape) or h, batch_size=2)
    assert seen == [(2 * 8, 16), (2 * 8, 16), (1 * 8, 16)]             # flattened [N, d_mlp], 3 chunks
    assert ident["loss_recovered"] == 1.0 and ident["ce_spliced"] == ident["ce_clean"]
    zero = loss_recovered(lm, tokens, torch.zeros_like)
    assert zero["loss_recovered"] == 0.0

    half = loss_recovered(lm, tokens, lambda h: 0.5 * h, batch_size=2)
    ref = {"ce_clean": _ce_float64(lm, tokens, lambda h: h),
           "ce_zero": _ce_float64(lm, tokens, lambda h: 0 * h),
           "ce_spliced": _ce_float64(lm, tokens, lambda h: 0.5 * h)}
    ref["loss_recovered"] = (ref["ce_zero"] - ref["ce_spliced"]) / (ref["ce_zero"] - ref["ce_clean"])
    assert 0.05 < ref["loss_recovered"] < 0.95                         # a genuinely intermediate case
    for key, want in ref.items():
        assert half[key] == pytest.approx(want, rel=1e-5), key


def test_loss_recovered_with_a_baseline_runs_the_spliced_pass_only():
    """ce_clean and ce_zero do not depend on the SAE: given them, one LM pass per chunk, same figures."""
    lm, calls = TinyLM(), []
    forward = lm.forward
    lm.forward = lambda *a, **k: calls.append(k.get("mlp_fn")) or forward(*a, **k)
    tokens = torch.randint(0, 11, (5, 9), generator=torch.Generator().manual_seed(3))
    full = loss_recovered(lm, tokens, lambda h: 0.5 * h, batch_size=2)
    assert len(calls) == 9                                             # 3 chunks x clean, zero, spliced
    calls.clear()
    base = {"ce_clean": full["ce_clean"], "ce_zero": full["ce_zero"]}
    again = loss_recovered(lm, tokens, lambda h: 0.5 * h, batch_size=2, baseline=base)
    assert len(calls) == 3 and None not in calls and torch.zeros_like not in calls
    assert again == full


def test_loss_recovered_rejects_bad_shapes():
    lm = TinyLM()
    with pytest.raises(MonosemError, match="tokens"):
        loss_recovered(lm, torch.zeros(4, dtype=torch.int64), lambda h: h)
    with pytest.raises(MonosemError, match="reconstruct returned"):
        loss_recovered(lm, torch.zeros(2, 5, dtype=torch.int64), lambda h: h[:, :3])


def test_loss_recovered_real_lm():
    lm_mod = pytest.importorskip("monosem.lm")
    from monosem.config import LMConfig

    torch.manual_seed(0)
    lm = lm_mod.LM(LMConfig(d_model=32, n_head=2, d_mlp=64), ctx_len=16).eval()
    tokens = torch.randint(0, 50257, (3, 16), generator=torch.Generator().manual_seed(4))
    ident = loss_recovered(lm, tokens, lambda h: h)
    zero = loss_recovered(lm, tokens, torch.zeros_like)
    assert ident["loss_recovered"] == 1.0 and zero["loss_recovered"] == 0.0
    assert ident["ce_zero"] != ident["ce_clean"]                       # the hook really is spliced
    with torch.no_grad():
        assert ident["ce_clean"] == pytest.approx(lm(tokens[:, :-1], tokens[:, 1:])[1].item(), rel=1e-6)
    half = loss_recovered(lm, tokens, lambda h: 0.5 * h)
    lm64 = lm.double()                                                 # float64 reference of the same LM
    with torch.no_grad():
        ce = {name: lm64(tokens[:, :-1], tokens[:, 1:], mlp_fn=fn)[1].item() for name, fn in
              (("ce_clean", None), ("ce_zero", torch.zeros_like), ("ce_spliced", lambda h: 0.5 * h))}
    want = (ce["ce_zero"] - ce["ce_spliced"]) / (ce["ce_zero"] - ce["ce_clean"])
    for key in ce:
        assert half[key] == pytest.approx(ce[key], rel=1e-5), key
    assert half["loss_recovered"] == pytest.approx(want, rel=1e-3, abs=1e-4)
