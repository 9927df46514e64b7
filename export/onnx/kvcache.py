"""The KV cache in the graph: float (the concat of past and new, as ever) or quantized (codes + scales).

A quantized cache (``--kv-cache int8|fp8``, IO contract version 3, docs/CONTRACTS.md) stores each key/value
row of one token and one KV head as codes with one float32 scale, computed at run time from that row:

    scale = max(|x|) / qmax        (qmax 127 for int8, 448 for FP8 E4M3; a zero row gets the tiniest scale)
    codes = QuantizeLinear(x / scale, 1, 0)        x: [B, kv_heads, S, head_dim], scale: [B, kv_heads, S, 1]

The new tokens' codes and scales are appended to the past's (``present.{i}.key`` int8 / FP8,
``present.{i}.key_scale`` float32) and attention reads ``codes x scale`` of the whole present, new tokens
included (one per-axis ``DequantizeLinear`` over the [rows, head_dim] view). So what attention reads is
exactly what the cache stores, and a token's codes depend on nothing but its own row: feeding a window in
chunks or in one pass gives the same numbers (cache vs no-cache invariance holds at float round-off), and no
calibration corpus is needed.

Why per token and head: exact for what is stored, no calibration (static per-channel scales clip whatever
the calibration text did not show), one float32 per head_dim codes (6% at head_dim 64), and the perplexity
cost measured on SmolLM2 at 2k context is -0.07% (benchmarks/kv_cache.py). ONNX Runtime CPU runs int8 and
FP8 (E4M3FN) alike. TensorRT: the dequantization's scale is a run-time tensor, which TensorRT's explicit
quantization does not take (export/tensorrt/check.py says so before a build); its KV quantization lives
inside its own attention kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from onnx import TensorProto

from runtime.records import SCALE_SUFFIX

from ..errors import ExportError

KV_CACHES = ("float", "int8", "fp8")


@dataclass(frozen=True)
class KVFormat:
    """How the graph stores the cache: ``name`` as the CLI says it, ``dtype`` as kiln.json's ``io.kv_dtype``."""

    name: str
    dtype: str
    elem: int  # ONNX element type of past/present
    qmax: float = 0.0  # largest code magnitude (quantized formats)
    static: bool = False  # scales are constants in the graph (the ort form, export.onnx.kvstatic): codes only

    @property
    def quantized(self) -> bool:
        return self.qmax > 0


FORMATS = {
    "float": KVFormat("float", "float32", TensorProto.FLOAT),
    "int8": KVFormat("int8", "int8", TensorProto.INT8, 127.0),
    "fp8": KVFormat("fp8", "float8e4m3fn", TensorProto.FLOAT8E4M3FN, 448.0),
}
FLOAT = FORMATS["float"]
STATIC_INT8 = replace(FORMATS["int8"], static=True)
ONNX_TYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int8": TensorProto.INT8,
              "float8e4m3fn": TensorProto.FLOAT8E4M3FN}
TINY = float(np.finfo(np.float32).tiny)  # the scale of an all-zero row: its codes are 0 and so is x


def kv_format(name: str) -> KVFormat:
    if name not in FORMATS:
        raise ExportError(f"--kv-cache must be one of {', '.join(KV_CACHES)}, got {name!r}")
    return FORMATS[name]


def kv_tensors(fmt: KVFormat, layer: int, kvh: int, hd: int):
    """[(past name, present name, dtype, last dim)] of one layer, in graph order: key (+ key_scale), value
    (+ value_scale)."""
    out = []
    for kind in ("key", "value"):
        out.append((f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}", fmt.dtype, hd))
        if fmt.quantized and not fmt.static:
            out.append((f"past_key_values.{layer}.{kind}{SCALE_SUFFIX}", f"present.{layer}.{kind}{SCALE_SUFFIX}",
                        "float32", 1))
    return out


def _unit(b, fmt: KVFormat) -> tuple[str, str]:
    """(scale 1.0, zero point 0 of the code type): the Q/DQ pair's constants, shared by every layer."""
    one = b.const(1.0, "float32")
    key = ("kv_zero_point", fmt.elem)
    if key not in b._consts:
        from onnx import helper

        name = f"/const/kv_zero_point_{fmt.name}"
        b.inits.append(helper.make_tensor(name, fmt.elem, [], [0]))
        b._names.add(name)
        b._consts[key] = name
    return one, b._consts[key]


def quantize(b, fmt: KVFormat, x: str, ns: str) -> tuple[str, str]:
    """x [B,kvh,S,hd] float -> (codes [B,kvh,S,hd], scale [B,kvh,S,1] float32), one scale per token and head."""
    one, zp = _unit(b, fmt)
    amax = b.op("ReduceMax", [b.op("Abs", [x], f"{ns}/Abs"), b.const([-1])], f"{ns}/ReduceMax", keepdims=1)
    scale = b.op("Max", [b.op("Div", [amax, b.const(fmt.qmax, "float32")], f"{ns}/Div_qmax"),
                         b.const(TINY, "float32")], f"{ns}/Max")
    codes = b.op("QuantizeLinear", [b.op("Div", [x, scale], f"{ns}/Div"), one, zp], f"{ns}/QuantizeLinear")
    return codes, scale


def dequantize(b, fmt: KVFormat, codes: str, scale: str, ns: str, hd: int) -> str:
    """codes [B,kvh,T,hd], scale [B,kvh,T,1] -> codes x scale [B,kvh,T,hd] float32, as one per-axis
    ``DequantizeLinear`` over the [B*kvh*T, hd] view (a scale per row). On ONNX Runtime CPU this is 2.4x
    faster than a unit-scale DequantizeLinear followed by a broadcast Mul (benchmarks/kv_cache.py), which is
    what keeps decoding at a long context as fast as the float cache."""
    rows = b.op("Reshape", [codes, b.const([-1, hd])], f"{ns}/Reshape_codes")  # [B*kvh*T, hd]
    s1 = b.op("Reshape", [scale, b.const([-1])], f"{ns}/Reshape_scale")  # [B*kvh*T]
    x = b.op("DequantizeLinear", [rows, s1], f"{ns}/DequantizeLinear", axis=0)
    return b.op("Reshape", [x, b.op("Shape", [codes], f"{ns}/Shape")], f"{ns}/Reshape")


def append(b, fmt: KVFormat, k: str, v: str, layer: int, ns: str, hd: int) -> tuple[str, str]:
    """The new keys/values k, v [B,kvh,S,hd] joined to the past: writes ``present.{layer}.*`` and returns
    what attention reads, [B,kvh,T,hd] float. A float cache is the plain concat (the graph as it always was);
    a quantized one appends codes and scales and dequantizes the whole present."""
    if not fmt.quantized:
        pk = b.op("Concat", [f"past_key_values.{layer}.key", k], f"{ns}/Concat_k", axis=2,
                  outputs=[f"present.{layer}.key"])[0]
        pv = b.op("Concat", [f"past_key_values.{layer}.value", v], f"{ns}/Concat_v", axis=2,
                  outputs=[f"present.{layer}.value"])[0]
        return pk, pv
    full = []
    for kind, x in (("key", k), ("value", v)):
        kns = f"{ns}/{kind}_cache"
        past, present = f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}"
        codes, scale = quantize(b, fmt, x, f"{kns}/quantize")
        ps = b.op("Concat", [past + SCALE_SUFFIX, scale], f"{kns}/Concat_scale", axis=2,
                  outputs=[present + SCALE_SUFFIX])[0]
        if fmt.elem == TensorProto.INT8:
            pc = b.op("Concat", [past, codes], f"{kns}/Concat_codes", axis=2, outputs=[present])[0]
            full.append(dequantize(b, fmt, pc, ps, f"{kns}/dequantize", hd))
            continue
        # FP8: ONNX Runtime has no Concat for float8 types. Join the codes as unit-scale floats (exact: every
        # FP8 value is a float32) and write the present with a QuantizeLinear that reproduces them bit for bit
        one, zp = _unit(b, fmt)
        unit = b.op("Concat", [b.op("DequantizeLinear", [past, one, zp], f"{kns}/DequantizeLinear_past"),
                               b.op("DequantizeLinear", [codes, one, zp], f"{kns}/DequantizeLinear_new")],
                    f"{kns}/Concat_codes", axis=2)
        pc = b.op("QuantizeLinear", [unit, one, zp], f"{kns}/QuantizeLinear_present", outputs=[present])[0]
        full.append(dequantize(b, fmt, pc, ps, f"{kns}/dequantize", hd))
    return full[0], full[1]


def reference_quantize(x: np.ndarray, fmt: KVFormat) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference of ``quantize`` for int8 (tests): (codes int8, scale float32)."""
    amax = np.abs(x).max(axis=-1, keepdims=True)
    scale = np.maximum(amax / np.float32(fmt.qmax), np.float32(TINY)).astype(np.float32)
    codes = np.clip(np.round(x / scale), -128, 127).astype(np.int8)  # np.round: half to even, as QuantizeLinear
    return codes, scale
