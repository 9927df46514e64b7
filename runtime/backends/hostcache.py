"""A KV cache in host memory: two preallocated ping-pong buffers per artifact, grown geometrically.

Every key/value tensor of every layer lives in one flat slab; a step reads the past from one side and the
graph writes the present (past + new, [B, kv_heads, T, head_dim], contiguous) straight into the other side,
so no step allocates or concatenates anything in Python. Row and column moves for continuous batching copy
once from one side to the other.
"""
from __future__ import annotations

import numpy as np

from .base import KVCache


class HostKVCache(KVCache):
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype, batch: int, max_len: int):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype = np.dtype(dtype)
        self.batch = batch
        self.length = 0
        self.side = 0
        self._elems = 0  # capacity per tensor, in elements
        self.bufs: np.ndarray | None = None  # [2 sides, 2*layers, elems]
        self.reserve(batch, max_len)

    # ---- memory ------------------------------------------------------------------------------------
    def _need(self, batch: int, length: int) -> int:
        return batch * self.kv_heads * length * self.head_dim

    def reserve(self, batch: int, length: int) -> None:
        """Make room for [batch, kv_heads, length, head_dim] per tensor, keeping the current contents."""
        need = self._need(batch, length)
        if self.bufs is not None and need <= self._elems:
            return
        elems = max(need, int(self._elems * 1.5))
        new = np.zeros((2, 2 * self.layers, elems), dtype=self.dtype)
        if self.bufs is not None:
            n = self._need(self.batch, self.length)
            new[self.side, :, :n] = self.bufs[self.side, :, :n]
        self.bufs, self._elems = new, elems
        step = elems * self.dtype.itemsize
        base = new.ctypes.data
        # ptrs[side][j]: address of tensor j on that side
        self.ptrs = [[base + (side * 2 * self.layers + j) * step for j in range(2 * self.layers)] for side in (0, 1)]

    @property
    def capacity_bytes(self) -> int:
        return 0 if self.bufs is None else self.bufs.nbytes

    def view(self, side: int, j: int, batch: int, length: int) -> np.ndarray:
        # tensor j = 2*layer + (0 key | 1 value): [batch, kv_heads, length, head_dim]
        n = self._need(batch, length)
        return self.bufs[side, j, :n].reshape(batch, self.kv_heads, length, self.head_dim)

    def ptr(self, side: int, j: int) -> int:
        return self.ptrs[side][j]

    def past(self, j: int) -> np.ndarray:
        return self.view(self.side, j, self.batch, self.length)

    def advance(self, batch: int, added: int) -> None:
        """After a step wrote the present into the other side: flip sides, length += added."""
        self.side ^= 1
        self.batch = batch
        self.length += added

    # ---- KVCache ---------------------------------------------------------------------------------------
    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.past(2 * i), self.past(2 * i + 1)

    def select(self, rows: list[int]) -> None:
        rows = [int(r) for r in rows]
        if rows == list(range(self.batch)):
            return
        idx = np.asarray(rows, dtype=np.int64)
        other = self.side ^ 1
        for j in range(2 * self.layers):
            src = self.past(j)
            np.take(src, idx, axis=0, out=self.view(other, j, len(rows), self.length))
        self.side, self.batch = other, len(rows)

    def extend(self, other: KVCache) -> int:
        if not isinstance(other, HostKVCache):
            raise TypeError("extend needs a cache of the same backend")
        b0, b1 = self.batch, other.batch
        length = max(self.length, other.length)
        self.reserve(b0 + b1, length)
        dst_side = self.side ^ 1
        shift_self, shift_other = length - self.length, length - other.length
        for j in range(2 * self.layers):
            dst = self.view(dst_side, j, b0 + b1, length)  # [b0+b1, kv, length, hd]
            dst[:b0, :, :shift_self] = 0
            dst[:b0, :, shift_self:] = self.past(j)
            dst[b0:, :, :shift_other] = 0
            dst[b0:, :, shift_other:] = other.past(j)
        self.side, self.batch, self.length = dst_side, b0 + b1, length
        return shift_self

    def trim_left(self, n: int) -> None:
        if not self._trims(n):
            return
        other = self.side ^ 1
        for j in range(2 * self.layers):
            self.view(other, j, self.batch, self.length - n)[...] = self.past(j)[:, :, n:]
        self.side, self.length = other, self.length - n
