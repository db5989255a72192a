"""The HTML report of a run: ``RUN_DIR/index.html`` plus its assets in ``RUN_DIR/report/``.

The page opens from disk with no server and loads nothing from the network:

- a summary (model, data, mode, method; success rate, queries, size of the change), side
  by side with the published method's figures when the run folder has them;
- plots (matplotlib PNGs in ``report/plots/``) and the confusion matrix of the errors;
- the mean change per frequent confusion pair (``report/pairs/``);
- a gallery of every error, one tile strip each (``report/tiles/``, drawn with Pillow and
  cached), filtered, sorted and paged in the browser from a JSON data block, with a detail
  view per image.

Safety: every user-provided string (class names, file names, model and data paths, error
messages) is escaped by Jinja2 autoescaping in the HTML, and reaches the browser script
only inside a ``<script type="application/json">`` block in which ``<``, ``>`` and ``&``
are written as ``\\u003c``, ``\\u003e`` and ``\\u0026``; the script puts strings into the
page with ``textContent`` only. File paths are emitted only when they are plain relative
paths inside the run folder (:func:`safe_relative_src`). A Content-Security-Policy allows
only the page's own inline script and style (by hash) and images from the run folder.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined

from .tiles import tile_geometry

INDEX_NAME = "index.html"
ASSETS = "report"  # folder next to index.html holding tiles/, plots/, pairs/
_TEMPLATE = "index.html.j2"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MATRIX_MAX_CLASSES = 30  # above this, the confusion is shown as a list of the top pairs
TOP_PAIRS = 30
PAIR_MAPS = 12  # how many confusion pairs get a mean-change map
PAIR_MIN_ERRORS = 3
MAX_REGIONS = 8
TOP_SCORES = 5

_env: Environment | None = None


def _environment() -> Environment:
    global _env
    if _env is None:
        _env = Environment(
            loader=PackageLoader("flipback.report", "templates"),
            autoescape=True,  # every template here is HTML
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
    return _env


def _asset(name: str) -> str:
    return (resources.files("flipback.report") / "templates" / name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def json_for_html(obj) -> str:
    """JSON that is safe inside ``<script type="application/json">``: no ``<``, ``>`` or ``&``
    (so no ``</script>`` or ``<!--``), and no U+2028/U+2029."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def safe_relative_src(path) -> str | None:
    """Return a URL-encoded relative path for ``src``/``href``, or None if unsafe.

    Rejected: empty, absolute (``/x``, ``\\x``, ``C:...``), anything with a scheme or a
    colon (``javascript:``, ``data:``, ``file:``), any ``..``, backslashes, control
    characters, or a leading ``//``/whitespace. The result is percent-encoded so that
    characters like ``#``, ``?``, spaces and quotes cannot change its meaning.
    """
    if path is None:
        return None
    s = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(s, str):
        return None
    if not s or s != s.strip() or _CONTROL.search(s):
        return None
    if s.startswith(("/", "\\")) or "\\" in s or ":" in s or ".." in s:
        return None
    return quote(s, safe="/")


# ---------------------------------------------------------------- formatting helpers

def _float(v) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _int(v) -> int | None:
    f = _float(v)
    return int(f) if f is not None and f == int(f) else None


def _round(v, digits: int = 5) -> float | None:
    f = _float(v)
    if f is None:
        return None
    return float(f"{f:.{digits}g}")


def _fmt_summary_value(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, ensure_ascii=False, default=str)
    return str(v)


def _fmt(v, fmt: str, dash: str = "–") -> str:
    f = _float(v)
    return dash if f is None else fmt.format(f)


def _pct(v, digits: int = 1) -> str:
    return _fmt(v, "{:.%d%%}" % digits)


def _levels(v) -> str:
    f = _float(v)
    return "–" if f is None else f"{f * 255:.1f}/255"


def _text(v) -> str:
    return "–" if v is None or v == "" else str(v)


# ---------------------------------------------------------------- data for the page

class _Classes:
    """Class ids and names: from summary['classes'] when known, else from the records."""

    def __init__(self, names=None):
        self.names = [str(n) for n in names] if isinstance(names, (list, tuple)) else []
        self.placeholder: set[int] = set()
        self.by_name = {n: i for i, n in enumerate(self.names)}

    def id(self, num, name) -> int:
        k = _int(num)
        if k is not None and 0 <= k < 1_000_000:
            while len(self.names) <= k:
                self.placeholder.add(len(self.names))
                self.names.append(str(len(self.names)))
            if k in self.placeholder and name is not None:
                self.names[k] = str(name)
                self.by_name.setdefault(str(name), k)
                self.placeholder.discard(k)
            return k
        if name is None:
            return -1
        name = str(name)
        if name not in self.by_name:
            self.by_name[name] = len(self.names)
            self.names.append(name)
        return self.by_name[name]


def _scores(rec: dict, t: int) -> list:
    sb, sa = rec.get("scores_before"), rec.get("scores_after")
    sb = sb if isinstance(sb, list) else []
    sa = sa if isinstance(sa, list) else []
    n = max(len(sb), len(sa))
    if n < 2:
        return []

    def val(arr, i):
        return _float(arr[i]) if i < len(arr) else None

    def top(arr):
        vals = [(v, i) for i, v in ((i, val(arr, i)) for i in range(len(arr))) if v is not None]
        return [i for _, i in sorted(vals, key=lambda x: -x[0])[:TOP_SCORES]]

    keep = set(top(sb)) | set(top(sa))
    if 0 <= t < n:
        keep.add(t)
    rows = [[i, _round(val(sb, i), 4), _round(val(sa, i), 4)] for i in keep]
    rows.sort(key=lambda r: -(r[1] if r[1] is not None else (r[2] or 0.0)))
    return rows


def _regions(rec: dict) -> list:
    out = []
    for r in (rec.get("regions") or [])[:MAX_REGIONS]:
        if not isinstance(r, dict):
            continue
        bbox = r.get("bbox") if isinstance(r.get("bbox"), (list, tuple)) else []
        cen = r.get("centroid") if isinstance(r.get("centroid"), (list, tuple)) else []
        b = [_int(v) for v in bbox[:4]] + [None] * (4 - len(bbox[:4]))
        c = [_round(v, 4) for v in cen[:2]] + [None] * (2 - len(cen[:2]))
        out.append([_round(r.get("share"), 4), _int(r.get("area")), *b, *c])
    return out


def _compact(pos: int, rec: dict, classes: _Classes, tiles: dict[int, tuple[str, list[int]]],
             shape: list[int] | None) -> dict:
    idx = _int(rec.get("index"))
    t = classes.id(rec.get("true"), rec.get("true_name"))
    p = classes.id(rec.get("pred_before"), rec.get("pred_before_name"))
    a = classes.id(rec.get("pred_after"), rec.get("pred_after_name"))
    ok = bool(rec.get("success"))
    tile = tiles.get(idx) if idx is not None else None
    err = rec.get("error")
    out = {
        "i": idx if idx is not None else -(pos + 1),
        "n": _text(rec.get("name")),
        "t": t, "p": p, "a": a, "ok": ok,
        "q": _int(rec.get("queries")),
        "l2": _round(rec.get("l2")), "li": _round(rec.get("linf")),
        "l0": _int(rec.get("l0")), "fc": _round(rec.get("frac_changed"), 4),
        "reg": _regions(rec),
        "sc": _scores(rec, t),
        "tile": f"{ASSETS}/tiles/{quote(tile[0])}" if tile else None,
        "fig": safe_relative_src(rec.get("figure")),
        "img": safe_relative_src(rec.get("corrected_image")),
        "err": None if err in (None, "") else str(err),
    }
    if rec.get("change") in ("remove", "free"):  # region methods: which change corrected it
        out["ch"] = rec["change"]
    if tile and list(tile[1]) != shape:  # another size than the run's first image
        out["geo"] = tile_geometry(*tile[1])
    return out


def _confusion(compact: list[dict], names: list[str], n_misclassified) -> dict | None:
    counts: dict[tuple[int, int], int] = {}
    for r in compact:
        if r["t"] >= 0 and r["p"] >= 0:
            counts[(r["t"], r["p"])] = counts.get((r["t"], r["p"]), 0) + 1
    if not counts:
        return None
    total = sum(counts.values())
    note = (f"Rows: the true class; columns: the model's answer. Counts of the {total} explained errors"
            + (f" (the model made {n_misclassified} errors in all)" if _int(n_misclassified) not in (None, total) else "")
            + ". Click a cell to see its errors in the gallery.")
    k = len(names)
    if k <= MATRIX_MAX_CLASSES:
        mx = max(counts.values())
        rows = []
        col_totals = [0] * k
        for t in range(k):
            cells, rt = [], 0
            for p in range(k):
                n = counts.get((t, p), 0)
                rt += n
                col_totals[p] += n
                cells.append({"p": p, "name": names[p], "n": n, "diag": t == p and n == 0,
                              "heat": f"h{max(1, min(5, math.ceil(5 * n / mx)))}" if n else ""})
            rows.append({"t": t, "name": names[t], "cells": cells, "total": rt})
        return {"matrix": True, "names": names, "rows": rows, "col_totals": col_totals, "total": total,
                "note": note}
    pairs = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_PAIRS]
    return {"matrix": False, "note": note + f" The {len(pairs)} most frequent pairs of {len(counts)}.",
            "pairs": [{"t": t, "p": p, "tname": names[t], "pname": names[p], "n": n} for (t, p), n in pairs]}


def _meta(summary: dict) -> list[tuple[str, str]]:
    out = []
    for key, label in (("model", "model"), ("data", "data"), ("split", "split"), ("mode", "mode"),
                       ("method", "method"), ("pixels", "pixels"), ("budget", "budget")):
        v = summary.get(key)
        if v not in (None, ""):
            out.append((label, _fmt_summary_value(v)))
    return out


def _cards(s: dict) -> list[dict]:
    cards = []
    ne, nc = _int(s.get("n_explained")), _int(s.get("n_corrected"))
    cards.append({"label": "errors corrected", "value": _pct(s.get("success_rate")),
                  "sub": f"{_text(nc)} of {_text(ne)} explained errors" if ne is not None else "success rate"})
    cards.append({"label": "queries per image", "value": _fmt(s.get("mean_queries"), "{:.3g}"),
                  "sub": f"mean over all; {_fmt(s.get('mean_queries_success'), '{:.3g}')} over corrected; "
                         f"median {_fmt(s.get('median_queries'), '{:.3g}')}"})
    cards.append({"label": "size of change (L2)", "value": _fmt(s.get("median_l2"), "{:.4f}"),
                  "sub": f"median over corrected; mean {_fmt(s.get('mean_l2'), '{:.4f}')}"})
    cards.append({"label": "largest pixel change", "value": _levels(s.get("median_linf")),
                  "sub": f"median Linf {_fmt(s.get('median_linf'), '{:.4f}')}"})
    if s.get("mean_frac_changed") is not None or s.get("median_l0") is not None:
        cards.append({"label": "pixels changed", "value": _pct(s.get("mean_frac_changed")),
                      "sub": f"mean share changed by > 1/255; median L0 {_fmt(s.get('median_l0'), '{:.0f}')}"})
    if s.get("n_misclassified") is not None:
        cards.append({"label": "model errors", "value": _text(_int(s.get("n_misclassified"))),
                      "sub": f"accuracy {_pct(s.get('accuracy'), 2)} on {_text(_int(s.get('n_images')))} images"})
    if s.get("surrogate_queries") is not None:
        sq, ne_ = _float(s.get("surrogate_queries")), _int(s.get("n_explained"))
        per = _fmt(sq / ne_, "{:.4g}") if sq is not None and ne_ else "–"
        cards.append({"label": "surrogate training", "value": _fmt(sq, "{:.0f}"),
                      "sub": f"target queries ({per} per explained error); agrees with the target on "
                             f"{_pct(s.get('surrogate_agreement'))}"})
    if s.get("seconds") is not None:
        cards.append({"label": "attack time", "value": _fmt(s.get("seconds"), "{:.1f} s"),
                      "sub": f"{_fmt(s.get('images_per_second'), '{:.1f}')} images per second"})
    return cards


_COMPARE_ROWS = [
    ("success_rate", "errors corrected", lambda v: _pct(v, 2), +1),
    ("mean_queries", "mean queries (all errors)", lambda v: _fmt(v, "{:.3f}"), -1),
    ("mean_queries_success", "mean queries (corrected)", lambda v: _fmt(v, "{:.3f}"), -1),
    ("median_queries", "median queries", lambda v: _fmt(v, "{:.3g}"), -1),
    ("median_l2", "median L2 of the change", lambda v: _fmt(v, "{:.4f}"), -1),
    ("median_linf", "median Linf of the change", _levels, -1),
    ("mean_frac_changed", "pixels changed (mean)", lambda v: _pct(v, 1), -1),
    ("surrogate_queries", "surrogate training queries", lambda v: _fmt(v, "{:.0f}"), -1),
    ("seconds", "attack time (s)", lambda v: _fmt(v, "{:.1f}"), -1),
]


def _comparison(columns: list[tuple[dict, dict]], published: dict | None, title: str, note: str):
    """columns: (header {name, href}, summary) each. Adds a 'published' column."""
    pub = published if isinstance(published, dict) else None
    heads = [c[0] for c in columns] + ([{"name": "published (paper)", "href": None}] if pub else [])
    rows = []
    for key, label, fmt, better in _COMPARE_ROWS:
        vals = [c[1].get(key) for c in columns]
        if all(_float(v) is None for v in vals) and not (pub and _float(pub.get(key)) is not None):
            continue
        pv = _float(pub.get(key)) if pub else None
        cells = []
        for v in vals:
            f, cls = _float(v), None
            if f is not None and pv is not None and f != pv:
                cls = "better" if (f - pv) * better > 0 else "worse"
            cells.append({"text": fmt(v), "cls": cls})
        if pub:
            cells.append({"text": fmt(pv) if pv is not None else "not reported", "cls": None})
        rows.append({"label": label, "cells": cells})
    return {"title": title, "note": note, "columns": heads, "rows": rows}


def _summary_rows(summary: dict) -> list[tuple[str, str]]:
    return [(str(k), _fmt_summary_value(v)) for k, v in (summary or {}).items()
            if k not in ("confusion", "confusion_pairs")]


def _lead(s: dict) -> str:
    parts = []
    ne, nm, ni = _int(s.get("n_explained")), _int(s.get("n_misclassified")), _int(s.get("n_images"))
    if ne is not None and nm is not None:
        parts.append(f"{ne} of the model's {nm} errors explained" + (f", on {ni} images" if ni is not None else "") + ".")
    if s.get("pixels") == "uint8":
        parts.append("A correction counts only as an 8-bit image that the model verified.")
    elif s.get("pixels") == "float":
        parts.append("Corrections are counted in float pixels (not rounded to 8 bits).")
    ns = _int(s.get("n_skipped"))
    if ns:
        parts.append(f"{ns} images were skipped as unreadable.")
    return " ".join(parts) or "Summary of the run."


# ---------------------------------------------------------------- rendering

def _render(**ctx) -> str:
    css, js = _asset("report.css"), _asset("report.js")
    for bad in ("</script", "</style", "<!--"):
        assert bad not in js.lower() and bad not in css.lower()
    csp = ("default-src 'none'; "
           f"script-src {_csp_hash(js)}; style-src {_csp_hash(css)}; "
           "img-src 'self' file:; base-uri 'none'; form-action 'none'")
    ctx.setdefault("plots", [])
    ctx.setdefault("confusion", None)
    ctx.setdefault("pairs", [])
    ctx.setdefault("comparison", None)
    ctx.setdefault("method_links", [])
    ctx.setdefault("cards", [])
    ctx.setdefault("gallery", False)
    ctx.setdefault("data_json", "{}")
    return _environment().get_template(_TEMPLATE).render(csp=csp, css=css, js=js, **ctx)


def render_index(summary: dict, records: list[dict], *, title: str = "flipback run",
                 tiles: dict[int, tuple[str, list[int]]] | None = None, plots: list[dict] | None = None,
                 pairs_maps: dict | None = None) -> str:
    """Render the report page of one run to a string (no files are read or written).

    ``tiles``: {image index: (file name in report/tiles/, [image height, width])};
    ``plots``: [{src, caption}]; ``pairs_maps``: {(true, pred): (file name in report/pairs/,
    tile geometry)}.
    """
    summary = dict(summary or {})
    classes = _Classes(summary.get("classes"))
    tiles = tiles or {}
    shape = list(next(iter(tiles.values()))[1]) if tiles else None
    compact = [_compact(k, r, classes, tiles, shape) for k, r in enumerate(records or []) if isinstance(r, dict)]
    names = classes.names
    counts: dict[tuple[int, int], int] = {}
    for r in compact:
        counts[(r["t"], r["p"])] = counts.get((r["t"], r["p"]), 0) + 1
    pairs = []
    for (t, p), (name, geo) in (pairs_maps or {}).items():
        if 0 <= t < len(names) and 0 <= p < len(names):
            pairs.append({"t": t, "p": p, "tname": names[t], "pname": names[p], "n": counts.get((t, p), 0),
                          "src": f"{ASSETS}/pairs/{quote(name)}",
                          "width": geo["width"] * geo["scale"], "height": geo["height"] * geo["scale"]})
    recurring = summary.get("recurring_causes") if isinstance(summary.get("recurring_causes"), dict) else {}
    consistency = {(_int(d.get("true")), _int(d.get("pred"))): d.get("consistency")
                   for d in recurring.get("pairs") or [] if isinstance(d, dict)}
    for pr in pairs:
        c = consistency.get((pr["t"], pr["p"]))
        pr["consistency"] = f"{c:.2f}" if isinstance(c, (int, float)) and c == c else None
    reference = recurring.get("reference")
    reference = f"{reference:.2f}" if isinstance(reference, (int, float)) and reference == reference else None
    pairs.sort(key=lambda d: -d["n"])
    data = {"classes": names, "records": compact, "geo": tile_geometry(*shape) if shape else None}
    published = summary.get("published") if isinstance(summary.get("published"), dict) else None
    comparison = None
    if published:
        comparison = _comparison([({"name": "this run", "href": None}, summary)], published,
                                 "This run and the published method",
                                 "Green: better than the published figure; red: worse.")
    return _render(
        title=title,
        heading=title.removeprefix("flipback run: "),
        meta=_meta(summary),
        lead=_lead(summary),
        cards=_cards(summary) if summary else [],
        comparison=comparison,
        plots=plots or [],
        confusion=_confusion(compact, names, summary.get("n_misclassified")),
        pairs=pairs,
        pairs_reference=reference,
        gallery=bool(compact),
        data_json=json_for_html(data),
        summary_rows=_summary_rows(summary),
    )


# ---------------------------------------------------------------- files

def _write_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _open_store(run_dir: Path):
    db = run_dir / "results.sqlite"
    if not db.is_file():
        return None
    from ..store import RunStore

    try:
        return RunStore(db)
    except Exception:  # a damaged store must not stop the report
        return None


def _loader(store):
    def load(idx: int):
        try:
            return store.images(int(idx))
        except Exception:
            return None
    return load


def _plots(assets: Path, series: dict[str, list[dict]], published, budget) -> list[dict]:
    from .plots import write_plots

    files = write_plots(assets / "plots", series, published=published, budget=budget)
    captions = {"l2": "Size of the change: L2 norm over the corrected images",
                "queries": "Queries spent per image",
                "budget": "Success rate against the query budget",
                "frontier": "The frontier: success and median L2 of the change had each image stopped "
                            "after that many queries"}
    return [{"src": f"{ASSETS}/plots/{files[k]}", "caption": captions[k]}
            for k in ("l2", "queries", "budget", "frontier") if k in files]


def _write_run(run_dir: Path, summary: dict, records: list[dict]) -> Path:
    from .tiles import write_pair_maps, write_tiles

    run_dir.mkdir(parents=True, exist_ok=True)
    records = [r for r in (records or []) if isinstance(r, dict)]
    assets = run_dir / ASSETS
    tiles: dict[int, tuple[str, list[int]]] = {}
    pair_maps: dict = {}
    store = _open_store(run_dir) if records else None
    try:
        if store is not None:
            load = _loader(store)
            tiles = write_tiles(assets / "tiles", records, load)
            groups: dict[tuple[int, int], list[int]] = {}
            for r in records:
                t, p, i = _int(r.get("true")), _int(r.get("pred_before")), _int(r.get("index"))
                if None not in (t, p, i):
                    groups.setdefault((t, p), []).append(i)
            top = sorted(((k, v) for k, v in groups.items() if len(v) >= PAIR_MIN_ERRORS),
                         key=lambda kv: (-len(kv[1]), kv[0]))[:PAIR_MAPS]
            if top:
                pair_maps = write_pair_maps(assets / "pairs", dict(top), load)
    finally:
        if store is not None:
            store.close()
    plots = _plots(assets, {str(summary.get("method") or "run"): records}, summary.get("published"),
                   summary.get("budget")) if records else []
    html = render_index(summary, records, title=f"flipback run: {run_dir.resolve().name}",
                        tiles=tiles, plots=plots, pairs_maps=pair_maps)
    out = run_dir / INDEX_NAME
    _write_atomic(out, html)
    return out


def write_index(run_dir, summary: dict, records: list[dict]) -> Path:
    """Write the report of one run, ``run_dir/index.html`` and ``run_dir/report/``, from the
    given summary and records; images for the tiles come from ``run_dir/results.sqlite``.
    Keys missing from ``summary`` (such as ``classes``) are taken from ``run_dir/summary.json``."""
    run_dir = Path(run_dir)
    summary = dict(summary or {})
    on_disk = _read_summary(run_dir)
    for key in ("classes", "published"):
        if key not in summary and key in on_disk:
            summary[key] = on_disk[key]
    return _write_run(run_dir, summary, records)


def _read_summary(run_dir: Path) -> dict:
    try:
        s = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        return s if isinstance(s, dict) else {}
    except (OSError, ValueError):
        return {}


def _read_records(run_dir: Path) -> list[dict]:
    store = _open_store(run_dir)
    if store is None:
        return []
    try:
        return [r.to_dict() for r in store.records()]  # the pages read plain, untrusted dicts
    finally:
        store.close()


def write_report(run_dir) -> Path:
    """Write the report of a run folder from what it stores (``summary.json``, ``results.sqlite``,
    ``figures/``, ``corrected/``) and return the path of its ``index.html``. A benchmark folder
    (``summary.json`` with ``methods``) gets a comparison page, and each method's folder its
    own full report."""
    from ..errors import RunError

    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        raise RunError(f"{run_dir} holds no summary.json", hint="point at a folder written by flipback explain")
    summary = _read_summary(run_dir)
    if isinstance(summary.get("methods"), dict):
        return _write_bench(run_dir, summary)
    return _write_run(run_dir, summary, _read_records(run_dir))


def _write_bench(run_dir: Path, summary: dict) -> Path:
    methods = summary.get("methods") or {}
    published = summary.get("published") if isinstance(summary.get("published"), dict) else None
    columns, series, links = [], {}, []
    for name, msum in methods.items():
        name = str(name)
        msum = msum if isinstance(msum, dict) else {}
        sub = run_dir / name
        href = None
        safe = safe_relative_src(name) == name and "/" not in name and name not in (".", "")
        if safe and (sub / "summary.json").is_file():
            sub_summary = _read_summary(sub)
            if isinstance(sub_summary.get("methods"), dict):
                continue  # not a method's run folder
            series[name] = _read_records(sub)
            if published and "published" not in sub_summary:
                sub_summary["published"] = published  # the method's page compares with the paper too
            _write_run(sub, sub_summary, series[name])
            href = f"{quote(name)}/{INDEX_NAME}"
            links.append({"name": name, "href": href})
        columns.append(({"name": name, "href": href}, msum))
    assets = run_dir / ASSETS
    plots = _plots(assets, series, published, None) if any(series.values()) else []
    comparison = _comparison(columns, published, "Methods side by side" + (" with the paper" if published else ""),
                             "Each column is one method on the same errors. "
                             + ("Green: better than the published figure; red: worse." if published else ""))
    meta = [m for m in _meta(summary) if m[0] != "method"]
    meta.append(("methods", ", ".join(str(m) for m in methods)))
    html = _render(
        title=f"flipback benchmark: {run_dir.resolve().name}",
        heading=f"benchmark {run_dir.resolve().name}",
        meta=meta,
        lead=_lead(summary),
        comparison=comparison,
        method_links=links,
        plots=plots,
        summary_rows=_summary_rows(summary),
    )
    out = run_dir / INDEX_NAME
    _write_atomic(out, html)
    return out
