"""The feature browser, end to end: a planted feature, corpus text that looks like markup, real Chromium.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_report.py
Needs Debian's `chromium` (apt-get update && apt-get install -y chromium): without it the tests fail.
"""
import math
import struct

import numpy as np
import pytest

from monosem.analyze import analyze
from monosem.metrics import read_texts
from monosem.stream import TokenStream

from chromium_cdp import Browser  # tests/chromium_cdp.py
from saerun import N_DEAD, N_FEATURES, PLANTED, XSS, make_planted_run  # tests/saerun.py


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg, token = make_planted_run(tmp_path_factory.mktemp("report"))
    index = analyze(cfg)
    return cfg, token, index


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


def val_tokens(cfg) -> np.ndarray:
    """The tokens analyze counts: every val context without its first analyze.skip_positions."""
    stream = TokenStream.from_config(cfg, "val", 0, 1, loop=False)
    skip = cfg.analyze.skip_positions
    return np.concatenate([t.numpy()[:, skip:].ravel() for t, _ in stream.batches(64)])


def test_dialog_detection_works(browser, tmp_path):
    """The check below can fail: a page that does open a dialog is seen doing so."""
    page = tmp_path / "alert.html"
    page.write_text("<html><body><p>x</p><script>alert('opened')</script></body></html>")
    assert browser.open(page.as_uri())["dialogs"] == ["opened"]


def test_corpus_markup_renders_as_literal_text(run, browser):
    cfg, token, index = run
    page = browser.open((index.parent / "f" / f"{PLANTED:05d}.html").as_uri())
    assert page["dialogs"] == []
    assert XSS in page["text"]                      # the tag is text, not an element
    assert "'&amp; <script>" in page["text"]        # the corpus' "&amp;" stays five characters
    assert browser.evaluate("document.scripts.length") == 0
    assert browser.evaluate("document.querySelectorAll('.ctx').length") >= 10
    centres = browser.evaluate("Array.from(document.querySelectorAll('.c')).map(e => e.textContent)")
    assert centres and set(centres) == {"alert"}    # every shown context is centred on the token
    tips = browser.evaluate("Array.from(document.querySelectorAll('.c')).map(e => e.title)")
    assert all(t.startswith("activation ") and "alert" in t for t in tips)
    index_page = browser.open(index.as_uri())
    assert index_page["dialogs"] == [] and browser.evaluate("document.scripts.length") == 1


def test_planted_feature_is_named_single_token(run, browser):
    cfg, token, index = run
    browser.open(index.as_uri())
    row = browser.evaluate(f"""Array.from(document.querySelectorAll('#features tbody tr'))
        .filter(r => r.cells[0].textContent === '{PLANTED}')
        .map(r => Array.from(r.cells).map(c => c.textContent))[0]""")
    assert row[3] == "yes" and row[4] == "alert" and row[5] == "100%", row
    singles = browser.evaluate("""Array.from(document.querySelectorAll('#features tbody tr'))
        .filter(r => r.cells[3].textContent === 'yes').map(r => r.cells[0].textContent)""")
    assert singles == [str(PLANTED)]
    # exact fire count: the number of times the token occurs in the analysed val tokens
    n = int((val_tokens(cfg) == token).sum())
    assert n >= 10
    text = browser.open((index.parent / "f" / f"{PLANTED:05d}.html").as_uri())["text"]
    assert f"fires\t{n} of " in text and "single-token\tyes" in text


def test_index_sorts_by_column(run, browser):
    cfg, token, index = run
    browser.open(index.as_uri())
    col = lambda i: browser.evaluate(  # noqa: E731
        f"Array.from(document.querySelectorAll('#features tbody tr')).map(r => r.cells[{i}].dataset.v)")
    for i, name in ((1, "log10 density"), (2, "max act"), (3, "single-token")):
        browser.evaluate(f"document.querySelectorAll('#features th')[{i}].click()")
        desc = [float(v) for v in col(i)]
        assert desc == sorted(desc, reverse=True), name
        browser.evaluate(f"document.querySelectorAll('#features th')[{i}].click()")
        asc = [float(v) for v in col(i)]
        assert asc == sorted(asc), name
    browser.evaluate("document.querySelectorAll('#features th')[3].click()")  # single-token first
    assert col(0)[0] == str(PLANTED)


def test_dead_ultralow_density_png_and_tensorboard(run, browser):
    cfg, token, index = run
    dead = browser.open((index.parent / "dead.html").as_uri())["text"]
    assert f"{N_DEAD} features" in dead
    assert ", ".join(str(j) for j in range(N_FEATURES - N_DEAD, N_FEATURES)) in dead
    assert (index.parent / "ultralow.html").is_file()
    png = (index.parent / "density.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (640, 360)
    texts = read_texts(cfg.sae_dir / "tb" / "sae")
    table = texts["features/top/text_summary"][-1][1]
    assert "| feature |" in table and "`alert`" in table


def test_position_0_is_left_out_of_every_statistic(run):
    """At position 0 the LM sees only that token: analyze.skip_positions = 1 (default) keeps it out of
    the counts, the top contexts and the interval samples."""
    cfg, token, index = run
    import torch

    res = torch.load(index.parent / "analysis.pt", weights_only=True)
    T, skip = cfg.data.ctx_len, cfg.analyze.skip_positions
    assert skip == 1 and int(res["n_tokens"]) == len(val_tokens(cfg))
    for name in ("top_index", "iv_index"):
        idx = res[name][res[name] >= 0]
        assert len(idx) > 0 and (idx % T >= skip).all(), name


def test_rerun_reuses_the_statistics(run, capsys):
    cfg, token, index = run
    before = (index.parent / "f" / f"{PLANTED:05d}.html").read_text()
    capsys.readouterr()
    analyze(cfg)
    assert "reusing the statistics" in capsys.readouterr().out
    assert (index.parent / "f" / f"{PLANTED:05d}.html").read_text() == before
    cfg.analyze.tokens = 1000  # another pass setting: collected again, on fewer tokens
    try:
        analyze(cfg)
        assert "reusing" not in capsys.readouterr().out
        T = cfg.data.ctx_len
        counted = math.ceil(1000 / T) * (T - cfg.analyze.skip_positions)
        assert f"of {counted:,} tokens" in (index.parent / "f" / f"{PLANTED:05d}.html").read_text()
    finally:
        cfg.analyze.tokens = 1000000

