"""HTML reports of runs."""

from .index import render_index, safe_relative_src, write_index

__all__ = ["render_index", "safe_relative_src", "write_index"]
