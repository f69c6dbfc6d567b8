"""Feature statistics, logit weights and ablations against brute-force and float64 references.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_analyze.py
"""
import pytest
import torch
import torch.nn.functional as F

from monosem.config import LMConfig, SAEConfig
from monosem.effects import ablation_delta, hook_acts, logit_weights
from monosem.featstats import EMPTY_TOKEN, Pass1, Pass2, SampleTable
from monosem.lm import LM
from monosem.sae import SAE

B, T, NF = 4, 9, 6


def batches(n: int, seed: int = 0):
    """Sparse non-negative activations f [B*T, NF] with ties and empty features, and tokens [B, T]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        f = torch.rand(B * T, NF, generator=g).round(decimals=2)
        f[torch.rand(B * T, NF, generator=g) < 0.6] = 0.0
        f[:, 0] = 0.0  # a dead feature
        tokens = torch.randint(0, 5, (B, T), generator=g)
        out.append((tokens, f))
    return out


def flat_all(data):
    """Every (feature, global index, value, tokens of the batch, f, row) in one list (brute force)."""
    rows = []
    for b, (tokens, f) in enumerate(data):
        for r in range(B * T):
            for j in range(NF):
                if f[r, j] > 0:
                    rows.append((j, (b * B + r // T) * T + r % T, float(f[r, j]), tokens, f, r))
    return rows


def window(tokens, f, r, j, before, after):
    t0 = r % T
    tok, act = [], []
    for t in range(t0 - before, t0 + after + 1):
        inside = 0 <= t < T
        tok.append(int(tokens[r // T, t]) if inside else EMPTY_TOKEN)
        act.append(float(f[(r // T) * T + t, j]) if inside else 0.0)
    return tok, act


def test_top_k_matches_brute_force_with_windows():
    data, k = batches(5), 3
    p1 = Pass1(NF, k, before=2, after=1, token_sample=4, seed=0)
    for b, (tokens, f) in enumerate(data):
        p1.update(tokens, f, seq0=b * B)
    every = flat_all(data)
    assert torch.equal(p1.fires, torch.tensor([sum(1 for e in every if e[0] == j) for j in range(NF)]))
    for j in range(NF):
        mine = sorted((e for e in every if e[0] == j), key=lambda e: -e[2])[:k]
        got = p1.top.values[j][p1.top.index[j] >= 0].tolist()
        assert got == pytest.approx([e[2] for e in mine]), j   # ties may pick other contexts
        for s in range(len(mine)):
            g = int(p1.top.index[j, s])
            e = next(e for e in every if e[0] == j and e[1] == g)   # the stored sample is real
            tok, act = window(e[3], e[4], e[5], j, 2, 1)
            assert p1.top.tokens[j, s].tolist() == tok
            assert p1.top.acts[j, s].float().tolist() == pytest.approx(act, abs=1e-3)
    assert (p1.top.index[0] == -1).all() and (p1.top.tokens[0] == EMPTY_TOKEN).all()


def test_interval_samples_lie_in_their_interval_and_are_distinct():
    data, n_iv, per = batches(6, seed=1), 4, 2
    p1 = Pass1(NF, 2, 1, 1, 4, seed=0)
    for b, (tokens, f) in enumerate(data):
        p1.update(tokens, f, b * B)
    p2 = Pass2(p1, n_iv, per, seed=0)
    for b, (tokens, f) in enumerate(data):
        p2.update(tokens, f, b * B)
    every = flat_all(data)
    for j in range(1, NF):
        vmax = float(p1.max[j])
        for iv in range(n_iv):
            g = j * n_iv + iv
            inside = [e for e in every if e[0] == j and min(n_iv - 1, int(e[2] / vmax * n_iv)) == iv]
            idx = p2.intervals.index[g][p2.intervals.index[g] >= 0]
            assert len(idx) == min(per, len(inside)) and len(set(idx.tolist())) == len(idx)
            assert set(idx.tolist()) <= {e[1] for e in inside}


def test_interval_sampling_is_uniform():
    """One feature, one interval, 12 fires, 3 kept: each fire is kept with probability 1/4."""
    counts = torch.zeros(12)
    tokens = torch.zeros(1, 12, dtype=torch.long)
    f = torch.ones(12, 1)
    for seed in range(400):
        table = SampleTable(1, 3, 0, 0)
        key = torch.rand(12, generator=torch.Generator().manual_seed(seed))
        for lo in (0, 5):  # two offers: merging keeps the best 3 keys overall
            sl = slice(lo, lo + (5 if lo == 0 else 7))
            rows = torch.arange(12)[sl]
            table.offer(torch.zeros(len(rows), dtype=torch.long), key[sl], f[sl, 0], rows,
                        torch.zeros(len(rows), dtype=torch.long), tokens, f, 0)
        assert torch.equal(table.index[0].sort().values, key.topk(3).indices.sort().values)
        counts[table.index[0]] += 1
    assert (counts / 400 - 0.25).abs().max() < 0.1


def test_top_token_and_share_are_exact():
    data = batches(4, seed=2)
    p1 = Pass1(NF, 3, 0, 0, 16, seed=0)
    for b, (tokens, f) in enumerate(data):
        p1.update(tokens, f, b * B)
    p2 = Pass2(p1, 3, 1, seed=0)
    for b, (tokens, f) in enumerate(data):
        p2.update(tokens, f, b * B)
    token, share = p2.top_token(p1.fires)
    for j in range(1, NF):
        counts = torch.zeros(5)
        for tokens, f in data:
            counts += torch.bincount(tokens.reshape(-1)[f[:, j] > 0], minlength=5)
        assert counts[token[j]] == counts.max()
        assert float(share[j]) == pytest.approx(float(counts.max() / counts.sum()))
    assert token[0] == EMPTY_TOKEN and share[0] == 0


def lm_and_sae(n_layer: int, seed: int = 0):
    torch.manual_seed(seed)
    lm = LM(LMConfig(n_layer=n_layer, d_model=16, n_head=2, d_mlp=24, vocab_size=50304,
                     hook_layer=0), ctx_len=10).eval()
    with torch.no_grad():
        lm.ln_f.weight.uniform_(0.5, 1.5)
        lm.ln_f.bias.normal_()
    sae = SAE(SAEConfig(d_in=24, n_features=20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    return lm, sae


@torch.no_grad()
def test_logit_weights_rank_tokens_as_the_real_layernorm_does():
    """Through the real ln_f in float64 at a zero residual (where LN is exactly centre, scale, gain,
    bias), the feature's direction promotes the same tokens the logit weights name."""
    lm, sae = lm_and_sae(1)
    top_ids, top_vals, bot_ids, bot_vals = logit_weights(lm, sae, n=5)
    lm64 = lm.double()
    u = lm64.blocks[0].mlp.W_out.weight @ sae.W_dec.double()                 # [d_model, F]
    for j in range(20):
        ref = F.linear(lm64.ln_f(u[:, j]), lm64.wte.weight)[:50257] - lm64.wte.weight[:50257] @ lm64.ln_f.bias
        assert torch.equal(top_ids[j], ref.topk(5).indices), j
        assert torch.equal(bot_ids[j], ref.topk(5, largest=False).indices), j
        scale = float(ref.topk(5).values[0] / top_vals[j, 0])                  # the 1/σ factor
        assert torch.allclose(top_vals[j].double() * scale, ref.topk(5).values, rtol=1e-4)
    assert (top_vals[:, 0] >= top_vals[:, -1]).all() and (bot_vals[:, 0] <= bot_vals[:, -1]).all()


def test_logit_weights_over_the_seen_tokens_only():
    """vocab= ranks only those ids (the tokens of the analysed text), with the same values."""
    lm, sae = lm_and_sae(1)
    vocab = torch.randperm(50257, generator=torch.Generator().manual_seed(0))[:300].sort().values
    top_ids, top_vals, bot_ids, bot_vals = logit_weights(lm, sae, n=5, vocab=vocab)
    lm64 = lm.double()
    u = lm64.blocks[0].mlp.W_out.weight @ sae.W_dec.double()
    for j in range(10):
        ref = F.linear(lm64.ln_f(u[:, j]), lm64.wte.weight)[vocab] - lm64.wte.weight[vocab] @ lm64.ln_f.bias
        assert torch.equal(top_ids[j], vocab[ref.topk(5).indices]), j
        assert torch.equal(bot_ids[j], vocab[ref.topk(5, largest=False).indices]), j
    assert set(top_ids.flatten().tolist()) <= set(vocab.tolist())


@pytest.mark.parametrize("n_layer", [1, 2])
def test_ablation_matches_a_full_float64_forward(n_layer):
    lm, sae = lm_and_sae(n_layer, seed=3)
    tokens = torch.randint(0, 50257, (3, 10), generator=torch.Generator().manual_seed(0))
    resid, h = hook_acts(lm, tokens)
    rows, pos = torch.tensor([0, 1, 2, 2]), torch.tensor([3, 0, 8, 5])
    f_all = sae.encode(h[rows, pos])
    feature = f_all.argmax(1)                                                  # a feature that fires
    assert (f_all[torch.arange(4), feature] > 0).all()
    delta = ablation_delta(lm, sae, resid, h, tokens, rows, pos, feature)
    lm64, sae64 = lm.double(), sae.double()
    for i in range(4):
        r, p, j = int(rows[i]), int(pos[i]), int(feature[i])
        losses = []
        for drop in (False, True):
            def splice(hh, p=p, j=j, drop=drop):
                hh = hh.clone()
                f = sae64.encode(hh[0, p])
                if drop:
                    f[j] = 0.0
                hh[0, p] = sae64.decode(f)
                return hh
            logits, _ = lm64(tokens[r:r + 1], mlp_fn=splice)
            losses.append(F.cross_entropy(logits[0, p], tokens[r, p + 1]).item())
        assert float(delta[i]) == pytest.approx(losses[1] - losses[0], abs=2e-4), (i, n_layer)
