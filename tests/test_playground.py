"""The playground page in a real browser (Debian's chromium driven by playwright) against a real
`bentoml serve` of a tiny registered model. LMFORGE_SCREENSHOT=<path> also saves a screenshot."""

from __future__ import annotations

import math
import os
import re
import shutil

import httpx
import pytest

from test_service import registry, running_server  # noqa: F401  (module fixture)

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("LMFORGE_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def page_server(registry):  # noqa: F811
    with running_server(registry, "serve-page") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.fail(f"no chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, page_server):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(page_server + "/")
    pg.wait_for_selector("#chips .chip")
    yield pg, errors
    context.close()


def test_page_shows_tokens_like_the_api(page, page_server):
    pg, errors = page
    assert "version" in pg.inner_text("#model-line")
    ids = [int(x) for x in pg.eval_on_selector_all("#chips .chip", "els => els.map(e => e.dataset.id)")]
    want = httpx.post(
        page_server + "/tokenize",
        json={"messages": [{"role": "user", "content": "Tell me a story about a fox."}]},
    ).json()["ids"]
    assert ids == want
    assert f"{len(want)} / 64 tokens" in pg.inner_text("#count")
    raw = httpx.post(page_server + "/tokenize", json={"text": "Once upon a time", "add_bos": True}).json()[
        "ids"
    ]
    pg.select_option("#mode", "text")
    pg.fill("#prompt", "Once upon a time")
    pg.wait_for_function(f"document.querySelector('#count').textContent.startsWith('{len(raw)} /')")
    assert [
        int(x) for x in pg.eval_on_selector_all("#chips .chip", "els => els.map(e => e.dataset.id)")
    ] == raw
    pg.fill("#prompt", "the fox and the cat " * 40)
    pg.wait_for_function("document.querySelector('#count').classList.contains('over')")
    assert "context window" in pg.inner_text("#count")
    assert errors == [] or all("400" in e for e in errors)  # the over-long prompt's 400 is the only one


def test_generation_colors_tokens_and_shows_the_api_alternatives(page, page_server):
    pg, errors = page
    pg.fill("#g-seed", "7")
    pg.fill("#g-max", "8")
    pg.click("#generate")
    pg.wait_for_selector("#gen-out .chip")
    pg.wait_for_function("document.querySelectorAll('#gen-out .chip').length >= 1")
    first = pg.query_selector("#gen-out .chip")
    assert first.evaluate("e => e.style.background").startswith("rgb")
    first.hover()
    pg.wait_for_selector("#tip:not([hidden])")
    shown = [
        float(x.rstrip("%")) / 100
        for x in pg.eval_on_selector_all("#tip td:nth-child(3)", "t => t.map(e => e.textContent)")
    ]
    api = httpx.post(
        page_server + "/generate",
        json={
            "messages": [{"role": "user", "content": "Tell me a story about a fox."}],
            "temperature": 0.8,
            "top_p": 0.95,
            "max_new_tokens": 8,
            "seed": 7,
            "logprobs": True,
            "top_logprobs": 5,
        },
    ).json()["choices"][0]["logprobs"][0]
    assert [
        int(x) for x in pg.eval_on_selector_all("#tip td:nth-child(2)", "t => t.map(e => e.textContent)")
    ] == [a["token_id"] for a in api["top_logprobs"]]
    assert shown == pytest.approx([math.exp(a["logprob"]) for a in api["top_logprobs"]], abs=6e-5)
    # once the reply is done, each step shows the entropy of the model's whole distribution
    pg.wait_for_function("(document.querySelector('#gen-out .chip').title || '').includes('entropy')")
    pg.hover("h1")  # leave the token, then come back: the tooltip is drawn again
    first.hover()
    text = pg.inner_text("#tip")
    prompt = httpx.post(
        page_server + "/tokenize",
        json={"messages": [{"role": "user", "content": "Tell me a story about a fox."}]},
    ).json()["ids"]
    row = httpx.post(page_server + "/v1/introspect", json={"ids": prompt, "top_k": 1}).json()["next"][-1]
    assert f"{row['entropy']:.3f} nats" in text
    assert errors == []


def test_registry_card_shows_each_figure_with_its_interval(page, registry):  # noqa: F811
    """The card, opened as a person opens it, shows a figure and its 95% interval as one row; the
    registered version's description (its model card) is in the registry."""
    pg, errors = page
    pg.click("#card summary")
    row = pg.locator("#card-body tr", has_text="eval.tuned.end_of_turn_rate")
    row.first.wait_for()
    assert row.count() == 1  # the interval's bounds are not rows of their own
    assert row.first.inner_text().split("\t")[-1].strip() == "0.8750 [0.7700, 0.9400]"
    assert errors == []


def test_temperature_slider_redraws_softmax_over_t(page):
    pg, errors = page
    pg.wait_for_selector("#lab-chart .bar")

    def bars():
        return pg.eval_on_selector_all(
            "#lab-chart .bar",
            "gs => gs.map(g => [Number(g.dataset.id), Number(g.querySelector('.p-raw').dataset.p),"
            " Number(g.querySelector('.p-temperature').dataset.p)])",
        )

    pg.eval_on_selector("#lab-temp", "e => { e.value = '0.5'; e.dispatchEvent(new Event('input')); }")
    pg.wait_for_function("document.querySelector('#lab-temp-out').textContent === '0.50'")
    pg.wait_for_timeout(300)
    pg.wait_for_function(
        "(() => { const g = document.querySelector('#lab-chart .bar'); const r = Number(g.querySelector('.p-raw').dataset.p);"
        " const t = Number(g.querySelector('.p-temperature').dataset.p); return Math.abs(r - t) > 1e-6; })()"
    )
    rows = [r for r in bars() if r[1] > 1e-6]
    (_, p0, t0) = rows[0]
    for _, p, t in rows[1:]:  # softmax(logits / 0.5): every probability ratio squared
        assert t / t0 == pytest.approx((p / p0) ** 2, rel=1e-3)
    assert errors == []


def test_heatmap_and_logit_lens(page, page_server):
    pg, errors = page
    pg.select_option("#layer", "1")
    pg.select_option("#head", "1")
    pg.wait_for_function("document.querySelector('#heatmap').dataset.layer === '1'")
    n = int(pg.eval_on_selector("#heatmap", "c => c.dataset.size"))
    assert n == len(pg.query_selector_all("#chips .chip"))
    painted = pg.eval_on_selector(
        "#heatmap",
        "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let k = 0; for (let i = 0; i < d.length; i += 4) if (d[i] !== 255) k++; return k; }",
    )
    assert painted > 0
    last = pg.eval_on_selector_all("#lens tr:last-child td", "t => t.map(e => Number(e.dataset.id))")
    api = httpx.post(
        page_server + "/v1/introspect",
        json={"messages": [{"role": "user", "content": "Tell me a story about a fox."}]},
    ).json()
    assert last == [row["top"][0]["id"] for row in api["next"]]
    if path := os.environ.get("LMFORGE_SCREENSHOT"):
        pg.screenshot(path=path, full_page=True)
    assert errors == []


def test_compare_side_by_side(page, registry):  # noqa: F811
    pg, errors = page
    pg.fill("#other", str(registry["version"]))
    pg.click("#compare")
    pg.wait_for_selector("#other-out .chip")
    served = pg.eval_on_selector_all("#served-out .chip", "els => els.map(e => e.dataset.id)")
    other = pg.eval_on_selector_all("#other-out .chip", "els => els.map(e => e.dataset.id)")
    assert served == other and served
    assert pg.inner_text("#other-h") == f"version {registry['version']}"
    assert errors == []


def test_controls_have_labels_and_tokens_take_the_keyboard(page):
    pg, errors = page
    unlabeled = pg.evaluate(
        "[...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => !e.labels || e.labels.length === 0).map(e => e.id)"
    )
    assert unlabeled == []
    pg.wait_for_selector("#lab-chart .bar")
    before = len(pg.query_selector_all("#chips .chip"))
    pg.focus("#lab-chart .bar")
    pg.keyboard.press("Enter")  # picks the most likely token and appends it
    pg.wait_for_function(f"document.querySelectorAll('#chips .chip').length === {before + 1}")
    assert errors == []


def test_phone_width_layout(browser, page_server):
    context = browser.new_context(viewport={"width": 390, "height": 844})
    pg = context.new_page()
    pg.goto(page_server + "/")
    pg.wait_for_selector("#chips .chip")
    width = pg.evaluate("document.documentElement.scrollWidth")
    assert width <= 400  # one column, nothing wider than the screen
    context.close()


def test_the_page_asks_for_the_key_and_data_needs_it(browser, registry):  # noqa: F811
    with running_server(registry, "serve-key", LMFORGE_API_KEY="s3cret") as url:
        assert httpx.post(url + "/v1/introspect", json={"text": "hi"}).status_code == 401
        assert httpx.get(url + "/v1/model_card").status_code == 401
        assert httpx.get(url + "/").status_code == 200  # the page itself carries no data
        context = browser.new_context()
        pg = context.new_page()
        requests: list[str] = []
        pg.on("request", lambda r: requests.append(r.url))
        pg.goto(url + "/")
        pg.wait_for_selector("#key-form:not([hidden])")
        pg.fill("#api-key", "s3cret")
        pg.click("#key-form button")
        pg.wait_for_selector("#chips .chip")
        assert "version" in pg.inner_text("#model-line")
        assert not any("s3cret" in u for u in requests)  # never in a URL
        context.close()


def test_structured_output_mode_and_the_grammar_in_the_lab(page):
    """A regex typed into the page constrains the streamed reply; ticked, the lab crosses out what
    the grammar removes and its step draws an allowed token."""
    pg, errors = page
    pg.select_option("#s-kind", "regex")
    pg.fill("#s-spec", "[0-9]{3}")
    pg.fill("#g-seed", "3")
    pg.fill("#g-temp", "1")
    pg.click("#s-generate")
    pg.wait_for_function("document.querySelector('#s-check').textContent.startsWith('finished')")
    assert re.fullmatch(r"[0-9]{3}", pg.inner_text("#s-out")), pg.inner_text("#s-out")
    assert pg.inner_text("#s-check") == "finished: stop"
    pg.check("#s-lab")
    pg.wait_for_function("document.querySelector('#lab-msg').textContent.includes('grammar allows')")
    pg.wait_for_selector("#lab-chart .bar")
    bars = pg.eval_on_selector_all(
        "#lab-chart .bar", "gs => gs.map(g => Array.from(g.querySelectorAll('text')).map(t => t.textContent))"
    )
    digits = re.compile(r'^"[0-9]+"$')
    removed = [label for label, note in bars if note == "removed by grammar"]
    kept = [label for label, note in bars if not note.startswith("removed")]
    assert removed and not any(digits.match(label) for label in removed), bars
    assert kept and all(digits.match(label) for label in kept), bars
    before = len(pg.query_selector_all("#chips .chip"))
    pg.click("#lab-step")
    pg.wait_for_function(f"document.querySelectorAll('#chips .chip').length === {before + 1}")
    last = pg.eval_on_selector_all("#chips .chip .tok", "els => els[els.length - 1].textContent")
    assert re.fullmatch(r"[0-9]+", last), last
    assert errors == []
