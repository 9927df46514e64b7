"""Continuous batching for the server: one worker thread owns a ``Batch``; requests queue up and join the
running batch between decode steps, up to ``max_batch`` rows and a KV-cache byte budget. A full queue
refuses new requests.

KV accounting: the batch's cache is [rows, kv_heads, longest row, head_dim] per layer and per key/value (rows
are right-aligned), so admitting a request costs rows x longest x ``kv_bytes_per_token``, where a row's
length is its prompt plus its ``max_tokens`` (what it may grow to). A request waits in the queue until that
fits the budget; one that could never fit alone is refused at submit.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import EngineError
from .generate import Batch, Sequence


class QueueFull(EngineError):
    """More requests are waiting than the server accepts; retry later."""


class OverBudget(EngineError):
    """The request alone needs more KV cache than the server's budget."""


class WorkerDown(EngineError):
    """The worker thread is not running (shut down or crashed)."""


@dataclass
class Metrics:
    requests: collections.Counter = field(default_factory=collections.Counter)  # (endpoint, status) -> n
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected_full: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    steps: int = 0
    step_rows: int = 0
    step_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


def kv_bytes_per_token(engine) -> int:
    """Bytes of KV cache one row needs per position: layers x 2 (key, value) x kv_heads x head_dim x the
    cache dtype's size, twice for caches that keep two buffers (the portable graph's past and present)."""
    a = engine.manifest.architecture
    be = engine.backend
    if isinstance(getattr(be, "kv_bytes_per_token", None), int):  # the backend's own count (quantized caches)
        return be.kv_bytes_per_token
    item = np.dtype(getattr(be, "kv_dtype", np.float32)).itemsize
    buffers = 1 if getattr(be, "shared_kv", False) else 2
    return int(a.layers) * 2 * int(a.kv_heads) * int(a.head_dim) * item * buffers


def extent(s: Sequence) -> int:
    """The most positions a sequence's row can take: its prompt and every token it may generate."""
    return len(s.prompt) + s.config.max_new_tokens


class Scheduler:
    def __init__(self, engine, max_batch: int = 8, max_queue: int = 64, kv_budget: int | None = None):
        if max_batch < 1 or max_queue < 0:
            raise EngineError("max_batch must be >= 1 and max_queue >= 0")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.kv_per_token = kv_bytes_per_token(engine)
        self.kv_budget = kv_budget  # bytes; None: unbounded
        self.metrics = Metrics()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._live: list[Sequence] = []
        self._cv = threading.Condition()
        self._stop = False
        self.crash: str | None = None  # why the worker thread ended, if it did on an error
        self._batch = self.new_batch()
        self._thread = threading.Thread(target=self._run, name="kiln-scheduler", daemon=True)
        self._thread.start()

    def new_batch(self) -> Batch:
        return Batch(self.engine.backend)

    # ---- called from the HTTP side -------------------------------------------------------------------
    def kv_cost(self, seqs) -> int:
        """KV bytes a batch of these sequences may need (rows x longest extent x bytes per token)."""
        seqs = list(seqs)
        return len(seqs) * max((extent(s) for s in seqs), default=0) * self.kv_per_token

    def submit(self, seq: Sequence, on_done) -> None:
        """Queue ``seq``; ``on_done(seq)`` is called from the worker thread when it finishes."""
        if self.kv_budget is not None and self.kv_cost([seq]) > self.kv_budget:
            raise OverBudget(f"this request may need {self.kv_cost([seq]) / 2**20:.1f} MiB of KV cache "
                             f"(prompt + max_tokens = {extent(seq)} positions); the server's budget is "
                             f"{self.kv_budget / 2**20:.1f} MiB: lower max_tokens or the prompt")
        with self._cv:
            if self._stop or not self._thread.is_alive():
                raise WorkerDown("the server is shutting down" if self._stop else
                                 f"the server's worker stopped ({self.crash}); restart the server")
            self._drop_cancelled()
            if len(self._waiting) >= self.max_queue and len(self._live) + len(self._waiting) >= self.max_batch:
                with self.metrics.lock:
                    self.metrics.rejected_full += 1
                raise QueueFull(f"the queue is full ({len(self._waiting)} requests waiting); retry later")
            seq.on_done = on_done
            self._waiting.append(seq)
            self._cv.notify()

    def _drop_cancelled(self) -> None:
        """Cancelled requests still waiting give up their place at once (caller holds the lock)."""
        if any(s.cancelled for s in self._waiting):
            gone = [s for s in self._waiting if s.cancelled]
            self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
            for s in gone:
                s._finish("cancelled")
                self._done(s)

    @property
    def active(self) -> int:
        return len(self._live)

    @property
    def queued(self) -> int:
        with self._cv:
            return sum(1 for s in self._waiting if not s.cancelled)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    @property
    def kv_reserved(self) -> int:
        with self._cv:
            return self.kv_cost(self._live)

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
            while not self._stop and not self._waiting and not self._live:
                self._cv.wait()
            self._drop_cancelled()
            take: list[Sequence] = []
            while self._waiting and len(self._live) + len(take) < self.max_batch:
                s = self._waiting[0]
                if self.kv_budget is not None and self._live + take \
                        and self.kv_cost(self._live + take + [s]) > self.kv_budget:
                    break  # first in, first served: the head waits for room
                take.append(self._waiting.popleft())
            self._live += take
            return take

    def _done(self, s: Sequence) -> None:
        m = self.metrics
        with m.lock:
            m.prompt_tokens += len(s.prompt)
            m.completion_tokens += len(s.out)
            if s.finish_reason == "cancelled":
                m.cancelled += 1
            if s.finish_reason == "error":
                m.failed += 1
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
        try:
            self._loop()
        except BaseException as e:
            self.crash = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            raise
        finally:
            with self._cv:
                left = self._live + list(self._waiting)
                self._live, self._waiting = [], collections.deque()
            for s in left:
                if not s.done:
                    s.fail(f"the server's worker stopped ({self.crash})") if self.crash else s._finish("cancelled")
                self._done(s)

    def _loop(self) -> None:
        while True:
            take = self._take()
            if self._stop:
                return
            try:
                if take:
                    self._batch.add(take)
                if len(self._batch):
                    t0 = time.perf_counter()
                    rows = len(self._batch)
                    self._batch.step()
                    with self.metrics.lock:
                        self.metrics.steps += 1
                        self.metrics.step_rows += rows
                        self.metrics.step_seconds += time.perf_counter() - t0
            except Exception as e:  # the batch itself broke (not one row): end the running requests
                for s in self._live:
                    s.fail(e)
                self._batch = self.new_batch()
            finished = [s for s in self._live if s.done]
            if finished:
                with self._cv:
                    self._live = [s for s in self._live if not s.done]
                for s in finished:
                    self._done(s)
