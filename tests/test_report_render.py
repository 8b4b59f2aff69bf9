"""The report as a browser draws it: render synthetic records covering every section, screenshot the page
with headless Chromium, and check the picture is a real page (skipped when Chromium is not installed).

The screenshot is kept in pytest's tmp directory (``--basetemp`` to choose where) for a human to look at.
"""

import shutil
import subprocess

import pytest

from harness.report import demo, render_report

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)
SECTION_IDS = ("perplexity", "ruler", "efficiency", "training", "comparison", "paper", "failures", "environment")

pytestmark = [
    pytest.mark.slow,  # ~15 s on 2 CPU cores: rendering every plot, then a browser start
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed"),
]


def screenshot(html_path, out_png, profile_dir, width=1200, height=4000, timeout=120):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile_dir}", f"--screenshot={out_png}", f"--window-size={width},{height}",
           html_path.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_report_renders_in_a_browser(tmp_path):
    import matplotlib.image as mpimg
    import numpy as np

    records = demo.records(runs=2)
    kinds = {(r.metric, r.status) for r in records}
    assert {("pretrain", "ok"), ("train", "ok"), ("perplexity", "oom"), ("ruler", "ok"),
            ("efficiency", "oom")} <= kinds
    path = render_report(records, tmp_path / "report", title="Render check", notes=["synthetic records"])
    html = path.read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in html, sid
    assert "uninformative (base at chance)" in html and "Essay haystack replaced by book text" in html
    assert "eval: finetune attention" in html and "not comparable: different model and scale" in html

    png = tmp_path / "shot.png"
    proc = screenshot(path, png, tmp_path / "profile")
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]
    assert png.stat().st_size > 50_000
    img = mpimg.imread(png)
    assert img.shape[:2] == (4000, 1200)
    rgb = img[..., :3]
    assert float(rgb.std()) > 0.05  # not a blank page
    assert len(np.unique((rgb.reshape(-1, 3) * 255).astype(np.uint8), axis=0)) > 50  # text, plots, colours
    # something is drawn in the lower part of the page too (heatmaps, tables), not only a header
    assert float(rgb[2000:].std()) > 0.05
