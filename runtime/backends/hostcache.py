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


def fp8_e4m3fn_table() -> np.ndarray:
    """float32 value of each FP8 E4M3FN byte (sign, 4 exponent bits biased by 7, 3 mantissa bits; 0x7f/0xff NaN)."""
    b = np.arange(256)
    sign = np.where(b >> 7, -1.0, 1.0)
    exp, mant = (b >> 3) & 0xF, b & 7
    val = np.where(exp == 0, mant / 8.0 * 2.0 ** -6, (1 + mant / 8.0) * 2.0 ** (exp - 7.0))
    val = np.where((exp == 15) & (mant == 7), np.nan, val)
    return (sign * val).astype(np.float32)


class QuantHostKVCache(KVCache):
    """A quantized cache (IO contract 3): the codes ([B, kv_heads, T, head_dim] int8, or FP8 E4M3FN bytes held
    as uint8) and their float32 scales ([B, kv_heads, T, 1]) in two ``HostKVCache`` slabs that move together:
    every row/column operation is applied to both, so ``select`` / ``extend`` / ``trim_left`` keep their
    meaning. ``ptrs[side]`` lists the codes of every tensor, then the scales (the backend's binding order)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype, batch: int, max_len: int,
                 fp8: bool = False):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.fp8 = fp8
        self.codes = HostKVCache(layers, kv_heads, head_dim, dtype, batch, max_len)
        self.scales = HostKVCache(layers, kv_heads, 1, np.float32, batch, max_len)
        self.dtype = self.codes.dtype

    # the two slabs always agree on these
    batch = property(lambda self: self.codes.batch, lambda self, v: self._set("batch", v))
    length = property(lambda self: self.codes.length, lambda self, v: self._set("length", v))
    side = property(lambda self: self.codes.side)

    def _set(self, name, v):
        setattr(self.codes, name, v)
        setattr(self.scales, name, v)

    @property
    def ptrs(self) -> list[list[int]]:
        return [self.codes.ptrs[s] + self.scales.ptrs[s] for s in (0, 1)]

    def reserve(self, batch: int, length: int) -> None:
        self.codes.reserve(batch, length)
        self.scales.reserve(batch, length)

    @property
    def capacity_bytes(self) -> int:
        return self.codes.capacity_bytes + self.scales.capacity_bytes

    def advance(self, batch: int, added: int) -> None:
        self.codes.advance(batch, added)
        self.scales.advance(batch, added)

    def dequantized(self, j: int) -> np.ndarray:
        """Tensor j (2*layer + 0 key | 1 value) as float32 [batch, kv_heads, length, head_dim]: codes x scale."""
        c = self.codes.past(j)
        x = fp8_e4m3fn_table()[c] if self.fp8 else c.astype(np.float32)
        return x * self.scales.past(j)

    # ---- KVCache ---------------------------------------------------------------------------------------
    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.dequantized(2 * i), self.dequantized(2 * i + 1)

    def select(self, rows: list[int]) -> None:
        self.codes.select(rows)
        self.scales.select(rows)

    def extend(self, other: KVCache) -> int:
        if not isinstance(other, QuantHostKVCache):
            raise TypeError("extend needs a cache of the same backend and format")
        self.scales.extend(other.scales)
        return self.codes.extend(other.codes)

    def trim_left(self, n: int) -> None:
        if not self._trims(n):
            return
        self.codes.trim_left(n)
        self.scales.trim_left(n)
