"""`dvc plots show` offline. The project's HTML template (`.dvc/config` `plots.html_template`, the
generated plots/vendor/template.html) inlines the vendored Vega, Vega-Lite and vega-embed, so the page
draws its charts and shows its PNG image plots in a browser that is refused every non-file request
(Debian's chromium driven by playwright, as in test_playground.py). DVC's own page, which loads the
three from a CDN, is the control: offline it draws nothing."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from configobj import ConfigObj

from conftest import BIN, REPO, run_cmd

CHROMIUM = os.environ.get("LMFORGE_CHROMIUM", "/usr/bin/chromium")
TEMPLATE = REPO / "plots" / "vendor" / "template.html"
CHART, IMAGE = (
    "#plots_train_train_csv",
    "#plots_train_loss_png",
)  # DVC's div ids: the paths, `_` for `/` and `.`
PNG_SIZE = (240, 160)

needs_chromium = pytest.mark.skipif(
    not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM),
    reason=f"no chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run installs it) or set LMFORGE_CHROMIUM",
)

DVC_YAML = """\
stages:
  train:
    cmd: python -c "pass"
    plots:
      - plots/train/train.csv:
          x: step
          y: train_loss
          cache: false
      - plots/train/loss.png:
          cache: false
"""

# Pixels of the chart's canvas: `ink` is anything not blank, `colored` the saturated ones (axes, grid
# and text are grey, so these are the data line and its legend symbol).
INK = """sel => {
  const c = document.querySelector(sel + ' canvas');
  if (!c || !c.width) return {ink: 0, colored: 0};
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let ink = 0, colored = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] < 128 || (d[i] > 245 && d[i + 1] > 245 && d[i + 2] > 245)) continue;
    ink++;
    if (Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 60) colored++;
  }
  return {ink, colored};
}"""


def test_the_project_template_is_the_generated_one_and_the_dvc_default():
    """template.html is what make_template.py writes from the vendored files, and `.dvc/config`
    points a plain `dvc plots show` at it (DVC resolves the path against `.dvc/`)."""
    out = subprocess.run(
        [sys.executable, "plots/vendor/make_template.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    page = TEMPLATE.read_text(encoding="utf-8")
    assert "{plot_divs}" in page and "{scripts}" not in page  # `{scripts}` is where DVC puts its CDN tags
    assert "cdn.jsdelivr" not in page and '<script src="http' not in page
    setting = ConfigObj(str(REPO / ".dvc" / "config"))["plots"]["html_template"]
    assert (REPO / ".dvc" / setting).resolve() == TEMPLATE


def make_project(root: Path, with_config: bool) -> Path:
    """A DVC project (no git) with one CSV plot and one PNG image plot; `with_config` copies the
    project's `.dvc/config` and its template to the same relative place, as a checkout has them."""
    from PIL import Image, ImageDraw

    root.mkdir()
    run_cmd([BIN / "dvc", "init", "--no-scm", "-q"], cwd=root)
    if with_config:
        shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
        (root / "plots" / "vendor").mkdir(parents=True)
        shutil.copy(TEMPLATE, root / "plots" / "vendor" / "template.html")
    (root / "dvc.yaml").write_text(DVC_YAML)
    folder = root / "plots" / "train"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "train_loss"])
        writer.writerows([step, round(4 * math.exp(-step / 30) + 0.5, 4)] for step in range(0, 100, 5))
    image = Image.new("RGB", PNG_SIZE, "white")
    ImageDraw.Draw(image).line([(10, 10), (230, 150)], fill="red", width=3)
    image.save(folder / "loss.png")
    return root


def plots_show(root: Path, *args: str) -> Path:
    """Run `dvc plots show *args` in `root`; the page it wrote (the file:// URI it prints)."""
    out = run_cmd(
        [BIN / "dvc", "plots", "show", *args], cwd=root, env={**os.environ, "DVC_NO_ANALYTICS": "1"}
    )
    uri = out.stdout.strip().splitlines()[-1]
    assert uri.startswith("file://") and uri.endswith("/index.html"), out.stdout
    return Path(uri.removeprefix("file://"))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def offline(browser):
    """`open(page_path)`: the page in a fresh context where every non-file request is aborted; gives
    the page, the refused URLs and the console errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    refused: list[str] = []
    errors: list[str] = []

    def route(r):
        if r.request.url.startswith("file:"):
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort("internetdisconnected")

    context.route("**/*", route)

    def open_page(path: Path):
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        return page, refused, errors

    yield open_page
    context.close()


def assert_renders_offline(page, refused, errors):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    # The chart: vega-embed drew a canvas with axes, text and the data line (it polls: drawing is async).
    try:
        page.wait_for_function(f"({INK})('{CHART}').colored > 300", timeout=10_000)
    except PlaywrightTimeout:
        raise AssertionError(f"no chart drawn; console errors {errors}, refused {refused}") from None
    ink = page.evaluate(INK, CHART)
    assert ink["ink"] > 2000, ink
    assert page.locator(f"{CHART}.vega-embed").count() == 1
    # The image plot: DVC copied the PNG next to the page and links it relatively, so it loads from file://.
    img = page.locator(f"{IMAGE} img")
    assert img.count() == 1
    assert img.get_attribute("src").startswith("static/")
    img_size = img.evaluate("i => i.complete ? [i.naturalWidth, i.naturalHeight] : null")
    assert img_size == list(PNG_SIZE)
    assert refused == [], f"the page asked the network for {refused}"
    assert errors == []


@pytest.mark.slow
@needs_chromium
def test_plain_dvc_plots_show_renders_offline(tmp_path, offline):
    root = make_project(tmp_path / "proj", with_config=True)
    index = plots_show(root)
    assert index == (root / "dvc_plots" / "index.html").resolve()
    assert_renders_offline(*offline(index))


@pytest.mark.slow
@needs_chromium
def test_html_template_option_and_another_out_dir_render_offline(tmp_path, offline):
    root = make_project(tmp_path / "proj", with_config=False)
    index = plots_show(root, "--html-template", str(TEMPLATE), "-o", "elsewhere/plots")
    assert index == (root / "elsewhere" / "plots" / "index.html").resolve()
    assert_renders_offline(*offline(index))


@pytest.mark.slow
@needs_chromium
def test_dvc_default_page_draws_nothing_offline(tmp_path, offline):
    """The control: without the template the page asks a CDN for Vega, is refused and draws no chart
    (so the checks above do see the network being cut)."""
    root = make_project(tmp_path / "proj", with_config=False)
    page, refused, errors = offline(plots_show(root))
    assert any("cdn.jsdelivr.net/npm/vega" in url for url in refused)
    assert any("vegaEmbed is not defined" in e for e in errors)
    assert page.locator(f"{CHART} canvas, {CHART} svg").count() == 0
