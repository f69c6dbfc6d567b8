"""Screenshots of the feature browser (index + one feature page) with headless Chromium.

    python benchmarks/screenshots.py runs/quickstart/report      # feature: the first single-token one
    python benchmarks/screenshots.py runs/quickstart/report --feature 42 --out /tmp/shots

Writes <out>/index.png and <out>/feature-<id>.png (default out: <report>/screenshots). Needs Debian's
`chromium` (apt-get update && apt-get install -y chromium).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def screenshot(url: str, png: Path, width: int = 1280, height: int = 1400) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found: apt-get update && apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="monosem-shot-") as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={png}", url], check=True, capture_output=True, timeout=120)
    print(f"{png}  ({url})")


def pick_feature(report: Path) -> int:
    """The first feature flagged single-token in the index, else the first listed."""
    index = (report / "index.html").read_text()
    rows = re.findall(r"<tr><td data-v='(\d+)'>.*?</tr>", index)
    singles = re.findall(r"<tr><td data-v='(\d+)'>(?:(?!</tr>).)*?<td data-v='1'>yes</td>", index)
    if not rows:
        sys.exit(f"{report / 'index.html'} lists no alive feature")
    return int((singles or rows)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="report folder written by `monosem analyze`")
    ap.add_argument("--feature", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    report = args.report.resolve()
    out = (args.out or report / "screenshots").resolve()
    out.mkdir(parents=True, exist_ok=True)
    j = args.feature if args.feature is not None else pick_feature(report)
    screenshot((report / "index.html").as_uri(), out / "index.png")
    screenshot((report / "f" / f"{j:05d}.html").as_uri(), out / f"feature-{j}.png")


if __name__ == "__main__":
    main()
