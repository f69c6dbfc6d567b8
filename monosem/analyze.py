"""`monosem analyze CONFIG`: read a trained SAE's features on held-out text and write the feature browser.

    monosem analyze configs/quickstart.toml                       # -> runs/quickstart/report/index.html
    monosem analyze configs/quickstart.toml --analyze.tokens=200000 --analyze.sae=NAME
    from monosem.analyze import analyze; index_html = analyze(cfg)   # e.g. at the end of quickstart

Two passes over the val split through the frozen LM (stopping at the hook MLP) and the SAE; nothing
but per-feature summaries is kept, so memory is bounded by n_features x (top_k + n_intervals x
interval_samples + 16) context windows plus one batch of activations. Pass 1: density, max and mean
activation, the top-k contexts, a uniform sample of the tokens fired on. Pass 2 (the max now known):
uniform samples from n_intervals activation intervals, exact fire counts of the candidate tokens (so
the token a feature fires on most, and the single-token flag), and the ablation of each top context
(monosem.effects). Then the logit weights, the report (monosem.report) and a TensorBoard text table.
The collected statistics are cached in the report folder (analysis.pt): a rerun with the same SAE,
LM, data and pass settings only re-renders the report.
"""
from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from monosem import effects, featstats
from monosem.checkpoint import load_sae
from monosem.config import Config
from monosem.errors import MonosemError
from monosem.files import write_bytes_atomic
from monosem.lm import lm_identity, load_lm, weights_identity
from monosem.shards import read_manifest

TOKEN_SAMPLE = 16       # sampled fired-on tokens per feature (candidates for "the token it fires on most")
MIN_SINGLE_FIRES = 10   # fewer fires than this: too little evidence to call a feature single-token
N_LOGITS = 10           # top and bottom logit-weight tokens per feature
CACHE = "analysis.pt"
CACHE_FORMAT = 2        # bump when collect() changes what it returns: older caches are collected again


def report_dir(cfg: Config) -> Path:
    return Path(cfg.analyze.out) if cfg.analyze.out else cfg.run_dir / "report"


def analyze(cfg: Config, resume: bool = False) -> Path:
    """Collect (or reuse) the feature statistics, write the HTML report; return its index.html path."""
    from monosem.report import tensorboard_text, write_report

    sae, meta = load_sae(cfg.sae_dir, cfg.analyze.sae or None)
    lm = load_lm(cfg.lm_dir)
    if meta.get("lm_identity") and meta["lm_identity"] != lm_identity(cfg.lm_dir):
        raise MonosemError(f"the SAE in {cfg.sae_dir} was trained on another LM than {cfg.lm_dir} "
                           "(lm_identity in its cfg.json differs)")
    if lm.cfg.d_mlp != sae.cfg.d_in:
        raise MonosemError(f"SAE d_in {sae.cfg.d_in} != d_mlp {lm.cfg.d_mlp} of the LM in {cfg.lm_dir}")
    out = report_dir(cfg)
    key = cache_key(cfg, sae, meta)
    res = load_cache(out, key)
    if res is None:
        res = collect(cfg, lm, sae)
        res["key"] = key
    res["logit_top_ids"], res["logit_top"], res["logit_bot_ids"], res["logit_bot"] = \
        effects.logit_weights(lm, sae, N_LOGITS, vocab=res["token_counts"].nonzero()[:, 0])
    info = {"sae": meta.get("name", "sae"), "step": int(meta.get("step", 0)), "recipe": sae.recipe,
            "sae_dir": str(cfg.sae_dir), "ctx_len": lm.ctx_len, "cfg": cfg.analyze}
    index = write_report(out, res, info, token_text())
    buf = io.BytesIO()
    torch.save({k: v for k, v in res.items() if not k.startswith("logit_")}, buf)
    write_bytes_atomic(out / CACHE, buf.getvalue())
    tensorboard_text(cfg.sae_dir / "tb" / info["sae"], info["step"], res, info, token_text())
    print(f"feature browser: {index}")
    return index


def cache_key(cfg: Config, sae: torch.nn.Module, meta: dict) -> str:
    a = cfg.analyze
    manifest = read_manifest(cfg.data_dir)
    return json.dumps({
        "format": CACHE_FORMAT, "sae": weights_identity(sae.state_dict()), "lm": lm_identity(cfg.lm_dir),
        "val": [e.get("sha256") for e in manifest["splits"]["val"]["shards"]], "seed": cfg.run.seed,
        "pass": [a.tokens, a.skip_positions, a.top_k, a.n_intervals, a.interval_samples, a.window_before,
                 a.window_after, a.ablate, TOKEN_SAMPLE]}, sort_keys=True)


def load_cache(out: Path, key: str) -> dict | None:
    path = out / CACHE
    if not path.is_file():
        return None
    try:
        res = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a stale or broken cache is recomputed, not fatal
        print(f"monosem: ignoring unreadable {path}: {e}", file=sys.stderr)
        return None
    if res.get("key") != key:
        return None
    print(f"analyze: reusing the statistics in {path} (same SAE, LM, data and pass settings)")
    return res


def n_contexts(cfg: Config, ctx_len: int) -> int:
    total = int(read_manifest(cfg.data_dir)["splits"]["val"]["contexts"])
    if total == 0:
        raise MonosemError(f"{cfg.data_dir}: the val split is empty (raise data.val_fraction)")
    want = math.ceil(cfg.analyze.tokens / ctx_len) if cfg.analyze.tokens else total
    return min(total, want)


@torch.no_grad()
def run_pass(cfg: Config, lm: torch.nn.Module, sae: torch.nn.Module, desc: str,
             fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], None]) -> int:
    """Stream val contexts through LM + SAE; fn(tokens [B, T], resid, h, f [B*T, F], seq0) -> tokens
    counted (the first analyze.skip_positions of each context have f = 0 and are not counted)."""
    from monosem.stream import TokenStream

    T, skip = lm.ctx_len, cfg.analyze.skip_positions
    if skip >= T:
        raise MonosemError(f"analyze.skip_positions = {skip} leaves nothing of contexts of {T} tokens")
    n_ctx = n_contexts(cfg, T)
    stream = TokenStream.from_config(cfg, "val", 0, 1, loop=False)
    batches = stream.batches(cfg.analyze.batch_contexts)
    bar = tqdm(total=n_ctx * T, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 10)  # logs: a line per 10 s
    seq0 = 0
    try:
        for tokens, _ in batches:
            tokens = tokens[: n_ctx - seq0]                                   # [B, T] int64
            if tokens.shape[1] != T:
                raise MonosemError(f"{cfg.data_dir}: contexts of {tokens.shape[1]} tokens, the LM "
                                   f"in {cfg.lm_dir} takes {T}")
            resid, h = effects.hook_acts(lm, tokens)
            f = sae.encode(h.reshape(-1, h.shape[-1]).to(sae.W_dec.dtype)).float()  # [B*T, F]
            f.view(len(tokens), T, -1)[:, :skip] = 0                          # never fires there
            fn(tokens, resid, h, f, seq0)
            seq0 += len(tokens)
            bar.update(len(tokens) * T)
            if seq0 >= n_ctx:
                break
    finally:
        batches.close()
        bar.close()
    return seq0 * (T - skip)


def collect(cfg: Config, lm: torch.nn.Module, sae: torch.nn.Module) -> dict:
    """Both passes; a dict of tensors (what the report and the cache hold)."""
    a, T, F = cfg.analyze, lm.ctx_len, sae.cfg.n_features
    p1 = featstats.Pass1(F, a.top_k, a.window_before, a.window_after, TOKEN_SAMPLE, cfg.run.seed)
    token_counts = torch.zeros(lm.wte.weight.shape[0], dtype=torch.int64)   # [V] of the counted tokens

    def step1(tokens, resid, h, f, seq0):
        p1.update(tokens, f, seq0)
        token_counts.add_(torch.bincount(tokens[:, a.skip_positions:].flatten(), minlength=len(token_counts)))

    n_tokens = run_pass(cfg, lm, sae, "analyze 1/2", step1)
    p2 = featstats.Pass2(p1, a.n_intervals, a.interval_samples, cfg.run.seed)
    # ablations of the top contexts, in pass 2, as their contexts come by again
    index = p1.top.index                                                       # [F, k]
    ok = (index >= 0) & (index % T != T - 1)                                   # need a next token
    feat, slot = ok.nonzero(as_tuple=True)
    order = torch.argsort(index[feat, slot])
    feat, slot, gidx = feat[order], slot[order], index[feat, slot][order]
    delta = torch.full(index.shape, float("nan"))

    def step2(tokens, resid, h, f, seq0):
        p2.update(tokens, f, seq0)
        if not a.ablate:
            return
        lo, hi = torch.searchsorted(gidx, torch.tensor([seq0 * T, (seq0 + len(tokens)) * T])).tolist()
        if hi > lo:
            g = gidx[lo:hi]
            delta[feat[lo:hi], slot[lo:hi]] = effects.ablation_delta(
                lm, sae, resid, h, tokens, g // T - seq0, g % T, feat[lo:hi]).float()

    run_pass(cfg, lm, sae, "analyze 2/2", step2)
    top_token, top_share = p2.top_token(p1.fires)
    return {"n_tokens": torch.tensor(n_tokens), "token_counts": token_counts, "fires": p1.fires, "max": p1.max,
            "mean": (p1.sum / p1.fires.clamp_min(1)).float(), "top_token": top_token,
            "top_share": top_share.float(), "ablation": delta, **p1.top.state("top"),
            **p2.intervals.state("iv")}


def classify(res: dict, cfg_analyze) -> dict[str, torch.Tensor]:
    """[F] tensors: density, dead, ultralow, single_token (from collected statistics + thresholds)."""
    density = res["fires"].double() / max(int(res["n_tokens"]), 1)
    dead = res["fires"] == 0
    return {"density": density, "dead": dead,
            "ultralow": ~dead & (density < cfg_analyze.ultralow_density),
            "single_token": (res["top_share"] >= cfg_analyze.single_token_frac)
            & (res["fires"] >= MIN_SINGLE_FIRES) & (res["top_token"] >= 0)}


def token_text() -> Callable[[int], str]:
    """GPT-2 id -> its text (bytes decoded as UTF-8, invalid bytes as U+FFFD); not escaped."""
    from monosem.tokenizer import get_tokenizer

    enc = get_tokenizer()

    def text(i: int) -> str:
        if i < 0 or i >= enc.n_vocab:
            return "" if i < 0 else f"<{i}>"
        return enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")
    return text
