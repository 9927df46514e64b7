"""A KV cache in GPU memory: the TensorRT backend's cache never leaves the device between steps.

Same scheme as the host cache: two ping-pong sides, each holding every layer's key and value tensor as a
contiguous [batch, kv_heads, length, head_dim] block; a step reads the past from one side and the engine
writes the present (past + new) into the other. Row and column moves for continuous batching are strided
device-to-device copies (cudaMemcpy2DAsync), one per tensor; only ``layer()`` copies to the host.
"""
from __future__ import annotations

import numpy as np

from .base import KVCache
from .cuda_mem import Cuda


class DeviceKVCache(KVCache):
    def __init__(self, cuda: Cuda, layers: int, kv_heads: int, head_dim: int, dtype, batch: int, max_len: int):
        self.cuda = cuda
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype = np.dtype(dtype)
        self.batch, self.length, self.side = batch, 0, 0
        self._bytes = 0  # capacity per tensor
        self.base = [0, 0]  # one allocation per side: 2*layers tensors of _bytes each
        self.reserve(batch, max_len)

    # ---- memory --------------------------------------------------------------------------------------
    def _need(self, batch: int, length: int) -> int:
        return batch * self.kv_heads * length * self.head_dim * self.dtype.itemsize

    def ptr(self, side: int, j: int) -> int:
        """Address of tensor j (2*layer + 0 key / 1 value) on ``side``."""
        return self.base[side] + j * self._bytes

    def reserve(self, batch: int, length: int) -> None:
        need = self._need(batch, length)
        if self.base[0] and need <= self._bytes:
            return
        new_bytes = max(need, int(self._bytes * 1.5), 256)
        new = [self.cuda.malloc(2 * self.layers * new_bytes) for _ in (0, 1)]
        n = self._need(self.batch, self.length)
        if self.base[0] and n:
            for j in range(2 * self.layers):
                self.cuda.copy2d(new[self.side] + j * new_bytes, n, self.ptr(self.side, j), n, n, 1)
        self.cuda.sync()
        for p in self.base:
            self.cuda.free(p)
        self.base, self._bytes = new, new_bytes

    def advance(self, batch: int, added: int) -> None:
        """After a step wrote the present into the other side: flip sides, length += added."""
        self.side ^= 1
        self.batch = batch
        self.length += added

    def free(self) -> None:
        """Return the device memory now (also done when the cache is garbage-collected)."""
        if self.cuda.stream is not None:
            self.cuda.sync()
        for p in self.base:
            self.cuda.free(p)
        self.base, self._bytes = [0, 0], 0

    def __del__(self):
        try:
            self.free()
        except Exception:  # interpreter shutdown or a closed backend: nothing left to free into
            pass

    # ---- KVCache ---------------------------------------------------------------------------------------
    def _row(self, length: int) -> int:
        return self.kv_heads * length * self.head_dim * self.dtype.itemsize

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        out = []
        for j in (2 * i, 2 * i + 1):
            host = np.empty((self.batch, self.kv_heads, self.length, self.head_dim), dtype=self.dtype)
            self.cuda.d2h(host, self.ptr(self.side, j))
            out.append(host)
        self.cuda.sync()
        return out[0], out[1]

    def select(self, rows: list[int]) -> None:
        rows = [int(r) for r in rows]
        if rows == list(range(self.batch)):
            return
        row, other = self._row(self.length), self.side ^ 1
        for j in range(2 * self.layers):
            for i, r in enumerate(rows):
                self.cuda.copy2d(self.ptr(other, j) + i * row, row, self.ptr(self.side, j) + r * row, row, row, 1)
        self.side, self.batch = other, len(rows)

    def extend(self, other: KVCache) -> int:
        if not isinstance(other, DeviceKVCache) or other.cuda is not self.cuda:
            raise TypeError("extend needs a cache of the same backend")
        b0, b1 = self.batch, other.batch
        length = max(self.length, other.length)
        self.reserve(b0 + b1, length)
        dst_side = self.side ^ 1
        isz, hd = self.dtype.itemsize, self.head_dim
        dpitch = length * hd * isz  # one (row, head) line of the destination
        for j in range(2 * self.layers):
            dst = self.ptr(dst_side, j)
            for src_cache, src_ptr, first, rows in ((self, self.ptr(self.side, j), 0, b0),
                                                    (other, other.ptr(other.side, j), b0, b1)):
                shift = length - src_cache.length
                lines, start = rows * self.kv_heads, dst + first * self.kv_heads * dpitch
                self.cuda.zero2d(start, dpitch, shift * hd * isz, lines)
                self.cuda.copy2d(start + shift * hd * isz, dpitch, src_ptr, src_cache.length * hd * isz,
                                 src_cache.length * hd * isz, lines)
        shift_self = length - self.length
        self.side, self.batch, self.length = dst_side, b0 + b1, length
        return shift_self

    def trim_left(self, n: int) -> None:
        if not self._trims(n):
            return
        isz, hd, other = self.dtype.itemsize, self.head_dim, self.side ^ 1
        keep = self.length - n
        lines = self.batch * self.kv_heads
        for j in range(2 * self.layers):
            self.cuda.copy2d(self.ptr(other, j), keep * hd * isz, self.ptr(self.side, j) + n * hd * isz,
                             self.length * hd * isz, keep * hd * isz, lines)
        self.side, self.length = other, keep
