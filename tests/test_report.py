import base64
import hashlib
import html as html_lib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flipback.errors import RunError
from flipback.report import json_for_html, safe_relative_src, write_index, write_report
from flipback.report.plots import frontier, success_curve, write_plots
from flipback.report.tiles import strip_arrays, tile_geometry
from flipback.store import ImageRecord, RunStore

EVIL_SCRIPT = "<script>alert(1)</script>"
EVIL_IMG = '"><img src=x onerror=alert(1)>'
CLASSES = ["cat", EVIL_SCRIPT, "dog", EVIL_IMG, "ship & <b>boat</b>", "plane"]


def _record(i, **kw):
    rec = {
        "index": i,
        "name": f"img_{i}.png",
        "true_name": "cat",
        "pred_before_name": "dog",
        "pred_after_name": "cat",
        "success": True,
        "queries": 2,
        "l2": 0.0312,
        "linf": 2 / 255,
        "figure": f"figures/{i:05d}.png",
        "error": None,
    }
    rec.update(kw)
    return rec


def page_data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="flipback-data">(.*?)</script>', html, re.S)
    assert m, "no data block"
    return json.loads(m.group(1))


def make_synthetic_run(run_dir: Path, n: int, *, classes=CLASSES, shape=(32, 32, 3), seed=0,
                       n_figures=20, budget=20) -> list[dict]:
    """A run folder like `flipback explain` writes, with random images and results."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    k = len(classes)
    # smooth blobs plus a little noise: small PNGs, and tiles that look like pictures
    h, w, c = shape
    coarse = rng.integers(0, 256, size=(n, h // 8 + 1, w // 8 + 1, c)).astype(np.int16)
    smooth = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :h, :w]
    originals = np.clip(smooth + rng.integers(-12, 13, size=(n,) + shape), 0, 255).astype(np.uint8)
    delta = rng.integers(-3, 4, size=(n,) + shape) * (rng.random((n,) + shape[:2] + (1,)) < 0.2)
    corrected = np.clip(originals.astype(int) + delta, 0, 255).astype(np.uint8)
    true = rng.integers(0, k, size=n)
    pred = (true + rng.integers(1, k, size=n)) % k
    (run_dir / "figures").mkdir(exist_ok=True)
    (run_dir / "corrected").mkdir(exist_ok=True)
    records = []
    for j in range(n):
        idx = 3 * j + 1
        ok = bool(rng.random() < 0.9)
        t, p = int(true[j]), int(pred[j])
        h, w = shape[:2]
        regions = []
        share_left = 0.95
        for r in range(int(rng.integers(0, 4))):
            y0, x0 = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
            share = share_left * float(rng.uniform(0.5, 0.9))
            share_left -= share
            regions.append({"id": r + 1, "bbox": [y0, x0, y0 + 4, x0 + 4], "area": 16, "share": share,
                            "centroid": [y0 + 1.5, x0 + 1.5]})
        sb = rng.dirichlet(np.ones(k))
        sa = rng.dirichlet(np.ones(k))
        figure = img = None
        if j < n_figures:
            figure = f"figures/{idx:06d}.png"
            img = f"corrected/{idx:06d}.png"
            Image.fromarray(originals[j].squeeze()).save(run_dir / figure)
            Image.fromarray(corrected[j].squeeze()).save(run_dir / img)
        if j == n_figures:  # a file name with characters that need URL encoding
            figure = 'figures/odd "name" #1 <b>.png'
            Image.fromarray(originals[j].squeeze()).save(run_dir / figure)
        name = f"test/{idx:06d}.png"
        if j % 7 == 0:
            name = f"{EVIL_SCRIPT}_{idx}.png"
        elif j % 7 == 1:
            name = f"{EVIL_IMG}_{idx}.png"
        d = (corrected[j].astype(float) - originals[j].astype(float)) / 255
        records.append({
            "index": idx, "name": name, "true": t, "pred_before": p, "pred_after": t if ok else p,
            "true_name": classes[t], "pred_before_name": classes[p], "pred_after_name": classes[t if ok else p],
            "success": ok, "queries": int(rng.integers(1, budget + 1)) if ok else budget,
            "l2": float(np.sqrt((d ** 2).sum())) * float(rng.uniform(0.2, 3.0)),
            "linf": float(np.abs(d).max()), "l0": float((d != 0).sum()),
            "frac_changed": float((np.abs(d).max(axis=-1) > 1 / 255 + 1e-6).mean()),
            "regions": regions, "scores_before": [round(float(v), 6) for v in sb],
            "scores_after": [round(float(v), 6) for v in sa], "figure": figure, "corrected_image": img,
            "error": None if j % 97 else f"RuntimeError: {EVIL_SCRIPT}",
        })
    store = RunStore(run_dir / "results.sqlite")
    for s in range(0, n, 500):
        store.add([ImageRecord.from_dict(r) for r in records[s:s + 500]], corrected[s:s + 500], originals[s:s + 500],
                  0.5)
    store.close()
    ok = [r for r in records if r["success"]]
    summary = {
        "mode": "white-box", "method": "minimal", "model": f"cnn:{EVIL_IMG}.th", "data": f"/data/{EVIL_SCRIPT}",
        "split": "test", "pixels": "uint8", "budget": budget, "n_images": 10 * n, "n_skipped": 0,
        "skipped_by_reason": {}, "accuracy": 0.9, "n_misclassified": n, "n_explained": n,
        "n_corrected": len(ok), "success_rate": len(ok) / n,
        "mean_queries": float(np.mean([r["queries"] for r in records])),
        "mean_queries_success": float(np.mean([r["queries"] for r in ok])),
        "median_queries": float(np.median([r["queries"] for r in records])),
        "median_l2": float(np.median([r["l2"] for r in ok])), "mean_l2": float(np.mean([r["l2"] for r in ok])),
        "median_linf": float(np.median([r["linf"] for r in ok])), "mean_linf": 0.01, "median_l0": 100.0,
        "mean_frac_changed": 0.1, "n_failed_with_error": 1, "seconds": 3.0, "images_per_second": n / 3.0,
        "classes": list(classes), "confusion": np.eye(len(classes), dtype=int).tolist(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return records


# ------------------------------------------------------------------ escaping and safety

def test_escapes_user_strings(tmp_path):
    records = [
        _record(0, name=EVIL_SCRIPT, true_name=EVIL_IMG, pred_before_name=EVIL_SCRIPT,
                pred_after_name=EVIL_IMG, error=EVIL_SCRIPT),
        _record(1, name=EVIL_IMG, true_name=EVIL_SCRIPT, figure="javascript:alert(1)"),
    ]
    summary = {"model": EVIL_SCRIPT, EVIL_IMG: 1, "pixels": "uint8", "extra": {"k": EVIL_IMG},
               "classes": CLASSES}
    out = write_index(tmp_path, summary, records)
    assert out == tmp_path / "index.html"
    html = out.read_text(encoding="utf-8")
    # Exactly the page's own two script elements: the JSON data block and the inline script.
    assert html.lower().count("<script") == 2
    assert html.count('<script type="application/json" id="flipback-data">') == 1
    assert EVIL_SCRIPT not in html
    assert "<img src=x" not in html
    assert "javascript:" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # escaped by Jinja (summary, confusion)
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in html  # escaped inside the JSON
    data = page_data(html)
    assert data["records"][0]["n"] == EVIL_SCRIPT  # round-trips exactly
    assert data["records"][1]["n"] == EVIL_IMG
    assert data["records"][0]["err"] == EVIL_SCRIPT
    assert EVIL_SCRIPT in data["classes"] and EVIL_IMG in data["classes"]
    assert data["records"][1]["fig"] is None  # javascript: URL dropped


def test_csp_allows_only_the_inline_script_by_hash(tmp_path):
    html = write_index(tmp_path, {"classes": CLASSES}, [_record(0)]).read_text(encoding="utf-8")
    csp = html_lib.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1))
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
    assert "default-src 'none'" in csp
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp
    style = re.search(r"<style>(.*?)</style>", html, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in csp
    assert " style=" not in html  # inline style attributes would be blocked by the CSP
    assert "innerHTML" not in scripts[0] and "insertAdjacentHTML" not in scripts[0]
    assert "document.write" not in scripts[0] and "eval(" not in scripts[0]


def test_json_for_html_escapes_markup():
    s = json_for_html({"a": "</script><!-- & \u2028"})
    assert "<" not in s and ">" not in s and "&" not in s and "\u2028" not in s
    assert json.loads(s) == {"a": "</script><!-- & \u2028"}


def test_lists_all_records_and_summary(tmp_path):
    records = [_record(i) for i in range(7)]
    records[3].update(success=False, figure=None, error="budget exhausted", l2=None, linf=float("nan"))
    summary = {"pixels": "uint8", "success_rate": 0.857142857, "mean_queries": 1.5, "n_misclassified": 7}
    html = write_index(tmp_path / "run", summary, records).read_text(encoding="utf-8")
    for key in summary:
        assert key in html
    assert "0.857143" in html
    assert "85.7%" in html  # the headline card
    assert "surrogate" not in html.split('id="all-values"')[0]  # white-box: no surrogate card
    html = write_index(tmp_path / "bb", {**summary, "mode": "black-box", "surrogate_queries": 7000,
                                         "surrogate_agreement": 0.93, "n_explained": 7}, records).read_text(encoding="utf-8")
    assert "surrogate training" in html and "1000 per explained error" in html and "93.0%" in html
    data = page_data(html)
    assert [r["i"] for r in data["records"]] == list(range(7))
    for i in (0, 1, 2, 4, 5, 6):
        assert data["records"][i]["fig"] == f"figures/{i:05d}.png"
    assert data["records"][3]["fig"] is None
    assert data["records"][3]["err"] == "budget exhausted"
    assert data["records"][3]["l2"] is None and data["records"][3]["li"] is None
    assert data["records"][0]["l2"] == 0.0312 and data["records"][0]["q"] == 2
    assert data["classes"] == ["cat", "dog"]  # names without ids get ids in order of appearance
    assert {r["t"] for r in data["records"]} == {0} and {r["p"] for r in data["records"]} == {1}
    assert "http://" not in html and "https://" not in html  # no external assets


def test_unsafe_figure_paths_dropped(tmp_path):
    bad = ["/etc/passwd.png", "../x.png", "figs/../../x.png", "javascript:alert(1)",
           "data:image/png;base64,AAAA", "C:\\x.png", "\\\\host\\x.png", "//evil.example/x.png",
           " figs/a.png", "", None, 3]
    for b in bad:
        assert safe_relative_src(b) is None, b
    assert safe_relative_src("figures/0001.png") == "figures/0001.png"
    assert safe_relative_src('figs/a b#"x.png') == "figs/a%20b%23%22x.png"
    records = [_record(i, figure=b, corrected_image=b) for i, b in enumerate(bad[:8])]
    html = write_index(tmp_path, {}, records).read_text(encoding="utf-8")
    data = page_data(html)
    assert all(r["fig"] is None and r["img"] is None for r in data["records"])
    for b in bad[:8]:
        assert f'"{b}"' not in html


def test_empty_run(tmp_path):
    html = write_index(tmp_path, {}, []).read_text(encoding="utf-8")
    assert "No misclassified images" in html
    assert "<script" not in html  # nothing to filter: no script at all


# ------------------------------------------------------------------ a whole run folder

def _local_refs(run_dir: Path, html: str) -> set[str]:
    refs = set(re.findall(r'(?:src|href)="([^"#][^"]*)"', html))
    data = page_data(html)
    for r in data["records"]:
        refs.update(v for v in (r["tile"], r["fig"], r["img"]) if v)
    return refs


def test_write_report_run_folder(tmp_path):
    from urllib.parse import unquote

    run = tmp_path / "run"
    records = make_synthetic_run(run, 40, n_figures=5)
    out = write_report(run)
    html = out.read_text(encoding="utf-8")
    data = page_data(html)
    assert len(data["records"]) == 40
    assert data["classes"] == CLASSES
    tiles = sorted((run / "report" / "tiles").glob("*.png"))
    assert len(tiles) == 40
    geo = tile_geometry(32, 32)
    assert geo["scale"] == 3 and geo["gap"] == 1
    assert Image.open(tiles[0]).size == (4 * 32 + 3, 32) == (data["geo"]["width"], data["geo"]["height"])
    assert all("geo" not in r for r in data["records"])  # one size: the run's geometry
    for name in ("l2.png", "queries.png", "budget.png"):
        assert (run / "report" / "plots" / name).stat().st_size > 1000
    for ref in _local_refs(run, html):
        assert "://" not in ref
        assert (run / unquote(ref)).is_file(), ref
    odd = next(r for r in data["records"] if r["fig"] and "odd" in r["fig"])
    assert odd["fig"] == "figures/odd%20%22name%22%20%231%20%3Cb%3E.png"
    # the detail data: ranked regions and top scores with the true class
    rec = next(r for r in records if len(r["regions"]) >= 2)
    d = next(r for r in data["records"] if r["i"] == rec["index"])
    assert [g[0] for g in d["reg"]] == pytest.approx([g["share"] for g in rec["regions"]], rel=1e-3)
    assert d["reg"][0][2:6] == rec["regions"][0]["bbox"]
    assert rec["true"] in [s[0] for s in d["sc"]]
    assert len(d["sc"]) <= 11
    # the confusion matrix holds every explained error
    assert f">{len(records)}</td></tr>" in html.replace("\n", "")
    # a second build reuses the tiles
    mtimes = {p.name: p.stat().st_mtime_ns for p in tiles}
    write_report(run)
    assert {p.name: p.stat().st_mtime_ns for p in sorted((run / "report" / "tiles").glob("*.png"))} == mtimes


def test_write_index_takes_classes_from_summary_json(tmp_path):
    run = tmp_path / "run"
    records = make_synthetic_run(run, 12, n_figures=0)
    summary = {k: v for k, v in json.loads((run / "summary.json").read_text()).items()
               if k not in ("classes", "confusion")}
    html = write_index(run, summary, records).read_text(encoding="utf-8")
    assert page_data(html)["classes"] == CLASSES


def test_write_report_bench_folder(tmp_path):
    bench = tmp_path / "bench"
    methods = {}
    for m, seed in (("paper", 1), ("fast", 2)):
        make_synthetic_run(bench / m, 15, seed=seed, n_figures=0)
        s = json.loads((bench / m / "summary.json").read_text())
        s["method"] = m
        methods[m] = {k: v for k, v in s.items() if k not in ("classes", "confusion")}
    published = {"success_rate": 0.9967, "mean_queries": 1.96}
    (bench / "summary.json").write_text(json.dumps({**methods["paper"], "methods": methods, "published": published}))
    html = write_report(bench).read_text(encoding="utf-8")
    assert 'href="paper/index.html"' in html and 'href="fast/index.html"' in html
    assert "published (paper)" in html and "99.67%" in html
    assert (bench / "paper" / "index.html").is_file() and (bench / "fast" / "index.html").is_file()
    sub = (bench / "fast" / "index.html").read_text(encoding="utf-8")
    assert "published (paper)" in sub and len(page_data(sub)["records"]) == 15
    assert (bench / "report" / "plots" / "budget.png").is_file()
    assert "flipback-data" not in html  # the galleries are on the methods' pages


def test_write_report_without_summary(tmp_path):
    with pytest.raises(RunError):
        write_report(tmp_path)


# ------------------------------------------------------------------ tiles and plots

def test_strip_panels():
    orig = np.zeros((28, 28, 1), np.uint8)
    corr = orig.copy()
    corr[10:12, 5:9] = 4
    arr = strip_arrays(orig, corr)
    assert arr.shape == (28, 4 * 28 + 3, 3)  # stored at the image's own resolution
    p = 28 + 1
    assert (arr[:, :28] == 0).all()  # original
    assert (arr[10, p + 5] == 4).all() and (arr[9, p + 5] == 0).all()  # corrected
    amp = arr[:, 2 * p: 2 * p + 28, 0]
    assert amp[0, 0] == 128 and amp[10, 5] == 255  # grey = no change, largest change = white
    over = arr[:, 3 * p: 3 * p + 28]
    assert over[10, 5].sum() > 3 * 200 and over[0, 0].sum() == 0  # bright where it changed
    assert (arr[:, 28] == 255).all()  # white gap
    float_corr = corr.astype(np.float32) / 255
    assert (strip_arrays(orig, float_corr) == strip_arrays(orig, corr)).all()
    big = strip_arrays(np.zeros((224, 200, 3), np.uint8), np.zeros((224, 200, 3), np.uint8))
    g = tile_geometry(224, 200)
    assert big.shape == (96, g["width"], 3) and g["scale"] == 1 and g["pw"] == 86
    assert tile_geometry(28, 28)["scale"] == 3 and tile_geometry(64, 64)["scale"] == 1


def test_success_curve():
    recs = [{"queries": 1, "success": True}, {"queries": 3, "success": True},
            {"queries": 3, "success": False}, {"queries": None, "success": True}]
    b, rate = success_curve(recs)
    assert list(b) == [0, 1, 2, 3]
    assert list(rate) == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3])


def test_frontier_reads_each_images_answer_after_q_queries(tmp_path):
    recs = [{"trace": [[1, 0.9], [3, 0.5], [4, 0.2]]},  # transfer, then shrunk twice
            {"trace": [[1, None], [2, 0.8]]},  # corrected at its second query
            {"trace": []},  # never corrected
            {"trace": None, "queries": 5, "success": True}]  # an older run: no trace, left out
    q, rate, median = frontier(recs)
    assert list(q) == [0, 1, 2, 3, 4]
    assert list(rate) == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert np.isnan(median[0])
    assert list(median[1:]) == pytest.approx([0.9, 0.85, 0.65, 0.5])
    files = write_plots(tmp_path, {"run": recs})
    assert files["frontier"] == "frontier.png" and (tmp_path / "frontier.png").stat().st_size > 1000
    # Without any trace there is no frontier to draw.
    assert "frontier" not in write_plots(tmp_path / "old", {"run": [{"queries": 2, "success": True}]})
