"""The backend interface: what the generation loop needs from an inference engine.

A backend runs the graph of one artifact (ONNX Runtime on CPU, TensorRT on a GPU, ...). It owns the weights
and the KV cache memory; the generation loop (``runtime.generate``) owns tokens, attention masks, positions
and sampling. The contract for a backend (all arrays are numpy on the host side):

``Backend(artifact_dir, manifest, threads=None, providers=None)``
    Load the model files of ``artifact_dir`` described by ``manifest`` (a ``runtime.manifest.Manifest``).
    ``threads`` is the intra-op thread count (None: the library default), ``providers`` an optional list of
    provider names for backends that have them. Failures raise ``EngineError`` with a one-line message.

``backend.allocate(batch, max_len) -> KVCache``
    A cache for ``batch`` rows of up to ``max_len`` positions (past + new tokens), allocated once and reused
    by every ``forward`` call. ``cache.length`` (P, the positions already filled, equal for all rows) starts
    at 0. Caches may grow their capacity when a call needs more; they never shrink on their own.

``backend.forward(cache, input_ids, attention_mask, position_ids, last_only=True) -> logits``
    input_ids [B, S] int64, attention_mask [B, P+S] int64 (0 = padding; covers the past and the new tokens),
    position_ids [B, S] int64. Runs the model on S new tokens per row, appends their keys/values to the cache
    in place (``cache.length`` becomes P+S) and returns float32 logits: [B, 1, vocab] for the last position
    when ``last_only`` (prefill and decode), [B, S, vocab] for every position otherwise (scoring). The
    returned array may be a view of a buffer the backend reuses: it is valid until the next ``forward``.

The cache operations continuous batching needs (``KVCache`` methods below) move whole rows and columns;
attention masks are the caller's, who applies the same column moves to them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np


class KVCache(ABC):
    """Keys and values of every layer for ``batch`` rows and ``length`` filled positions.

    Layout per layer and per key/value: [batch, kv_heads, length, head_dim] (the ONNX IO contract).
    """

    batch: int
    length: int

    @abstractmethod
    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the current batch), in that order."""

    @abstractmethod
    def extend(self, other: "KVCache") -> int:
        """Append the rows of ``other`` (a cache of the same backend) below this cache's rows.

        Rows are right-aligned: the result has length max(self.length, other.length); the shorter side is
        shifted right and the freed leading columns hold zeros. Returns how many columns this cache's own rows
        moved right (0 when ``other`` was not longer); ``other``'s rows moved right by the difference the other
        way. The caller masks the freed columns.
        """

    @abstractmethod
    def trim_left(self, n: int) -> None:
        """Drop the first ``n`` columns of every row (columns that every row masks)."""

    def _trims(self, n: int) -> bool:
        """Whether ``trim_left(n)`` has columns to drop; more than the filled columns is an error."""
        if n > self.length:
            raise ValueError(f"cannot trim {n} of {self.length} columns")
        return n > 0

    @abstractmethod
    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies or views of layer ``i``'s keys and values, each [batch, kv_heads, length, head_dim]."""


class Backend(ABC):
    """One loaded artifact, ready to run. See the module docstring for the contract."""

    name: str = "?"
    vocab: int
    layers: int
    kv_heads: int
    head_dim: int

    @abstractmethod
    def __init__(self, artifact_dir: str | Path, manifest, threads: int | None = None,
                 providers: list[str] | None = None):
        ...

    @abstractmethod
    def allocate(self, batch: int, max_len: int) -> KVCache:
        ...

    @abstractmethod
    def forward(self, cache: KVCache, input_ids: np.ndarray, attention_mask: np.ndarray,
                position_ids: np.ndarray, last_only: bool = True) -> np.ndarray:
        ...

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one row takes per position (what the server's admission counts): layers x 2
        (key, value) x kv_heads x head_dim x the cache dtype's size, twice for caches that keep two buffers
        (the portable graph's past and present). Backends with a quantized cache add their scales."""
        item = np.dtype(getattr(self, "kv_dtype", np.float32)).itemsize
        buffers = 1 if getattr(self, "shared_kv", False) else 2
        return int(self.layers) * 2 * int(self.kv_heads) * int(self.head_dim) * item * buffers

    def close(self) -> None:
        """Release sessions and buffers (idempotent)."""

    def describe(self) -> dict:
        """What runs the model, for ``kiln bench`` and the server's /health."""
        return {"backend": self.name}


def step_inputs(cache: KVCache, input_ids, attention_mask, position_ids):
    """Contiguous int64 copies of one step's inputs, checked against the cache: (ids, mask, pos, t).

    ids / pos: [B, S]; mask: [B, T] with T = cache.length + S. A cache holding rows only takes the same batch.
    """
    from ..errors import EngineError

    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
    pos = np.ascontiguousarray(position_ids, dtype=np.int64)
    b, s = ids.shape
    p = cache.length
    t = p + s
    if b != cache.batch and p > 0:
        raise EngineError(f"batch {b} does not match the cache's {cache.batch} rows")
    if mask.shape != (b, t) or pos.shape != (b, s):
        raise EngineError(f"attention_mask must be [{b}, {t}] and position_ids [{b}, {s}], "
                          f"got {list(mask.shape)} and {list(pos.shape)}")
    return ids, mask, pos, t
