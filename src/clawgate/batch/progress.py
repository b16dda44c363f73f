"""The batch's progress bar (rich): done of total, runs/s, ok / failed / retried, eta."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} runs/s" if speed else "- runs/s", style="cyan")


class BatchProgress:
    """A live bar while the batch runs; `advance` after each finished (or abandoned) task."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._bar: TaskID | None = None

    @contextlib.contextmanager
    def shown(self, total: int, enabled: bool) -> Iterator[None]:
        if not enabled or total == 0:
            yield
            return
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TextColumn("{task.fields[detail]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=self.console,
            speed_estimate_period=10.0,
        )
        self._progress = progress
        self._bar = progress.add_task("batch", total=total, detail="")
        with progress:
            yield
        self._progress = None

    def advance(self, ok: int, failed: int, retried: int) -> None:
        if self._progress is not None and self._bar is not None:
            detail = f"[green]ok {ok}[/green] [red]failed {failed}[/red] retried {retried}"
            self._progress.update(self._bar, advance=1, detail=detail)
