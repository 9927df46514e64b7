"""Continuous batching for the server: one worker thread owns a ``Batch``; requests queue up and join the
running batch between decode steps, up to ``max_batch`` rows. A full queue refuses new requests."""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

from .errors import EngineError
from .generate import Batch, Sequence


class QueueFull(EngineError):
    """More requests are waiting than the server accepts; retry later."""


@dataclass
class Metrics:
    requests: collections.Counter = field(default_factory=collections.Counter)  # (endpoint, status) -> n
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cancelled: int = 0
    rejected_full: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    steps: int = 0
    step_rows: int = 0
    step_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Scheduler:
    def __init__(self, engine, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise EngineError("max_batch must be >= 1 and max_queue >= 0")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.metrics = Metrics()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._live: list[Sequence] = []
        self._cv = threading.Condition()
        self._stop = False
        self._batch = Batch(engine.backend)
        self._thread = threading.Thread(target=self._run, name="kiln-scheduler", daemon=True)
        self._thread.start()

    # ---- called from the HTTP side -------------------------------------------------------------------
    def submit(self, seq: Sequence, on_done) -> None:
        """Queue ``seq``; ``on_done(seq)`` is called from the worker thread when it finishes."""
        with self._cv:
            if self._stop:
                raise EngineError("the server is shutting down")
            if len(self._waiting) >= self.max_queue and len(self._batch) + len(self._waiting) >= self.max_batch:
                self.metrics.rejected_full += 1
                raise QueueFull(f"the queue is full ({len(self._waiting)} requests waiting); retry later")
            seq.on_done = on_done
            self._waiting.append(seq)
            self._cv.notify()

    @property
    def active(self) -> int:
        return len(self._batch)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            for s in self._waiting:
                s.cancel()
            self._cv.notify()
        self._thread.join(timeout=10)

    # ---- worker ------------------------------------------------------------------------------------
    def _take(self) -> list[Sequence]:
        with self._cv:
            while not self._stop and not self._waiting and not len(self._batch):
                self._cv.wait()
            take = []
            while self._waiting and len(self._batch) + len(take) < self.max_batch:
                s = self._waiting.popleft()
                if s.cancelled:
                    s._finish("cancelled")
                    self._done(s)
                else:
                    take.append(s)
            return take

    def _done(self, s: Sequence) -> None:
        m = self.metrics
        with m.lock:
            m.prompt_tokens += len(s.prompt)
            m.completion_tokens += len(s.out)
            if s.finish_reason == "cancelled":
                m.cancelled += 1
            if s.t_first is not None:
                m.ttft_sum += s.t_first - s.t_submit
                m.ttft_count += 1
        cb = getattr(s, "on_done", None)
        if cb is not None:
            try:
                cb(s)
            except Exception:  # a listener that went away must not stop the worker
                pass

    def _run(self) -> None:
        while True:
            take = self._take()
            if self._stop:
                for s in self._live + take:
                    if not s.done:
                        s._finish("cancelled")
                    self._done(s)
                return
            try:
                if take:
                    self._live += take
                    self._batch.add(take)
                if len(self._batch):
                    t0 = time.perf_counter()
                    rows = len(self._batch)
                    self._batch.step()
                    with self.metrics.lock:
                        self.metrics.steps += 1
                        self.metrics.step_rows += rows
                        self.metrics.step_seconds += time.perf_counter() - t0
            except Exception as e:  # a backend failure ends every running request with an error
                msg = " ".join(str(e).split())[:300]
                for s in self._live:
                    if not s.done:
                        s.error = msg
                        s._finish("error")
                self._batch = Batch(self.engine.backend)
            finished = [s for s in self._live if s.done]
            if finished:
                self._live = [s for s in self._live if not s.done]
                for s in finished:
                    self._done(s)
