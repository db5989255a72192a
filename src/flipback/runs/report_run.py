"""`flipback report RUN_DIR`: rebuild the HTML report from what the run folder stores."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RunError
from ..report import write_index
from ..store import RunStore


def rebuild_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    summary_path, db_path = run_dir / "summary.json", run_dir / "results.sqlite"
    if not summary_path.is_file():
        raise RunError(f"{run_dir} holds no summary.json", hint="point at a folder written by flipback explain")
    summary = json.loads(summary_path.read_text())
    records = []
    if db_path.is_file():
        store = RunStore(db_path)
        try:
            records = store.records()
        finally:
            store.close()
    return write_index(run_dir, {k: v for k, v in summary.items() if k not in ("classes", "confusion", "methods")},
                       records)
