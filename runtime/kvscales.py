"""Static int8 KV-cache scales: the one rule that both a checkpoint's calibration (``kiln compress quantize
--kv-cache int8``, compress.quant.kvobserve) and an export's (``kiln export onnx --form ort --kv-cache int8``,
export.onnx.kvstatic) apply, and the file a checkpoint keeps them in (docs/FORMATS.md).

One float32 per layer, KV head and channel: ``scale = amax / 127``. For values, amax is the largest |value|
seen. For keys it is the largest norm of the channel pair rotary turns together (channels i and
i + head_dim/2): rotary keeps that norm, so the scale bounds the key at every position, not only at the
positions calibration ran, and the same number comes out of the keys before rotary (what compress sees) and
after it (what the graph's cache holds).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QMAX = 127.0
TINY = float(np.finfo(np.float32).tiny)
# in a checkpoint dir: KEY and VALUE [layers, kv_heads, head_dim]; in a subdir, so that no reader of the weights
# (which take every *.safetensors of a dir without an index) mistakes it for a shard
KV_SCALES_FILE = "kv_cache/scales.safetensors"
KEY, VALUE = "key_scale", "value_scale"


@dataclass(frozen=True)
class KVScales:
    """Per layer, KV head and channel float32 scales of the keys and of the values."""

    key: np.ndarray  # [layers, kv_heads, head_dim]
    value: np.ndarray
    windows: int
    seq_len: int

    def check(self, layers: int, kv_heads: int, head_dim: int, where: str) -> None:
        """ValueError (one line) unless both tables are finite, positive and [layers, kv_heads, head_dim]."""
        want = (layers, kv_heads, head_dim)
        for name, t in ((KEY, self.key), (VALUE, self.value)):
            if tuple(t.shape) != want:
                raise ValueError(f"{where}: {name} has shape {list(t.shape)}, the model needs {list(want)}")
            if t.dtype != np.float32 or not (np.isfinite(t).all() and (t > 0).all()):
                raise ValueError(f"{where}: {name} must be finite positive float32 values")


def scales_from_amax(amax: np.ndarray) -> np.ndarray:
    """amax (any shape) -> amax / 127 as float32, an all-zero channel getting the tiniest scale."""
    return np.maximum(np.asarray(amax, np.float32) / np.float32(QMAX), np.float32(TINY)).astype(np.float32)


def pair_amax(k: np.ndarray) -> np.ndarray:
    """k [B, kv_heads, S, head_dim] -> [kv_heads, head_dim]: for channels i and i + head_dim/2, the largest
    norm of the pair over B and S, for both channels."""
    half = k.shape[-1] // 2
    a, b = k[..., :half].astype(np.float32), k[..., half:].astype(np.float32)
    norm = np.sqrt(a * a + b * b).max(axis=(0, 2))  # [kv_heads, half]
    return np.concatenate([norm, norm], axis=-1)


class KVAmax:
    """The running maxima of the calibration windows, layer by layer."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int):
        self.key = np.zeros((layers, kv_heads, head_dim), np.float32)
        self.value = np.zeros_like(self.key)

    def add(self, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        """key, value [B, kv_heads, S, head_dim] of one layer (keys before or after rotary)."""
        np.maximum(self.key[layer], pair_amax(key), out=self.key[layer])
        vmax = np.abs(value).max(axis=(0, 2)).astype(np.float32)
        np.maximum(self.value[layer], vmax, out=self.value[layer])

    def scales(self, windows: int, seq_len: int) -> KVScales:
        """The scales; ValueError when a key or value was not finite."""
        if not (np.isfinite(self.key).all() and np.isfinite(self.value).all()):
            raise ValueError("the model produced non-finite keys or values on the calibration windows")
        return KVScales(scales_from_amax(self.key), scales_from_amax(self.value), windows, seq_len)
