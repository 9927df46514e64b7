"""Progress on stderr: a rich bar with ETA on a terminal; plain lines in a log (stderr not a terminal), at
most one every ``PLAIN_EVERY_S`` seconds plus the last one, so long work shows progress in CI logs too."""
from __future__ import annotations

import sys
import time

PLAIN_EVERY_S = 5.0


def _fmt(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


class _RichBar:
    def __init__(self, total: int, label: str):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self._p.start()
        self._t = self._p.add_task(label, total=total)

    def advance(self, n: int = 1) -> None:
        self._p.advance(self._t, n)

    def close(self) -> None:
        self._p.stop()


class _PlainBar:
    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.t0 = self.last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self.last >= PLAIN_EVERY_S:
            self.last = now
            el = now - self.t0
            eta = el / self.done * (self.total - self.done) if self.done else 0.0
            tail = "done" if self.done >= self.total else f"ETA {_fmt(eta)}"
            print(f"{self.label}: {self.done}/{self.total} ({_fmt(el)}, {tail})", file=self.stream, flush=True)

    def close(self) -> None:
        pass


def bar(total: int, label: str):
    """A progress bar over ``total`` steps: ``advance(n)``, ``close()``."""
    if sys.stderr.isatty():
        return _RichBar(total, label)
    return _PlainBar(total, label)


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
