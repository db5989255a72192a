from flipback.report import safe_relative_src, write_index

EVIL_SCRIPT = "<script>alert(1)</script>"
EVIL_IMG = '"><img src=x onerror=alert(1)>'


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


def test_escapes_user_strings(tmp_path):
    records = [
        _record(0, name=EVIL_SCRIPT, true_name=EVIL_IMG, pred_before_name=EVIL_SCRIPT,
                pred_after_name=EVIL_IMG, error=EVIL_SCRIPT),
        _record(1, name=EVIL_IMG, true_name=EVIL_SCRIPT, figure="javascript:alert(1)"),
    ]
    summary = {"model": EVIL_SCRIPT, EVIL_IMG: 1, "pixels": "uint8", "extra": {"k": EVIL_IMG}}
    out = write_index(tmp_path, summary, records)
    assert out == tmp_path / "index.html"
    html = out.read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    assert "<img src=x" not in html
    assert "javascript:" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_lists_all_records_and_summary(tmp_path):
    records = [_record(i) for i in range(7)]
    records[3].update(success=False, figure=None, error="budget exhausted", l2=None, linf=float("nan"))
    summary = {"pixels": "uint8", "success_rate": 0.857142857, "mean_queries": 1.5, "n_misclassified": 7}
    html = write_index(tmp_path / "run", summary, records).read_text(encoding="utf-8")
    for key in summary:
        assert key in html
    assert "0.857143" in html
    for i in range(7):
        assert f"img_{i}.png" in html
        assert f'id="r{i}"' in html
    for i in (0, 1, 2, 4, 5, 6):
        assert f'<img src="figures/{i:05d}.png" loading="lazy"' in html
    assert "figures/00003.png" not in html
    assert "budget exhausted" in html
    assert html.count('<tr id="r') == 7
    assert "0.0312" in html and "(2.0/255)" in html
    assert "http://" not in html and "https://" not in html  # no external assets


def test_unsafe_figure_paths_dropped(tmp_path):
    bad = ["/etc/passwd.png", "../x.png", "figs/../../x.png", "javascript:alert(1)",
           "data:image/png;base64,AAAA", "C:\\x.png", "\\\\host\\x.png", "//evil.example/x.png",
           " figs/a.png", "", None, 3]
    for b in bad:
        assert safe_relative_src(b) is None, b
    assert safe_relative_src("figures/0001.png") == "figures/0001.png"
    assert safe_relative_src('figs/a b#"x.png') == "figs/a%20b%23%22x.png"
    records = [_record(i, figure=b) for i, b in enumerate(bad[:8])]
    html = write_index(tmp_path, {}, records).read_text(encoding="utf-8")
    assert "<img" not in html
    assert html.count("no figure") == len(records)


def test_empty_run(tmp_path):
    html = write_index(tmp_path, {}, []).read_text(encoding="utf-8")
    assert "No misclassified images" in html
