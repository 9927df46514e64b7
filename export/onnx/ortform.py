"""The ONNX Runtime form of the decoder (``--form ort``): the same IO contract, weights and numerics as the
portable graph, with ONNX Runtime's CPU contrib ops where they pay off at decode time.

Per layer: ``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm in one node), one q/k/v product over
the three weights stacked along the output axis (still ``DequantizeLinear -> MatMul`` for quantized weights,
which ONNX Runtime turns into one ``MatMulNBits``), ``Split``, standard ``RotaryEmbedding`` on q and k (3-D,
``num_heads``), and com.microsoft ``GroupQueryAttention`` taking the past KV and writing the present.

The contract stays: ``attention_mask`` [B,T] with left padding and ``position_ids`` [B,S]. GQA is given every
row as T long (``seqlens_k`` = T-1, ``total_sequence_length`` = T) and masks the padded keys through
``attention_bias`` [B,1,S,T] (0 or float32's lowest, a finite value, so a padded query row stays finite); rotary
runs outside GQA so each row keeps its own positions. TensorRT does not parse com.microsoft ops: export the
portable form for it.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .graph import GraphBuilder
from .qdq import linear

MS = "com.microsoft"


class StackedQKV:
    """A ``Weights`` view with one extra module ``{p}.self_attn.qkv_proj``: q, k and v stacked along the
    output axis (weights, scales and int4 codes alike: all are per output row), so one product computes all
    three. ``usable(p)`` is False when the three differ in quantization or carry a bias."""

    PARTS = ("q_proj", "k_proj", "v_proj")

    def __init__(self, w, sizes: tuple[int, int, int]):
        self.w, self.sizes = w, sizes

    def _split(self, name: str):
        base, sep, leaf = name.rpartition(".qkv_proj.")
        return (base, leaf) if sep else (None, None)

    def usable(self, p: str) -> bool:
        mods = [f"{p}.self_attn.{m}" for m in self.PARTS]
        specs = [self.w.spec(m) for m in mods]
        return all(s == specs[0] for s in specs) and not any(self.w.has(f"{m}.bias") for m in mods)

    def has(self, name: str) -> bool:
        base, leaf = self._split(name)
        return self.w.has(name) if base is None else all(self.w.has(f"{base}.{m}.{leaf}") for m in self.PARTS)

    def spec(self, module: str):
        if module.endswith(".qkv_proj"):
            return self.w.spec(module[: -len("qkv_proj")] + "q_proj")
        return self.w.spec(module)

    def get(self, name: str, shape: tuple | None = None, raw: bool = False) -> np.ndarray:
        base, leaf = self._split(name)
        if base is None:
            return self.w.get(name, shape, raw)
        parts = []
        for m, rows in zip(self.PARTS, self.sizes):
            parts.append(self.w.get(f"{base}.{m}.{leaf}", None if shape is None else (rows, *shape[1:]), raw))
        return np.concatenate(parts, axis=0)


def ort_form_refusal(specs: dict) -> str | None:
    """Why the ONNX Runtime form does not take a checkpoint with these LayerSpecs, or None. Static activation
    scales (QuantizeLinear/DequantizeLinear pairs) are TensorRT's form: the portable graph keeps them."""
    static = sorted(n for n, s in specs.items() if s.static_act)
    if static:
        return (f"{len(static)} Linear(s) quantize their input with a static scale (e.g. {static[0]}: "
                f"{specs[static[0]].label()}), which is TensorRT's form")
    return None


def gqa_inputs(b: GraphBuilder) -> tuple[str, str, str]:
    """(seqlens_k [B] int32, total_sequence_length int32 scalar, attention_bias [B,1,S,T] float) from the
    contract's inputs: every row is T long, padded keys get float32's lowest value."""
    ns = "/model/gqa_inputs"
    mshape = b.op("Shape", ["attention_mask"], f"{ns}/Shape_mask")
    t = b.op("Cast", [b.op("Gather", [mshape, b.const(1)], f"{ns}/Gather_t", axis=0)], f"{ns}/Cast_t",
             to=TensorProto.INT32)  # scalar T
    rows = b.op("Gather", [mshape, b.const([0])], f"{ns}/Gather_b", axis=0)  # [1] = B
    seqlens = b.op("Expand", [b.op("Sub", [t, b.const(1, "int32")], f"{ns}/Sub"), rows], f"{ns}/Expand_seqlens")
    keep = b.op("Cast", ["attention_mask"], f"{ns}/Cast_mask", to=TensorProto.BOOL)
    bias = b.op("Where", [keep, b.const(0.0, "float32"), b.const(np.finfo(np.float32).min, "float32")],
                f"{ns}/Where")  # [B,T]
    bias = b.op("Unsqueeze", [bias, b.const([1, 2])], f"{ns}/Unsqueeze")  # [B,1,1,T]
    s = b.op("Gather", [b.op("Shape", ["input_ids"], f"{ns}/Shape_ids"), b.const([1])], f"{ns}/Gather_s", axis=0)
    shape = b.op("Concat", [b.const([1, 1]), s, b.const([1])], f"{ns}/Concat", axis=0)  # [1,1,S,1]
    bias = b.op("Expand", [bias, shape], f"{ns}/Expand_bias")  # [B,1,S,T]
    return seqlens, t, bias


def attention(b: GraphBuilder, w, stacked: StackedQKV, h: str, layer: int, arch, cos: str, sin: str,
              gqa: tuple[str, str, str], ns: str) -> str:
    """h [B,S,H] (normed) -> attention output [B,S,heads*head_dim]; writes present.{layer}.key|value."""
    H, nh, kvh, hd = arch.hidden, arch.heads, arch.kv_heads, arch.head_dim
    p = f"model.layers.{layer}"
    if stacked.usable(p):
        qkv = linear(b, stacked, h, f"{p}.self_attn.qkv_proj", H, (nh + 2 * kvh) * hd, f"{ns}/qkv_proj")
        q, k, v = b.op("Split", [qkv, b.const([nh * hd, kvh * hd, kvh * hd])], f"{ns}/Split", n_out=3, axis=-1)
    else:
        q = linear(b, w, h, f"{p}.self_attn.q_proj", H, nh * hd, f"{ns}/q_proj")
        k = linear(b, w, h, f"{p}.self_attn.k_proj", H, kvh * hd, f"{ns}/k_proj")
        v = linear(b, w, h, f"{p}.self_attn.v_proj", H, kvh * hd, f"{ns}/v_proj")
    q = b.op("RotaryEmbedding", [q, cos, sin, "position_ids"], f"{ns}/q_rotary/RotaryEmbedding", num_heads=nh,
             interleaved=0)
    k = b.op("RotaryEmbedding", [k, cos, sin, "position_ids"], f"{ns}/k_rotary/RotaryEmbedding", num_heads=kvh,
             interleaved=0)
    seqlens, total, bias = gqa
    outs = [f"{ns}/GroupQueryAttention/output_0", f"present.{layer}.key", f"present.{layer}.value"]
    b.op("GroupQueryAttention", [q, k, v, f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
                                 seqlens, total, "", "", "", bias], f"{ns}/GroupQueryAttention", domain=MS,
         outputs=outs, num_heads=nh, kv_num_heads=kvh, scale=float(1.0 / np.sqrt(hd)), do_rotary=0)
    return outs[0]


def skip_rmsnorm(b: GraphBuilder, x: str, delta: str, w: np.ndarray, wname: str, eps: float,
                 ns: str) -> tuple[str, str]:
    """(RMSNorm(x + delta) * w, x + delta) in one com.microsoft node."""
    scale = b.initializer(wname, w)
    outs = [f"{ns}/SkipSimplifiedLayerNormalization/output_0", "", "", f"{ns}/SkipSimplifiedLayerNormalization/output_3"]
    b.op("SkipSimplifiedLayerNormalization", [x, delta, scale], f"{ns}/SkipSimplifiedLayerNormalization",
         domain=MS, outputs=outs, epsilon=eps)
    return outs[0], outs[3]
