"""Minimal static HTML index of a run: a summary table and one row per misclassified image.

Everything user-provided (file names, class names, summary values, error messages) is
escaped by Jinja2 autoescaping; figure paths are only emitted as ``src``/``href`` when
they are plain relative paths inside the run folder (see :func:`safe_relative_src`).
The page has no scripts, no external assets and a restrictive Content-Security-Policy.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined

INDEX_NAME = "index.html"
_TEMPLATE = "index.html.j2"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

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


def _fmt_float(v, fmt: str) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(f) or math.isinf(f):
        return "–"
    return fmt.format(f)


def _fmt_int(v) -> str:
    if isinstance(v, bool) or v is None:
        return "–"
    try:
        return str(int(v))
    except (TypeError, ValueError):
        return "–"


def _text(v) -> str:
    return "–" if v is None else str(v)


def _row(rec: dict) -> dict:
    linf = rec.get("linf")
    linf_s = _fmt_float(linf, "{:.4f}")
    if linf_s != "–":
        linf_s += f" ({float(linf) * 255:.1f}/255)"
    return {
        "index": _fmt_int(rec.get("index")),
        "name": _text(rec.get("name")),
        "true_name": _text(rec.get("true_name")),
        "pred_before_name": _text(rec.get("pred_before_name")),
        "pred_after_name": _text(rec.get("pred_after_name")),
        "success": bool(rec.get("success")),
        "queries": _fmt_int(rec.get("queries")),
        "l2": _fmt_float(rec.get("l2"), "{:.4f}"),
        "linf": linf_s,
        "figure": safe_relative_src(rec.get("figure")),
        "error": None if rec.get("error") in (None, "") else str(rec.get("error")),
    }


def render_index(summary: dict, records: list[dict], *, title: str = "flipback run") -> str:
    """Render the index page to a string."""
    summary_rows = [(str(k), _fmt_summary_value(v)) for k, v in (summary or {}).items()]
    rows = [_row(r) for r in (records or [])]
    return _environment().get_template(_TEMPLATE).render(
        title=title, summary_rows=summary_rows, rows=rows
    )


def write_index(run_dir, summary: dict, records: list[dict]) -> Path:
    """Write ``run_dir/index.html`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    html = render_index(summary, records, title=f"flipback run: {run_dir.resolve().name}")
    out = run_dir / INDEX_NAME
    tmp = run_dir / f".{INDEX_NAME}.tmp-{os.getpid()}"
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out)
    return out
