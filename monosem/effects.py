"""What a feature does to the LM's output: logit weights (direct effect) and ablations (loss change).

Logit weights: decoder column (input units) -> MLP output projection W_out -> final LayerNorm -> tied
unembedding. The LayerNorm is linearised the usual way: its mean-centring and its gain γ are applied
(both linear), its division by the token's standard deviation is not (a positive per-token factor that
rescales every logit of a token alike, so it does not change which tokens a feature promotes), and
its bias and W_out's bias are left out (they do not depend on the feature).

Ablation: at a token where the feature fires, splice the SAE's reconstruction into the hook MLP at that
position and read the next-token loss there; then remove the feature's term f_j W_dec[:, j] from the
reconstruction and read it again. Δloss = loss(without j) - loss(with j): > 0 when the feature helped.
Other positions keep their clean activations; with the hook in the last block (the paper's 1-layer
LM) that is exact, since nothing after that MLP mixes positions.

    top_ids, top_vals, bot_ids, bot_vals = logit_weights(lm, sae, n=10)       # [F, n] each
    resid, h = hook_acts(lm, tokens)                       # [B, T, d_model], [B, T, d_mlp]
    delta = ablation_delta(lm, sae, resid, h, tokens, b, pos, feature)         # [n]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from monosem.tokenizer import N_VOCAB


def decoder_columns(sae: torch.nn.Module) -> torch.Tensor:
    """[d_in, n_features] decoder directions in input units (the SAE decodes (W_dec f + b_dec) / scale)."""
    return sae.W_dec.detach().float() / sae.scale.float()


@torch.no_grad()
def logit_weights(lm: torch.nn.Module, sae: torch.nn.Module, n: int = 10, chunk: int = 256,
                  vocab: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(top ids, top values, bottom ids, bottom values), each [n_features, n], over GPT-2's real ids, or
    over the ids in `vocab` (analyze passes the tokens of the analysed text: a token the LM never saw
    keeps a random embedding that would otherwise fill both lists)."""
    block = lm.blocks[lm.hook]
    u = block.mlp.W_out.weight.float() @ decoder_columns(sae)                  # [d_model, F]
    u = (u - u.mean(0, keepdim=True)) * lm.ln_f.weight.float()[:, None]       # LN: centre, gain
    ids = torch.arange(min(N_VOCAB, lm.wte.weight.shape[0]))
    if vocab is not None and len(vocab):
        ids = vocab[vocab < len(ids)].long()
    W_U = lm.wte.weight.float()[ids]                                           # [V, d_model]
    out = [[], [], [], []]
    for lo in range(0, u.shape[1], chunk):
        logits = (W_U @ u[:, lo:lo + chunk]).T                                 # [c, V]
        k = min(n, logits.shape[1])
        top, bot = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        for lst, t in zip(out, (ids[top.indices], top.values, ids[bot.indices], bot.values)):
            lst.append(t)
    return tuple(torch.cat(lst) for lst in out)


@torch.no_grad()
def hook_acts(lm: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual after the hook block's attention [B, T, d_model], MLP post-activation [B, T, d_mlp])."""
    x = lm.embed(tokens)
    for block in lm.blocks[: lm.hook]:
        x = block(x)
    return lm.blocks[lm.hook].pre_mlp(x)


@torch.no_grad()
def _loss_at(lm: torch.nn.Module, resid: torch.Tensor, h: torch.Tensor, hp: torch.Tensor,
             rows: torch.Tensor, pos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[n] next-token CE at (rows, pos) when the hook MLP's post-activation there is hp [n, d_mlp]
    (clean h [B, T, d_mlp] elsewhere)."""
    block, rest = lm.blocks[lm.hook], lm.blocks[lm.hook + 1:]
    idx = torch.arange(len(rows))
    if len(rest) == 0:  # only the position itself matters: skip the other T - 1 positions
        x = resid[rows, pos] + block.mlp.W_out(hp)                             # [n, d_model]
    else:
        hs = h[rows]                                                           # [n, T, d_mlp] (a copy)
        hs[idx, pos] = hp
        x = resid[rows] + block.mlp.W_out(hs)
        for later in rest:
            x = later(x)
        x = x[idx, pos]
    logits = F.linear(lm.ln_f(x), lm.wte.weight).float()                       # [n, vocab]
    return F.cross_entropy(logits, target, reduction="none")


@torch.no_grad()
def ablation_delta(lm: torch.nn.Module, sae: torch.nn.Module, resid: torch.Tensor, h: torch.Tensor,
                   tokens: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                   feature: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """[n] Δ next-token loss at (rows[i], pos[i]) when feature[i] is removed from the reconstruction
    spliced in at that position. resid, h, tokens: the batch ([B, T, ...]); pos must be < T - 1."""
    out, cols = [], decoder_columns(sae)                                       # [d_in, F]
    for lo in range(0, len(rows), chunk):
        r, p, j = rows[lo:lo + chunk], pos[lo:lo + chunk], feature[lo:lo + chunk]
        idx = torch.arange(len(r))
        hp = h[r, p]                                                           # [n, d_mlp]
        f = sae.encode(hp.to(sae.W_dec.dtype))                                 # [n, F]
        x_hat = sae.decode(f).to(h.dtype)                                      # [n, d_mlp]
        term = (f[idx, j, None] * cols[:, j].T).to(h.dtype)                    # [n, d_mlp]
        target = tokens[r, p + 1]
        spliced = _loss_at(lm, resid, h, x_hat, r, p, target)
        out.append(_loss_at(lm, resid, h, x_hat - term, r, p, target) - spliced)
    return torch.cat(out) if out else torch.zeros(0)
