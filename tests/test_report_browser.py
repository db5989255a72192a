"""The HTML report in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium).

A synthetic run folder of 2,000 errors, with class names and file names that hold HTML
and script, is turned into a report and opened from disk (file://). The test checks
that every image on the page has loaded, that a class filter and sorts give the right
images in the right order, that no script from the data ran and the names show as text,
and that nothing is fetched from the network. It measures the time to load and to filter,
and saves screenshots in test-artifacts/: report.png (the whole page as it opens),
report-gallery.png and report-detail.png.
"""

import os
import time
from pathlib import Path

import pytest
from playwright import sync_api  # the test extra installs it: a missing package fails the suite

from flipback.report import write_report

from test_report import EVIL_IMG, EVIL_SCRIPT, make_synthetic_run

CHROMIUM = os.environ.get("FLIPBACK_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
N_ERRORS = 2000
LOAD_LIMIT_S = 5.0
FILTER_LIMIT_S = 1.0
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

# pip does not install the browser: without it these tests are skipped, and say why.
if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)",
                allow_module_level=True)

ALL_IMAGES_LOADED = """() => {
  const imgs = Array.from(document.images);
  return imgs.length > 0 && imgs.every(i => i.complete);
}"""
BROKEN_IMAGES = """() => Array.from(document.images)
  .filter(i => i.getClientRects().length > 0 && !(i.complete && i.naturalWidth > 0))
  .map(i => i.getAttribute('src'))"""
SHOWN = "() => Array.from(document.querySelectorAll('#grid .card')).map(c => Number(c.dataset.idx))"


def _sort_key(rec, key):
    if key == "l2":
        return rec["l2"] if rec["success"] else None
    return rec["queries"]


def _expected_order(records, key, desc):
    have = [r for r in records if _sort_key(r, key) is not None]
    none = [r for r in records if _sort_key(r, key) is None]
    sign = -1 if desc else 1
    have.sort(key=lambda r: (sign * _sort_key(r, key), r["index"]))
    none.sort(key=lambda r: r["index"])
    return [r["index"] for r in have + none]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = tmp_path_factory.mktemp("browser") / "run"
    records = make_synthetic_run(run, N_ERRORS, n_figures=30)
    t0 = time.perf_counter()
    index = write_report(run)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_report(run)
    rebuild = time.perf_counter() - t0
    print(f"\nreport of {N_ERRORS} errors written in {build:.2f} s ({rebuild:.2f} s with cached tiles)")
    return index, records


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def test_report_in_chromium(report, browser):
    index, records = report
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    dialogs, errors, requests = [], [], []

    def on_dialog(d):
        dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("request", lambda r: requests.append(r.url))

    # ---- load: from navigation until the gallery is drawn and every image has loaded
    t0 = time.perf_counter()
    page.goto(index.as_uri())
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_function(ALL_IMAGES_LOADED)
    load_s = time.perf_counter() - t0
    timings = page.evaluate("window.flipbackTimings")
    assert page.evaluate(BROKEN_IMAGES) == []
    n_imgs = page.evaluate("document.images.length")
    assert page.evaluate("Array.from(document.images).every(i => i.naturalWidth > 0)")
    shown = page.evaluate(SHOWN)
    assert shown == [r["index"] for r in records[:60]]
    assert page.text_content("#count") == f"{N_ERRORS} errors"
    # the top three regions of each image are outlined over its last panel
    assert page.evaluate("document.querySelectorAll('#grid .card .box').length") == \
        sum(min(3, len(r["regions"])) for r in records[:60])
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)

    # ---- filter by a true class whose name is a script tag
    evil = 1
    assert page.evaluate("JSON.parse(document.getElementById('flipback-data').textContent).classes[1]") == EVIL_SCRIPT
    want = [r for r in records if r["true"] == evil]
    t0 = time.perf_counter()
    page.select_option("#f-true", str(evil))
    page.wait_for_function("n => document.getElementById('grid').dataset.count === String(n)", arg=len(want))
    filter_s = time.perf_counter() - t0
    filter_ms_in_page = page.evaluate("window.flipbackTimings.lastRenderMs")
    assert page.text_content("#count") == f"{len(want)} of {N_ERRORS} errors"
    assert page.evaluate(SHOWN) == [r["index"] for r in want[:60]]
    true_names = page.eval_on_selector_all("#grid .card .l2 .cls:first-child", "els => els.map(e => e.textContent)")
    assert true_names and set(true_names) == {EVIL_SCRIPT}  # the tag shows as text

    # ---- sort by size of change, largest first; failures (no L2) go last
    t0 = time.perf_counter()
    page.select_option("#f-sort", "l2:desc")
    page.wait_for_function("() => window.flipbackTimings.renders >= 3")
    sort_s = time.perf_counter() - t0
    order = _expected_order(want, "l2", desc=True)
    assert page.evaluate(SHOWN) == order[:60]
    page.click("#next")
    assert page.evaluate(SHOWN) == order[60:120]

    # ---- then by queries, fewest first, within true class x predicted class 3 (a broken <img> tag)
    page.select_option("#f-pred", "3")
    page.select_option("#f-sort", "q:asc")
    want2 = [r for r in want if r["pred_before"] == 3]
    assert page.evaluate(SHOWN) == _expected_order(want2, "queries", desc=False)[:60]
    pred_names = page.eval_on_selector_all("#grid .card .l2 .cls:nth-child(2)", "els => els.map(e => e.textContent)")
    assert pred_names and set(pred_names) == {EVIL_IMG}
    page.wait_for_function(ALL_IMAGES_LOADED)
    assert page.evaluate(BROKEN_IMAGES) == []

    # ---- the malicious strings are text everywhere: options, confusion matrix, header, names
    options = page.eval_on_selector_all("#f-true option", "els => els.map(e => e.textContent)")
    assert any(o.startswith(EVIL_SCRIPT + " (") for o in options)
    assert any(o.startswith(EVIL_IMG + " (") for o in options)
    assert EVIL_SCRIPT in page.inner_text("#confusion")
    assert EVIL_IMG in page.inner_text("header.top")
    assert page.evaluate("document.querySelectorAll('script').length") == 2
    assert page.evaluate("document.querySelectorAll('img[src=\"x\"], img[onerror]').length") == 0

    # ---- the detail view of an image whose name holds a script tag, with its figure
    page.click("#f-clear")
    page.fill("#f-name", EVIL_SCRIPT)
    named = [r for r in records if EVIL_SCRIPT in r["name"]]
    page.wait_for_function("n => document.getElementById('grid').dataset.count === String(n)", arg=len(named))
    first = named[0]
    page.click(f"#grid .card[data-idx='{first['index']}']")
    page.wait_for_selector("#detail[open]")
    assert page.text_content("#d-title") == f"#{first['index']} · {first['name']}"
    if first["regions"]:
        region_rows = page.locator("#d-body table").nth(2).locator("tbody tr")
        assert region_rows.count() == len(first["regions"])
    hrefs = page.eval_on_selector_all("#d-body .links a", "els => els.map(a => a.getAttribute('href'))")
    assert first["figure"] in hrefs and first["corrected_image"] in hrefs
    page.wait_for_function(ALL_IMAGES_LOADED)
    assert page.evaluate(BROKEN_IMAGES) == []
    assert page.url.endswith(f"#img-{first['index']}")
    page.screenshot(path=str(ARTIFACTS / "report-detail.png"))
    page.keyboard.press("ArrowRight")
    assert page.text_content("#d-title") == f"#{named[1]['index']} · {named[1]['name']}"
    page.keyboard.press("Escape")
    page.wait_for_selector("#detail", state="hidden")

    # ---- a figure whose file name needs URL encoding loads
    odd = next(r for r in records if r["figure"] and "odd" in r["figure"])
    page.evaluate("i => { location.hash = 'img-' + i; }", odd["index"])
    page.wait_for_selector("#detail[open]")
    page.wait_for_function(ALL_IMAGES_LOADED)
    assert page.evaluate("document.querySelector('#d-body img.fig').naturalWidth") > 0
    # A link to another image followed while the detail closes: the dialog's close event comes
    # a task later and must not reset the new image's hash, which opens it.
    page.evaluate("i => { document.getElementById('detail').close(); location.hash = 'img-' + i; }", first["index"])
    page.wait_for_function("t => document.getElementById('d-title').textContent === t",
                           arg=f"#{first['index']} · {first['name']}")
    assert page.evaluate("document.getElementById('detail').open") and page.url.endswith(f"#img-{first['index']}")
    page.keyboard.press("Escape")

    # ---- the gallery, for the record
    page.click("#f-clear")
    page.select_option("#f-sort", "l2:asc")
    page.eval_on_selector("#gallery", "e => e.scrollIntoView()")
    page.wait_for_function(ALL_IMAGES_LOADED)
    page.screenshot(path=str(ARTIFACTS / "report-gallery.png"))

    print(f"\nbrowser: load {load_s * 1000:.0f} ms to the last of {n_imgs} images "
          f"(script: parse {timings['parseMs']:.0f} ms, first render {timings['firstRenderMs']:.0f} ms); "
          f"class filter {filter_s * 1000:.0f} ms ({filter_ms_in_page:.1f} ms in page); sort {sort_s * 1000:.0f} ms")
    assert dialogs == [], f"a dialog fired: {dialogs}"
    assert errors == [], errors  # no script errors, no CSP violations
    assert all(u.startswith("file://") for u in requests), [u for u in requests if not u.startswith("file://")]
    assert load_s < LOAD_LIMIT_S, f"load took {load_s:.2f} s"
    assert filter_s < FILTER_LIMIT_S, f"filter took {filter_s:.2f} s"
    page.close()


def test_report_without_javascript_data_is_inert(tmp_path, browser):
    """An empty run: no script at all, the page still opens and says so."""
    run = tmp_path / "empty"
    run.mkdir()
    (run / "summary.json").write_text('{"model": "%s", "n_misclassified": 0}' % EVIL_SCRIPT.replace('"', '\\"'))
    index = write_report(run)
    page = browser.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(index.as_uri())
    assert "No misclassified images" in page.inner_text("#gallery")
    assert EVIL_SCRIPT in page.inner_text("header.top")
    assert dialogs == []
    page.close()
