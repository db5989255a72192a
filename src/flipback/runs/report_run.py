"""`flipback report RUN_DIR`: rebuild the HTML report from what the run folder stores."""

from __future__ import annotations

from pathlib import Path

from ..report import write_report


def rebuild_report(run_dir: Path) -> Path:
    return write_report(Path(run_dir))  # raises RunError when summary.json is missing
