"""The static feature browser: HTML pages that open from disk (file://) with no server, and a TB table.

    runs/<name>/report/index.html       every alive feature: a table sortable by density, max
                                        activation, the single-token flag (small inline JS)
    runs/<name>/report/f/00042.html     one feature: highlighted top contexts (activation in a tooltip),
                                        interval samples, logit weights, ablation figures
    runs/<name>/report/dead.html, ultralow.html, density.png (log10 feature density)

Every piece of corpus text (and every token string) goes through html.escape, attributes included: the
corpus is data, never markup. Written by monosem.analyze (`write_report(out, res, info, token_text)`).
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Callable

import torch

from monosem.files import atomic_dir

CSS = """body{font-family:sans-serif;margin:1.5em;max-width:70em}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
th{cursor:pointer;background:#f4f4f4}.ctx{font-family:monospace;white-space:pre;margin:3px 0;
overflow-x:auto}.t{border-radius:2px}.c{outline:1px solid #333}.v{color:#666;font-size:85%;
display:inline-block;width:9em}code{background:#f4f4f4}"""
SORT_JS = """function sortBy(col,numeric){const tb=document.querySelector('#features tbody');
const th=document.querySelectorAll('#features th')[col];const dir=th.dataset.dir==='desc'?1:-1;
th.dataset.dir=dir===1?'asc':'desc';const rows=Array.from(tb.rows);rows.sort((a,b)=>{
let x=a.cells[col].dataset.v,y=b.cells[col].dataset.v;if(numeric){x=parseFloat(x);y=parseFloat(y);}
return (x<y?-1:x>y?1:0)*dir;});rows.forEach(r=>tb.appendChild(r));}"""
E = html.escape  # quote=True: safe in text and in attribute values


def _page(title: str, body: str, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{E(title)}</title>"
            f"<style>{CSS}</style>{js}</head><body>{body}</body></html>\n")


def shown(text: str) -> str:
    """A token's text as displayed: newlines and tabs made visible."""
    return text.replace("\n", "\u21b5").replace("\t", "\u2192")


def shown_alone(text: str) -> str:
    """A token shown out of context (a table cell): spaces too made visible when it is all whitespace."""
    return shown(text).replace(" ", "\u2423") if text and not text.strip(" ") else shown(text)


def context_html(tokens: torch.Tensor, acts: torch.Tensor, centre: int, vmax: float,
                 text: Callable[[int], str]) -> str:
    """One context window: a span per token, shaded by the feature's activation, value in a tooltip."""
    spans = []
    for i, (t, a) in enumerate(zip(tokens.tolist(), acts.float().tolist())):
        if t < 0:
            continue
        alpha = min(1.0, max(0.0, a / vmax)) if vmax > 0 else 0.0
        cls = "t c" if i == centre else "t"
        tip = f"activation {a:.4g} | token {t} {text(t)!r}"
        shade = f" style='background:rgba(255,128,0,{alpha:.2f})'" if alpha >= 0.005 else ""
        spans.append(f"<span class='{cls}'{shade} title='{E(tip)}'>{E(shown(text(t)))}</span>")
    return "".join(spans)


def _samples(rows: list[tuple[str, str]]) -> str:
    return "".join(f"<div class='ctx'><span class='v'>{E(label)}</span>{ctx}</div>" for label, ctx in rows)


def feature_page(j: int, res: dict, cls: dict, info: dict, text: Callable[[int], str]) -> str:
    a, vmax = info["cfg"], float(res["max"][j])
    centre = a.window_before
    tok = int(res["top_token"][j])
    status = "dead" if cls["dead"][j] else "ultralow" if cls["ultralow"][j] else "alive"
    facts = [("fires", f"{int(res['fires'][j]):,} of {int(res['n_tokens']):,} tokens"),
             ("density", f"{float(cls['density'][j]):.3g}"), ("status", status),
             ("max activation", f"{vmax:.4g}"), ("mean activation (when firing)",
                                                  f"{float(res['mean'][j]):.4g}"),
             ("fires most on", f"{text(tok)!r} (id {tok}), {float(res['top_share'][j]):.1%} of fires"),
             ("single-token", "yes" if cls["single_token"][j] else "no")]
    body = [f"<p><a href='../index.html'>all features</a></p><h1>Feature {j}</h1><table>",
            *(f"<tr><th>{E(k)}</th><td>{E(v)}</td></tr>" for k, v in facts), "</table>"]
    logit = lambda ids, vals: ", ".join(  # noqa: E731
        f"<code>{E(shown_alone(text(int(i))))}</code> {float(v):+.3f}" for i, v in zip(ids, vals))
    body += ["<h2>Logit weights</h2><p>(decoder column through W_out, the final LayerNorm's centring "
             "and gain, and the unembedding)</p>",
             f"<p>top: {logit(res['logit_top_ids'][j], res['logit_top'][j])}</p>",
             f"<p>bottom: {logit(res['logit_bot_ids'][j], res['logit_bot'][j])}</p>"]
    d = res["ablation"][j]
    ok = ~torch.isnan(d)
    mean = f"{float(d[ok].mean()):+.4f}" if ok.any() else "n/a"
    body.append(f"<h2>Ablation</h2><p>next-token loss change when the feature is removed from the "
                f"spliced reconstruction at its top contexts: mean {E(mean)} nats over {int(ok.sum())}"
                " contexts</p>")
    top = [(f"{float(v):.3g} Δ{float(dl):+.3f}", context_html(t, ac, centre, vmax, text))
           for v, dl, t, ac, i in zip(res["top_values"][j], d, res["top_tokens"][j],
                                      res["top_acts"][j], res["top_index"][j]) if i >= 0]
    body += ["<h2>Top activations</h2>", _samples(top) or "<p>none</p>", "<h2>Intervals</h2>"]
    n_iv, per = a.n_intervals, a.interval_samples
    for b in reversed(range(n_iv)):
        g = j * n_iv + b
        rows = [(f"{float(v):.3g}", context_html(t, ac, centre, vmax, text))
                for v, t, ac, i in zip(res["iv_values"][g], res["iv_tokens"][g], res["iv_acts"][g],
                                       res["iv_index"][g]) if i >= 0]
        if rows:
            lo, hi = vmax * b / n_iv, vmax * (b + 1) / n_iv
            body += [f"<h3>[{lo:.3g}, {hi:.3g}]: {len(rows)} of up to {per}</h3>", _samples(rows)]
    return _page(f"Feature {j}", "".join(body))


def index_page(res: dict, cls: dict, info: dict, text: Callable[[int], str]) -> str:
    F, n_tokens = len(res["fires"]), int(res["n_tokens"])
    dead, ultra, single = (int(cls[k].sum()) for k in ("dead", "ultralow", "single_token"))
    head = (f"<h1>Features of {E(info['sae'])} (step {info['step']})</h1><p>{F:,} features, "
            f"{E(info['recipe'])}, {n_tokens:,} held-out tokens. <a href='dead.html'>{dead} dead</a>, "
            f"<a href='ultralow.html'>{ultra} ultralow</a> (density &lt; "
            f"{info['cfg'].ultralow_density:g}), {single} single-token. SAE: {E(info['sae_dir'])}</p>"
            "<p><img src='density.png' alt='log10 feature density'></p>"
            "<p>Click a column header to sort.</p>")
    cols = [("feature", True), ("log10 density", True), ("max act", True), ("single-token", True),
            ("fires most on", False), ("share", True), ("ablation Δloss", True), ("top logits", False)]
    ths = "".join(f"<th onclick='sortBy({i},{str(num).lower()})'>{E(c)}</th>"
                  for i, (c, num) in enumerate(cols))
    rows = []
    for j in range(F):
        if cls["dead"][j]:
            continue
        d = res["ablation"][j]
        d = d[~torch.isnan(d)]
        dl = float(d.mean()) if len(d) else float("nan")
        logd = float(torch.log10(cls["density"][j]))
        tok = text(int(res["top_token"][j]))
        logits = " ".join(shown_alone(text(int(i))) for i in res["logit_top_ids"][j][:3])
        cells = [(j, f"<a href='f/{j:05d}.html'>{j}</a>"), (logd, f"{logd:.2f}"),
                 (float(res["max"][j]), f"{float(res['max'][j]):.3g}"),
                 (int(cls["single_token"][j]), "yes" if cls["single_token"][j] else ""),
                 (tok, f"<code>{E(shown_alone(tok))}</code>"),
                 (float(res["top_share"][j]), f"{float(res['top_share'][j]):.0%}"),
                 (dl if dl == dl else -1e9, f"{dl:+.4f}" if dl == dl else ""), (logits, E(logits))]
        rows.append("<tr>" + "".join(f"<td data-v='{E(str(v))}'>{h}</td>" for v, h in cells) + "</tr>")
    table = f"<table id='features'><thead><tr>{ths}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return _page(f"Features of {info['sae']}", head + table, SORT_JS)


def list_page(title: str, ids: list[int], link: bool, res: dict, cls: dict) -> str:
    items = [f"<a href='f/{j:05d}.html'>{j}</a> ({int(res['fires'][j])} fires)" if link else str(j)
             for j in ids]
    return _page(title, f"<p><a href='index.html'>all features</a></p><h1>{E(title)}</h1>"
                        f"<p>{len(ids)} features</p><p>{', '.join(items) or 'none'}</p>")


def write_report(out: str | Path, res: dict, info: dict, text: Callable[[int], str]) -> Path:
    """Write the whole report folder (atomically replaced); return the index.html path."""
    from monosem.analyze import classify
    from monosem.metrics import density_image, png_bytes

    cls = classify(res, info["cfg"])
    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "f").mkdir()
        (tmp / "index.html").write_text(index_page(res, cls, info, text))
        for j in (~cls["dead"]).nonzero()[:, 0].tolist():
            (tmp / "f" / f"{j:05d}.html").write_text(feature_page(j, res, cls, info, text))
        dead = cls["dead"].nonzero()[:, 0].tolist()
        ultra = cls["ultralow"].nonzero()[:, 0].tolist()
        (tmp / "dead.html").write_text(list_page("Dead features (never fired)", dead, False, res, cls))
        (tmp / "ultralow.html").write_text(list_page("Ultralow-density features", ultra, True, res, cls))
        rgb = density_image(res["fires"], max(int(res["n_tokens"]), 1), title=info["sae"])
        (tmp / "density.png").write_bytes(png_bytes(rgb))
    return out / "index.html"


def top_features(res: dict, cls: dict, n: int = 32) -> list[int]:
    """Alive, not ultralow features with the largest mean ablation Δloss (density if none measured)."""
    d = res["ablation"].nanmean(dim=1)                                         # [F], NaN: none
    score = torch.where(torch.isnan(d), cls["density"].float(), d)
    score[cls["dead"] | cls["ultralow"]] = float("-inf")
    k = min(n, int(torch.isfinite(score).sum()))
    return score.topk(k).indices.tolist() if k else []


def tensorboard_text(logdir: str | Path, step: int, res: dict, info: dict,
                     text: Callable[[int], str]) -> None:
    """The top features as a Markdown table, text tag "features/top" in the SAE's TensorBoard run."""
    from torch.utils.tensorboard import SummaryWriter

    from monosem.analyze import classify

    cls = classify(res, info["cfg"])
    esc = lambda s: shown_alone(s).replace("|", "\\|").replace("`", "'")  # noqa: E731
    lines = ["| feature | density | max | fires most on | single-token | top logits |",
             "|---|---|---|---|---|---|"]
    for j in top_features(res, cls):
        logits = " ".join(esc(text(int(i))) for i in res["logit_top_ids"][j][:3])
        lines.append(f"| {j} | {float(cls['density'][j]):.2e} | {float(res['max'][j]):.3g} | "
                     f"`{esc(text(int(res['top_token'][j])))}` | "
                     f"{'yes' if cls['single_token'][j] else ''} | `{logits}` |")
    with SummaryWriter(str(logdir)) as tb:
        tb.add_text("features/top", "\n".join(lines), step)
