"""HTML reports of runs: ``write_report(run_dir)`` builds ``run_dir/index.html`` from the run folder."""

from .index import json_for_html, render_index, safe_relative_src, write_index, write_report

__all__ = ["json_for_html", "render_index", "safe_relative_src", "write_index", "write_report"]
