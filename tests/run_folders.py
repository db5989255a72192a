"""Helpers for tests that watch a run folder from another process."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def committed_rows(out: Path) -> int:
    """Committed results so far, read as a second process would (never blocks the writer)."""
    db = out / "results.sqlite"
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05)
        try:
            return con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:  # not created yet, or locked for a moment
        return 0
