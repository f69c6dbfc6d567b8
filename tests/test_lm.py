"""LM tests: MLP activations against a float64 hand computation, splicing, save/load, errors.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_lm.py
"""
import json
import math

import pytest
import torch

from monosem.config import Config, ConfigError, LMConfig
from monosem.errors import MonosemError
from monosem.lm import LM, load_lm, lm_identity, save_lm

CTX = 8


def tiny_cfg(**kw) -> LMConfig:
    base = dict(n_layer=1, d_model=16, n_head=2, d_mlp=32, vocab_size=50304)
    return LMConfig(**{**base, **kw})


def make_lm(seed=0, **kw) -> LM:
    torch.manual_seed(seed)
    model = LM(tiny_cfg(**kw), CTX).eval()
    with torch.no_grad():  # non-zero biases / LN affine so the reference exercises every term
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(B=3, T=CTX, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (B, T), generator=g)


def ref_layernorm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_mlp_acts(model: LM, toks: torch.Tensor, activation: str) -> torch.Tensor:
    """First block's MLP post-activation, by hand in float64 (explicit softmax, explicit causal mask)."""
    W = {k: v.double() for k, v in model.state_dict().items()}
    B, T = toks.shape
    C, H = model.cfg.d_model, model.cfg.n_head
    hd = C // H
    x = W["wte.weight"][toks] + W["wpe.weight"][:T]  # [B, T, C]
    a = ref_layernorm(x, W["blocks.0.ln_1.weight"], W["blocks.0.ln_1.bias"])
    qkv = a @ W["blocks.0.attn.c_attn.weight"].T + W["blocks.0.attn.c_attn.bias"]
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    heads = []
    for h in range(H):
        sl = slice(h * hd, (h + 1) * hd)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)  # [B, T, T]
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
        scores = scores.masked_fill(~mask, float("-inf"))
        p = torch.exp(scores - scores.max(-1, keepdim=True).values)
        p = p / p.sum(-1, keepdim=True)
        heads.append(p @ v[..., sl])
    attn = torch.cat(heads, -1) @ W["blocks.0.attn.c_proj.weight"].T + W["blocks.0.attn.c_proj.bias"]
    x = x + attn
    m = ref_layernorm(x, W["blocks.0.ln_2.weight"], W["blocks.0.ln_2.bias"])
    pre = m @ W["blocks.0.mlp.W_in.weight"].T + W["blocks.0.mlp.W_in.bias"]
    if activation == "relu":
        return pre.clamp_min(0)
    return 0.5 * pre * (1 + torch.erf(pre / math.sqrt(2)))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_mlp_acts_match_float64_reference(activation):
    model = make_lm(activation=activation)
    toks = tokens()
    ref = ref_mlp_acts(model, toks, activation)
    got = model.mlp_acts(toks)
    assert got.shape == (3, CTX, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    got64 = model.double().mlp_acts(toks)
    torch.testing.assert_close(got64, ref, rtol=1e-10, atol=1e-12)
    if activation == "relu":
        assert (got == 0).any() and (got > 0).any()
    else:
        assert (got < 0).any()  # GELU is negative for small negative inputs; ReLU never


def test_causal_prefix_invariance():
    model = make_lm()
    toks = tokens()
    full = model.mlp_acts(toks)
    torch.testing.assert_close(model.mlp_acts(toks[:, :5]), full[:, :5], rtol=1e-5, atol=1e-6)
    changed = toks.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 50257
    out = model.mlp_acts(changed)
    assert torch.equal(out[:, :6], full[:, :6]) and not torch.equal(out[:, 6:], full[:, 6:])


def test_splicing_identity_reproduces_logits_and_zero_differs():
    model = make_lm()
    toks = tokens()
    targets = tokens(seed=2)
    logits, loss = model(toks, targets)
    spliced, spliced_loss = model(toks, targets, mlp_fn=lambda h: h)
    assert torch.equal(logits, spliced) and torch.equal(loss, spliced_loss)
    seen = []
    zeroed, zero_loss = model(toks, targets, mlp_fn=lambda h: seen.append(h) or torch.zeros_like(h))
    assert torch.equal(seen[0], model.mlp_acts(toks))  # the hook sees exactly what mlp_acts returns
    assert not torch.allclose(zeroed, logits) and zero_loss != loss
    ref = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    assert logits.shape == (3, CTX, 50304)


def test_ignore_index_and_too_long_input():
    model = make_lm()
    toks, targets = tokens(), tokens(seed=2)
    masked = targets.clone()
    masked[:, -1] = -1
    logits, loss = model(toks, masked)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].double().flatten(0, 1), targets[:, :-1].flatten())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(MonosemError, match="ctx_len 8"):
        model.mlp_acts(tokens(T=CTX + 1))


def test_hook_layer_selects_block_and_never_runs_later_blocks():
    model = make_lm(n_layer=2, hook_layer=0)
    toks = tokens()
    calls = []
    model.blocks[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    acts0 = model.mlp_acts(toks)
    assert calls == []  # block 1 never ran
    # hook layer 0 of a 2-layer model == the 1-layer reference on the same first block
    torch.testing.assert_close(acts0.double(), ref_mlp_acts(model, toks, "relu"), rtol=1e-5, atol=1e-6)
    last = make_lm(n_layer=2, hook_layer=-1)
    last.load_state_dict(model.state_dict())
    assert last.hook == 1
    x = model.embed(toks)
    x = model.blocks[0](x)
    b1 = model.blocks[1]
    expected = b1.mlp.hidden(b1.ln_2(x + b1.attn(b1.ln_1(x))))
    assert torch.equal(last.mlp_acts(toks), expected)
    assert not torch.allclose(last.mlp_acts(toks), acts0)
    spliced = model(toks, mlp_fn=torch.zeros_like)[0]
    assert not torch.allclose(spliced, model(toks)[0])
    with pytest.raises(ConfigError, match="lm.hook_layer"):
        LM(tiny_cfg(n_layer=2, hook_layer=2), CTX)


def test_no_gradient_reaches_head_in_mlp_acts():
    model = make_lm()
    model.mlp_acts(tokens()).sum().backward()
    assert model.ln_f.weight.grad is None  # final LayerNorm/head are not in the graph
    assert model.blocks[0].mlp.W_out.weight.grad is None


def test_save_load_round_trip(tmp_path):
    model = make_lm(activation="gelu")
    cfg = Config()
    step = tmp_path / "lm" / "step-000010"
    identity = save_lm(model, cfg, step)
    meta = json.loads((step / "config.json").read_text())
    assert meta["identity"] == identity == lm_identity(step) and len(identity) == 64
    assert meta["ctx_len"] == CTX and meta["lm"]["activation"] == "gelu" and "torch" in meta["versions"]
    (tmp_path / "lm" / "latest").write_text("step-000010\n")
    for where in (step, tmp_path / "lm"):  # a step folder, or the LM folder via `latest`
        loaded = load_lm(where)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        toks = tokens()
        assert torch.equal(loaded(toks)[0], model(toks)[0])
        assert torch.equal(loaded.mlp_acts(toks), model.mlp_acts(toks))
    other = make_lm(seed=5)
    assert save_lm(other, cfg, tmp_path / "other") != identity


def test_missing_or_corrupt_checkpoint_errors(tmp_path):
    with pytest.raises(MonosemError, match=r"no trained LM at .*nowhere.*monosem train-lm"):
        load_lm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MonosemError, match="empty"):
        load_lm(tmp_path / "empty")
    folder = tmp_path / "lm"
    save_lm(make_lm(), Config(), folder)
    w = make_lm(seed=3).state_dict()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in w.items()}, str(folder / "model.safetensors"))
    with pytest.raises(MonosemError, match="does not match the identity"):
        load_lm(folder)
