"""One progress bar helper (rich) for every long step: rate and time left; silent when off."""

from __future__ import annotations

from contextlib import contextmanager

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeRemainingColumn)
from rich.text import Text


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        unit = task.fields.get("unit", "img")
        return Text(f"{task.speed:.1f} {unit}/s" if task.speed else "")


@contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True, unit: str = "img"):
    """Yields `advance(n)`. Disabled bars cost nothing, for --quiet and --json runs."""
    if not enabled:
        yield lambda n=1: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                  TimeRemainingColumn()) as bar:
        task = bar.add_task(description, total=total, unit=unit)
        yield lambda n=1: bar.advance(task, n)
