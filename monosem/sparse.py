"""The SAE training step with a hand-written backward, in two variants that compute the same maths:

  dense   every product is a GEMM over all B x n_features entries (the encoder and decoder forward,
          g_f = g_x̂ W_dec, ∇W_enc = g_preᵀ x̄, ∇W_dec = g_x̂ᵀ f): 10·B·d_in·n_features FLOP.
  sparse  only the encoder forward GEMM is dense (2·B·d_in·n_features); with f = ReLU(pre) only the active
          entries (f > 0) reach x̂ and carry gradient, so the rest runs on those entries:
            x̂ = W_dec[:, active] f_active + b_dec          F.embedding_bag over the rows' active columns
            g_f = W_dec[:, j]ᵀ g_x̂[b] + λ on active (b, j)  torch.sparse.sampled_addmm on the CSR pattern
            ∇W_enc[j] = Σ_b g_pre[b, j] x̄[b]               F.embedding_bag on the pattern sorted by feature
            ∇W_dec[:, j] = Σ_b g_x̂[b] f[b, j]              (the same, with table g_x̂)
The AuxK loss (topk) always runs on its own B x aux_k pattern. The unit-norm projection acts per decoder
column, so it applies to the finished gradient unchanged. Parameter gradients come back as ordinary dense
tensors (DDP all-reduces them; Adam and the renormalisation see every parameter), in the parameters' dtype.

bf16 (autocast on, or bf16 parameters): the dense GEMMs run in bf16 with [B, n_features] tensors kept in
bf16; the sparse products, the loss parts, the biases and every parameter gradient stay in float32.

    xs_hat, f, mse, l1, aux = sae_step(W_enc, b_enc, W_dec, b_dec, xs, spec, info)   # info gets the path
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

MODES = ("auto", "on", "off")
DENSITY_ROWS = 256  # rows of f counted to choose the path (a full count costs a pass over [B, n_features])


class StepSpec(NamedTuple):
    recipe: str                       # anthropic-2023 | anthropic-2024-04 | topk
    mode: str                         # auto | on | off (sparse path)
    threshold: float                  # auto: sparse when active entries / (B x n_features) <= this
    compute_dtype: torch.dtype        # dtype of the dense GEMMs and of f (bf16 under autocast)
    k: int = 0                        # topk: active latents per vector
    aux_k: int = 0                    # topk: dead latents in the AuxK loss
    aux_coeff: float = 0.0
    dead_idx: torch.Tensor | None = None  # [n_dead] int64 indices of dead features (AuxK)
    unit_norm: bool = True            # project W_dec's gradient onto the unit-norm tangent space


def column_norms(w: torch.Tensor, dim: int = 0, keepdim: bool = False) -> torch.Tensor:
    """‖w‖ along `dim` as sqrt(Σ w²): on the CPU ~10x faster than torch.norm(dim=0) of a [512, 4096]."""
    return (w * w).sum(dim, keepdim=keepdim).sqrt_()


def project_columns(g: torch.Tensor, w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """g minus, per decoder column (a slice along `dim` of a [d_in, n_features] or transposed tensor), its
    part parallel to that column of w: g - w (w·g)/(w·w). In float32 or wider; returns g's dtype.
    (addcmul: a broadcast multiply then subtract is ~5x slower on the CPU.)"""
    dtype = torch.promote_types(g.dtype, torch.float32)
    w_, g_ = w.to(dtype), g.to(dtype)
    coef = (w_ * g_).sum(dim, keepdim=True) / (w_ * w_).sum(dim, keepdim=True).clamp_min(1e-30)
    return torch.addcmul(g_, w_, coef, value=-1).to(g.dtype)


def sum_sq(t: torch.Tensor) -> torch.Tensor:
    """Σ t² as a dot product: no temporary, and on the CPU ~15x faster than t.pow(2).sum()."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


def _offsets(rows: torch.Tensor, n_bags: int) -> torch.Tensor:
    """[n_bags + 1] start of each bag for entries sorted by bag (rows), as embedding_bag wants."""
    out = rows.new_zeros(n_bags + 1)
    torch.cumsum(torch.bincount(rows, minlength=n_bags), 0, out=out[1:])
    return out


def gather_rows(cols: torch.Tensor, offsets: torch.Tensor, vals: torch.Tensor,
                table: torch.Tensor) -> torch.Tensor:
    """out[b] = Σ_{e in bag b} vals[e] table[cols[e]]: [n_bags, d]; entries grouped by bag."""
    return F.embedding_bag(cols, table, offsets, mode="sum", per_sample_weights=vals,
                           include_last_offset=True)


def sampled_dot(g: torch.Tensor, WT: torch.Tensor, offsets: torch.Tensor, cols: torch.Tensor,
                vals: torch.Tensor) -> torch.Tensor:
    """[nnz] g[b] · WT[cols[e]] on a CSR pattern (offsets [B+1], cols sorted within each row)."""
    with warnings.catch_warnings():  # "CSR support is in beta": here it is only a pattern for one op
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(offsets, cols, vals, (g.shape[0], WT.shape[0]),
                                          check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, g, WT.t(), beta=0.0).values()


def scatter_t(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, table: torch.Tensor,
              n_features: int, order: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[n_features, d] out[j] = Σ_{e: cols[e]=j} vals[e] table[rows[e]] (a sparse-transpose product);
    `order` sorts the entries by feature, `offsets` [n_features + 1] bounds each feature's run."""
    return gather_rows(rows[order], offsets, vals[order], table)


class _Pattern(NamedTuple):
    rows: torch.Tensor     # [nnz] int64, non-decreasing
    cols: torch.Tensor     # [nnz] int64, increasing within a row
    vals: torch.Tensor     # [nnz] float32 (or wider) activations
    offsets: torch.Tensor  # [B + 1]


def _encoder_gemm(xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, cd: torch.dtype):
    """pre = xc W_encᵀ + b_enc [B, m] in dtype cd, and xc [B, d_in] in cd (a view). The bias rides in the
    GEMM as two extra inner columns (ones x [b_enc in cd, its rounding remainder]): no [B, m] broadcast
    pass, and a float32-accurate bias under bf16. Inner size padded to a multiple of 16."""
    (B, d), m = xc.shape, W_enc.shape[0]
    k = -(-(d + 2) // 16) * 16
    xa = xc.new_zeros(B, k, dtype=cd)
    xa[:, :d] = xc
    xa[:, d:d + 2] = 1
    Wa = W_enc.new_zeros(m, k, dtype=cd)
    Wa[:, :d] = W_enc
    b_hi = b_enc.detach().to(cd)
    Wa[:, d] = b_hi
    Wa[:, d + 1] = b_enc.detach() - b_hi.to(b_enc.dtype)
    return xa @ Wa.t(), xa[:, :d]


def _pattern_from_topk(vals: torch.Tensor, idx: torch.Tensor, col_map: torch.Tensor | None,
                       dtype: torch.dtype) -> _Pattern:
    """Positive entries of a per-row top-k ([B, k] values and column indices) as a CSR pattern."""
    idx, perm = idx.sort(dim=1)
    vals = vals.gather(1, perm)
    cols = idx if col_map is None else col_map[idx]  # sorted within a row: col_map is increasing
    B, k = vals.shape
    keep = (vals > 0).flatten()
    rows = torch.arange(B, device=vals.device).repeat_interleave(k)[keep]
    return _Pattern(rows, cols.flatten()[keep], vals.flatten()[keep].to(dtype), _offsets(rows, B))


def _pattern_from_dense(f: torch.Tensor, dtype: torch.dtype) -> _Pattern:
    rows, cols = torch.nonzero(f).unbind(1)  # row-major order
    return _Pattern(rows, cols, f[rows, cols].to(dtype), _offsets(rows, f.shape[0]))


def _activate(pre: torch.Tensor, spec: StepSpec, exact: torch.dtype):
    """f (in pre's buffer), its active-entry count, and the top-k pattern (topk recipe) or None."""
    if spec.recipe != "topk":
        f = pre.relu_()
        if spec.mode != "auto":
            return f, -1, None
        rows = f[:DENSITY_ROWS]  # the choice needs only an estimate: count the first rows (resume-safe)
        return f, int(torch.count_nonzero(rows)) * f.shape[0] // max(1, rows.shape[0]), None
    vals, idx = pre.topk(spec.k, dim=1, sorted=False)  # [B, k]
    vals = vals.relu_()
    f = pre.zero_().scatter_(1, idx, vals)
    return f, int(torch.count_nonzero(vals)), _pattern_from_topk(vals, idx, None, exact)


def _aux_pattern(pre_dead: torch.Tensor | None, spec: StepSpec, exact: torch.dtype) -> _Pattern | None:
    """AuxK: the top aux_k pre-activations among dead features per vector, ReLU'd, as a pattern."""
    if pre_dead is None:
        return None
    vals, idx = pre_dead.topk(min(spec.aux_k, pre_dead.shape[1]), dim=1)  # [B, k_aux]
    return _pattern_from_topk(vals.relu(), idx, spec.dead_idx, exact)


def _dec_grad_finish(g: torch.Tensor, W: torch.Tensor, dim: int, spec: StepSpec, lam: torch.Tensor,
                     norms: torch.Tensor | None, colsum: torch.Tensor | None) -> torch.Tensor:
    """Add the decoder-norm-weighted L1 term (2024-04) and project onto the unit-norm tangent space."""
    shape = [1, 1]
    shape[1 - dim] = -1  # dim is the d_in axis; features run along the other
    if spec.recipe == "anthropic-2024-04":  # d(λ Σ f_j ‖w_j‖ / B)/dw_j = λ/B (Σ_b f_bj) w_j/‖w_j‖
        g = g + W * (lam * colsum / norms.clamp_min(1e-30)).view(shape)
    elif spec.unit_norm:
        g = project_columns(g, W, dim)
    return g


class SAEStep(torch.autograd.Function):
    """(W_enc, b_enc, W_dec, b_dec, xs) -> (xs_hat, f, mse, l1, aux); xs is the scaled input [B, d_in],
    xs_hat [B, d_in] and f [B, n_features] carry no gradient; loss = mse + λ l1 + aux is formed outside."""

    @staticmethod
    def forward(ctx, W_enc, b_enc, W_dec, b_dec, xs, spec: StepSpec, info: dict):
        exact = torch.promote_types(W_dec.dtype, torch.float32)  # sparse maths, loss parts, gradients
        cd = spec.compute_dtype
        B, m = xs.shape[0], W_enc.shape[0]
        xc = (xs - b_dec if spec.recipe != "anthropic-2024-04" else xs).to(exact)  # [B, d_in]
        pre, xc_cd = _encoder_gemm(xc, W_enc, b_enc, cd)                           # [B, m] the dense GEMM
        use_aux = spec.recipe == "topk" and spec.dead_idx is not None and spec.aux_k > 0 \
            and spec.dead_idx.numel() > 0
        aux_pat = _aux_pattern(pre[:, spec.dead_idx] if use_aux else None, spec, exact)
        f, nnz, pat = _activate(pre, spec, exact)
        density = nnz / max(1, f.numel()) if nnz >= 0 else float("nan")
        sparse = spec.mode == "on" or (spec.mode == "auto" and density <= spec.threshold)
        W_decx = W_dec.to(exact)
        WT = W_decx.t().contiguous() if sparse or use_aux else None                # [m, d_in]
        norms = column_norms(W_decx) if spec.recipe == "anthropic-2024-04" else None  # [m]
        if sparse:
            pat = pat or _pattern_from_dense(f, exact)
            density = pat.cols.numel() / max(1, f.numel())  # exact: every active entry is listed
            xs_hat = gather_rows(pat.cols, pat.offsets, pat.vals, WT) + b_dec.to(exact)
            colsum = torch.zeros(m, dtype=exact, device=f.device).index_add_(0, pat.cols, pat.vals)
        else:
            xs_hat = torch.addmm(b_dec.to(cd), f, W_dec.to(cd).t()).to(exact)
            colsum = f.sum(0, dtype=exact)                                        # [m]
        counts = torch.bincount(pat.cols, minlength=m) if sparse else (f > 0).sum(0)   # [m] fires
        info.update(path="sparse" if sparse else "dense", density=density, counts=counts)
        l1 = (colsum @ norms if norms is not None else colsum.sum()) / B
        r = xs_hat - xs.to(exact)                                                 # [B, d_in]
        mse = sum_sq(r) / r.numel()
        aux, aux_parts = xs_hat.new_zeros(()), None
        if aux_pat is not None:
            e_hat = gather_rows(aux_pat.cols, aux_pat.offsets, aux_pat.vals, WT)  # [B, d_in]
            err, se = e_hat + r, sum_sq(r).clamp_min(1e-12)                       # e = -r (constant)
            aux = spec.aux_coeff * sum_sq(err) / se
            aux_parts = (aux_pat, err, se)
        ctx.mark_non_differentiable(xs_hat, f)
        ctx.set_materialize_grads(False)  # else autograd fills a [B, n_features] zero gradient for f
        ctx.spec, ctx.sparse, ctx.aux_parts, ctx.pat = spec, sparse, aux_parts, pat if sparse else None
        ctx.shapes, ctx.device_type = (B, m, W_enc.dtype, W_dec.dtype, b_dec.dtype), xs.device.type
        ctx.save_for_backward(_keep(W_enc), _keep(W_dec), xc if sparse else xc_cd, r, WT,
                              None if sparse else f, norms, colsum)
        return xs_hat, f, mse, l1, aux

    @staticmethod
    def backward(ctx, _g_xs_hat, _g_f, g_mse, g_l1, g_aux):
        with torch.autocast(ctx.device_type, enabled=False):  # dtypes are chosen here, not by autocast
            return _backward(ctx, g_mse, g_l1, g_aux)


def _backward(ctx, g_mse, g_l1, g_aux):
    """Parameter gradients from the scalar loss parts' gradients (x̂ and f carry none)."""
    W_enc, W_dec, xc, r, WT, f, norms, colsum = ctx.saved_tensors
    spec, (B, m, enc_dtype, dec_dtype, bias_dtype) = ctx.spec, ctx.shapes
    exact = r.dtype
    zero = r.new_zeros(())
    g_mse, g_l1, g_aux = (zero if g is None else g for g in (g_mse, g_l1, g_aux))
    g_x = r * (2 * g_mse / r.numel())                                         # [B, d_in] d loss/d x̂
    lam = g_l1.to(exact) / B
    lam_c = lam * norms if norms is not None else lam                         # [m] or scalar
    aux = None
    if ctx.aux_parts is not None:
        apat, err, se = ctx.aux_parts
        g_eh = err * (2 * spec.aux_coeff * g_aux / se)                        # [B, d_in]
        aux = (apat, g_eh, sampled_dot(g_eh, WT, apat.offsets, apat.cols, apat.vals))
    if ctx.sparse:
        g_enc, gW_decT = _sparse_weight_grads(ctx.pat, g_x, WT, xc, lam_c, aux, m)
        gW_enc, gb_enc = g_enc
        gW_dec = _dec_grad_finish(gW_decT, WT, 1, spec, lam, norms, colsum).t()
    else:
        gW_enc, gb_enc, gW_dec = _dense_weight_grads(f, g_x, W_dec, xc, lam_c, aux, m)
        gW_dec = _dec_grad_finish(gW_dec, W_dec.to(exact), 0, spec, lam, norms, colsum)
    gb_dec = g_x.sum(0)
    if spec.recipe != "anthropic-2024-04":  # pre = (xs - b_dec) W_encᵀ + b_enc
        gb_dec = gb_dec - gb_enc @ W_enc.to(exact)
    return (gW_enc.to(enc_dtype), gb_enc.to(enc_dtype), gW_dec.to(dec_dtype).contiguous(),
            gb_dec.to(bias_dtype), None, None, None)


def _feature_order(cols: torch.Tensor) -> torch.Tensor:
    """Permutation sorting entries by feature, stable (deterministic sums); int32 keys take torch's fast
    radix path on the CPU (~15x faster than int64 there)."""
    return torch.argsort(cols.to(torch.int32), stable=True)


def _keep(p: torch.Tensor) -> torch.Tensor:
    """A parameter to save for backward: a copy under DeepSpeed ZeRO-3 (it frees gathered parameters
    after forward), a view otherwise."""
    return p.detach().clone() if hasattr(p, "ds_id") else p.detach()


def _sparse_weight_grads(pat: _Pattern, g_x, WT, xc, lam_c, aux, m: int):
    """((∇W_enc [m, d], ∇b_enc [m]), ∇W_decᵀ [m, d]) from the active entries (and AuxK's)."""
    lam_e = lam_c[pat.cols] if lam_c.dim() else lam_c
    g_vals = sampled_dot(g_x, WT, pat.offsets, pat.cols, pat.vals) + lam_e       # [nnz] d loss/d pre
    rows, cols, vals, table, g_pre = pat.rows, pat.cols, pat.vals, g_x, g_vals
    if aux is not None:  # one pass over both patterns; AuxK's rows index the second half of the table
        apat, g_eh, g_av = aux
        rows_dec = torch.cat([rows, apat.rows + g_x.shape[0]])
        rows, cols = torch.cat([rows, apat.rows]), torch.cat([cols, apat.cols])
        vals, table, g_pre = torch.cat([vals, apat.vals]), torch.cat([g_x, g_eh]), torch.cat([g_pre, g_av])
    else:
        rows_dec = rows
    order = _feature_order(cols)
    offsets = _offsets(cols, m)
    gW_enc = scatter_t(rows, cols, g_pre, xc, m, order, offsets)                  # [m, d_in]
    gb_enc = torch.zeros(m, dtype=g_pre.dtype, device=g_pre.device).index_add_(0, cols, g_pre)
    gW_decT = scatter_t(rows_dec, cols, vals, table, m, order, offsets)           # [m, d_in]
    return (gW_enc, gb_enc), gW_decT


def _dense_weight_grads(f, g_x, W_dec, xc_cd, lam_c, aux, m: int):
    """∇W_enc [m, d], ∇b_enc [m], ∇W_dec [d, m] with GEMMs in f's dtype (bf16 under autocast)."""
    cd, exact = f.dtype, g_x.dtype
    g_x_cd = g_x.to(cd)
    g_pre = g_x_cd @ W_dec.to(cd)                                                 # [B, m]
    g_pre.add_(lam_c.to(cd) if lam_c.dim() else lam_c)
    g_pre = torch.ops.aten.threshold_backward(g_pre, f, 0)                       # ReLU / top-k mask
    if aux is not None:
        apat, g_eh, g_av = aux
        g_pre.index_put_((apat.rows, apat.cols), g_av.to(cd), accumulate=True)
    gW_enc = (g_pre.t() @ xc_cd).to(exact)                                        # [m, d_in]
    gb_enc = g_pre.sum(0, dtype=exact)
    gW_dec = (g_x_cd.t() @ f).to(exact)                                           # [d_in, m]
    if aux is not None:
        order = _feature_order(apat.cols)
        gW_dec = gW_dec + scatter_t(apat.rows, apat.cols, apat.vals, g_eh, m, order,
                                    _offsets(apat.cols, m)).t()
    return gW_enc, gb_enc, gW_dec
