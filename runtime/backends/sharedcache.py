"""A KV cache for graphs that write the present into the past's own buffer (``--form ort``: ONNX Runtime's
``GroupQueryAttention`` shares past and present when both are bound to the same memory).

Each key/value tensor is one preallocated [batch, kv_heads, capacity, head_dim] array; a step appends its new
tokens at column ``length`` in place, so nothing is copied per step and the bindings stay the same until the
capacity grows. Row and column moves for continuous batching work in place (numpy handles the overlap).
"""
from __future__ import annotations

import numpy as np

from .base import KVCache


class SharedKVCache(KVCache):
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype, batch: int, max_len: int):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype = np.dtype(dtype)
        self.batch = batch
        self.length = 0
        self.rows = 0  # allocated rows
        self.capacity = 0  # allocated columns
        self.bufs: np.ndarray | None = None  # [2*layers, rows, kv_heads, capacity, head_dim]
        self.reserve(batch, max_len)

    # ---- memory ------------------------------------------------------------------------------------
    def reserve(self, batch: int, length: int) -> None:
        """Make room for ``batch`` rows of ``length`` columns, keeping the current contents."""
        if self.bufs is not None and batch <= self.rows and length <= self.capacity:
            return
        rows = max(batch, self.rows)
        cap = max(length, int(self.capacity * 1.5)) if length > self.capacity else self.capacity
        new = np.zeros((2 * self.layers, rows, self.kv_heads, cap, self.head_dim), dtype=self.dtype)
        if self.bufs is not None:
            new[:, :self.batch, :, :self.length] = self.bufs[:, :self.batch, :, :self.length]
        self.bufs, self.rows, self.capacity = new, rows, cap

    @property
    def capacity_bytes(self) -> int:
        return 0 if self.bufs is None else self.bufs.nbytes

    def ptr(self, j: int) -> int:
        """Address of tensor j (2*layer + 0 key | 1 value); its first ``batch`` rows are contiguous."""
        return self.bufs[j].ctypes.data

    def advance(self, batch: int, added: int) -> None:
        self.batch = batch
        self.length += added

    # ---- KVCache -----------------------------------------------------------------------------------
    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        b, n = self.batch, self.length
        return self.bufs[2 * i, :b, :, :n], self.bufs[2 * i + 1, :b, :, :n]

    def select(self, rows: list[int]) -> None:
        rows = [int(r) for r in rows]
        if rows == list(range(self.batch)):
            return
        kept = self.bufs[:, rows, :, :self.length]  # a copy (fancy indexing)
        self.bufs[:, :len(rows), :, :self.length] = kept
        self.batch = len(rows)

    def extend(self, other: KVCache) -> int:
        if not isinstance(other, SharedKVCache):
            raise TypeError("extend needs a cache of the same backend")
        b0, b1 = self.batch, other.batch
        length = max(self.length, other.length)
        self.reserve(b0 + b1, length)
        s0, s1 = length - self.length, length - other.length
        if s0:
            self.bufs[:, :b0, :, s0:length] = self.bufs[:, :b0, :, :self.length]
            self.bufs[:, :b0, :, :s0] = 0
        self.bufs[:, b0:b0 + b1, :, :s1] = 0
        self.bufs[:, b0:b0 + b1, :, s1:length] = other.bufs[:, :b1, :, :other.length]
        self.batch, self.length = b0 + b1, length
        return s0

    def trim_left(self, n: int) -> None:
        if not self._trims(n):
            return
        b = self.batch
        self.bufs[:, :b, :, :self.length - n] = self.bufs[:, :b, :, n:self.length]
        self.length -= n
