"""A small progress bar on stderr (rich), silent when stderr is not a terminal unless forced."""
from __future__ import annotations

import sys


class _Bar:
    def __init__(self, total: int, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.console import Console

        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self._p.start()
        self._t = self._p.add_task(label, total=total)

    def advance(self, n: int = 1) -> None:
        self._p.advance(self._t, n)

    def close(self) -> None:
        self._p.stop()


def bar(total: int, label: str) -> _Bar:
    return _Bar(total, label)


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
