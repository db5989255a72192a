"""A rich progress bar (rate and ETA) on stderr, or a no-op stand-in."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class _Silent:
    def add(self, description: str, total: int) -> int:
        return 0

    def advance(self, task: int, n: int = 1) -> None:
        pass


class _Rich:
    def __init__(self, progress):
        self._p = progress

    def add(self, description: str, total: int) -> int:
        return self._p.add_task(description, total=total)

    def advance(self, task: int, n: int = 1) -> None:
        self._p.advance(task, n)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[_Silent | _Rich]:
    if not enabled:
        yield _Silent()
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} img/s" if speed else "? img/s", style="progress.data.speed")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as p:
        yield _Rich(p)
