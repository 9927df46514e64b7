"""``kiln compress quantize --kv-cache int8``: static int8 KV-cache scales measured on the quantize pass's own
calibration stream and recorded in the checkpoint (``kv_cache/scales.safetensors`` + kiln.json's ``kv_cache``).

While the quant stream runs through each finished decoder layer, forward hooks on ``k_proj`` and ``v_proj``
see that layer's keys (before rotary, whose pair norms are the same after it) and values as the quantized
model computes them; runtime.kvscales turns their maxima into one scale per layer, KV head and channel. (The
stream starts from the float embedding: where a tied table is quantized with the lm_head, the checkpoint's
layer inputs differ from it by that table's rounding, 0.5% in the keys' maxima of a tiny test model.) The
export of the ONNX Runtime form (``--form ort --kv-cache int8``) then takes these instead of calibrating the
float-cache graph itself.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from runtime.kvscales import KEY, KV_SCALES_FILE, VALUE, KVAmax
from runtime.records import KVCacheRecord

from ..errors import CompressError

KV_FORMATS = ("int8",)


class KVObserver:
    """The keys' and values' maxima of every layer the quant stream runs through."""

    def __init__(self, config):
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers = config.num_hidden_layers
        self.amax = KVAmax(self.layers, self.kv_heads, self.head_dim)
        self.seen: set[int] = set()

    def _heads(self, out) -> np.ndarray:
        """A projection's output [B, S, kv_heads * head_dim] -> [B, kv_heads, S, head_dim] float32 numpy."""
        b, s, _ = out.shape
        return out.detach().float().reshape(b, s, self.kv_heads, self.head_dim).transpose(1, 2).cpu().numpy()

    @contextmanager
    def watching(self, index: int, layer):
        """Hooks on ``layer``'s k_proj and v_proj while the quant stream runs through it."""
        attn = layer.self_attn
        last: dict[str, np.ndarray] = {}

        def key(_m, _args, out):
            last["key"] = self._heads(out)

        def value(_m, _args, out):  # v_proj runs after k_proj in each window (LlamaAttention.forward)
            if "key" not in last:
                raise CompressError(f"--kv-cache: layer {index}'s v_proj ran before its k_proj")
            self.amax.add(index, last.pop("key"), self._heads(out))

        handles = [attn.k_proj.register_forward_hook(key), attn.v_proj.register_forward_hook(value)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self.seen.add(index)

    def save(self, root: Path, corpus: str, windows: int, seq_len: int) -> KVCacheRecord:
        """Write ``root``/kv_cache/scales.safetensors and return the record kiln.json keeps of it."""
        from safetensors.numpy import save_file

        missing = sorted(set(range(self.layers)) - self.seen)
        if missing:
            raise CompressError(f"--kv-cache: the calibration stream did not reach layer(s) {missing[:4]}")
        try:
            scales = self.amax.scales(windows, seq_len)
        except ValueError as e:
            raise CompressError(f"--kv-cache int8: {e}") from None
        path = Path(root) / KV_SCALES_FILE
        path.parent.mkdir(exist_ok=True)
        save_file({KEY: scales.key, VALUE: scales.value}, str(path))
        return KVCacheRecord(format="int8", calibrated_by="quantize", corpus=corpus, windows=windows,
                             seq_len=seq_len, file=KV_SCALES_FILE)
