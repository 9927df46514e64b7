"""Linear layers, embedding and lm_head, in float or with QDQ the way TensorRT wants it.

Weights are stored pre-quantized and transposed to ``[in, out]`` so ``DequantizeLinear`` feeds ``MatMul``
input 1 directly (symmetric, zero point 0):
  int8  : INT8 codes [in,out], float scale [out], DequantizeLinear(axis=1)
  fp8   : FLOAT8E4M3FN codes [in,out], float scale [out], DequantizeLinear(axis=1)
  int4  : INT4 codes [in,out] (ONNX packing), float scale [in/block,out], DequantizeLinear(axis=0, block_size)
  int8 with groups: INT8 codes [in,out], float scale [in/block,out], DequantizeLinear(axis=0, block_size)
Grouped scales are written at blocks of at most 32 inputs (graph_block); a Linear whose spec asks for the
``fine`` kernel has its scales (per channel or per group) written at blocks of 16, repeated. Activations: static fp8/int8 -> QuantizeLinear -> DequantizeLinear with the calibrated per-tensor scale;
``int8-dyn`` (per token, ORT CPU scheme) -> s_t = max|x_t|/127, Round(x/s_t) * s_t, then the int8 weight
DequantizeLinear -> MatMul as for weight-only (see _dynamic_int8 for why not MatMulInteger).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from runtime.layerspec import ACT_BLOCK, LayerSpec
from runtime.records import POSITIONS

from ..errors import ExportError
from .graph import GraphBuilder

EMBED = "model.embed_tokens"
GRAPH_BLOCK = ACT_BLOCK["fast"]
FINE_BLOCK = ACT_BLOCK["fine"]


# ---- pure array helpers ------------------------------------------------------------------------------
def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., n/2] (element 2j low nibble, 2j+1 high nibble) -> int8 [..., n] in [-8, 7]."""
    lo = (packed & 0x0F).astype(np.int8)
    hi = (packed >> 4).astype(np.int8)
    lo = (lo ^ 8) - 8
    hi = (hi ^ 8) - 8
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.int8)
    out[..., 0::2] = lo
    out[..., 1::2] = hi
    return out


def pack_int4(vals: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], any shape -> flat uint8 bytes in ONNX INT4 packing (row-major pairs)."""
    flat = vals.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


# ---- emission ------------------------------------------------------------------------------------------
def _zero_point(b: GraphBuilder, kind: str) -> str:
    if kind == "fp8":
        key = "/const/zero_point_fp8"
        if key not in b._names:
            b.initializer(key, np.zeros((), np.uint8), elem=TensorProto.FLOAT8E4M3FN, dims=[])
        return key
    return b.const(0, "int8")


def _act_qdq(b: GraphBuilder, w, x: str, module: str, act: str, ns: str) -> str:
    s = b.initializer(f"{module}.input_scale", np.asarray(w.get(f"{module}.input_scale", ()), np.float32))
    q = b.op("QuantizeLinear", [x, s, _zero_point(b, act)], f"{ns}/input_quant/QuantizeLinear")
    return b.op("DequantizeLinear", [q, s, _zero_point(b, act)], f"{ns}/input_quant/DequantizeLinear")


def _dynamic_int8(b: GraphBuilder, w, x: str, module: str, act: str, ns: str) -> str:
    """Per-token symmetric int8 fake quantization of x [B,S,in]: s_t = max|x_t|/127, round(x/s_t) * s_t.

    The product then runs as DequantizeLinear(INT8 weight) -> MatMul, which ONNX Runtime fuses into
    MatMulNBits: its CPU kernel quantizes the (already int8-valued) input again per block and sums in
    int32. An explicit MatMulInteger would be exact but runs s8 x s8 on a slow generic path on CPUs without
    VNNI, and its u8 x s8 / u8 x u8 forms saturate on AVX2 (VPMADDUBSW); docs/QUANTIZATION.md.
    """
    dq = f"{ns}/input_quant"
    amax = b.op("ReduceMax", [b.op("Abs", [x], f"{dq}/Abs"), b.const([-1])], f"{dq}/ReduceMax", keepdims=1)
    st = b.op("Div", [amax, b.const(127.0, "float32")], f"{dq}/Div_scale")  # [B,S,1]
    pos = b.op("Greater", [st, b.const(0.0, "float32")], f"{dq}/Greater")  # an all-zero token gets s_t = 1
    st = b.op("Where", [pos, st, b.const(1.0, "float32")], f"{dq}/Where")
    xq = b.op("Round", [b.op("Div", [x, st], f"{dq}/Div")], f"{dq}/Round")  # [-127, 127]
    return b.op("Mul", [xq, st], f"{dq}/Mul")


# ---- weight emitters: store the codes transposed to [in, out], return the DequantizeLinear output ----------
def _per_channel(b: GraphBuilder, w, module: str, spec: LayerSpec, d_in: int, d_out: int, ns: str) -> str:
    """int8 / fp8 codes [in,out] with one scale per output channel: DequantizeLinear(axis=1)."""
    wname = f"{module}.weight"
    codes = w.get(wname, (d_out, d_in), raw=True)
    scale = w.get(f"{module}.weight_scale", (d_out,))
    if spec.weight == "int8":
        if codes.dtype != np.int8:
            raise ExportError(f"{wname}: int8 codes expected, found {codes.dtype}")
        codes_t = b.initializer(wname, np.ascontiguousarray(codes.T))
    else:  # fp8: raw E4M3FN bytes
        codes_t = b.initializer(wname, np.ascontiguousarray(codes.view(np.uint8).T), elem=TensorProto.FLOAT8E4M3FN)
    s = b.initializer(f"{module}.weight_scale", scale)
    return b.op("DequantizeLinear", [codes_t, s], f"{ns}/weight_quant/DequantizeLinear", axis=1)


def graph_block(group: int | None, kernel: str | None = None) -> int | None:
    """Block size the graph stores a weight's scales at: grouped scales at most GRAPH_BLOCK (each scale
    repeated), because ONNX Runtime's MatMulNBits kernel quantizes the activations per block of the weight's
    block size; the ``fine`` kernel at most FINE_BLOCK, per-channel scales included. The dequantized weights
    are the same numbers (docs/QUANTIZATION.md). None: per-channel scales, DequantizeLinear(axis=1)."""
    cap = FINE_BLOCK if kernel == "fine" else GRAPH_BLOCK
    if group is None:
        return cap if kernel == "fine" else None
    return min(group, cap)


def _blocked_scale(b: GraphBuilder, w, module: str, spec: LayerSpec, d_in: int, d_out: int,
                   name: str | None = None) -> tuple[str, int]:
    """Scales [out, in/g] (or [out] per channel) stored transposed as [in/blk, out] at the graph's block size,
    as initializer ``name`` (default: the module's weight_scale)."""
    g = spec.group_size or d_in
    if d_in % g:
        raise ExportError(f"{module}.weight: in-features {d_in} not divisible by group_size {g}")
    blk = graph_block(spec.group_size, spec.kernel)
    if d_in % blk:
        raise ExportError(f"{module}.weight: in-features {d_in} not divisible by the graph's block of {blk}")
    scale = w.get(f"{module}.weight_scale", (d_out, d_in // g) if spec.group_size else (d_out,)).reshape(d_out, -1)
    st = np.repeat(np.ascontiguousarray(scale.T), g // blk, axis=0)  # [in/blk, out]
    return b.initializer(name or f"{module}.weight_scale", np.ascontiguousarray(st)), blk


def _int4_blocked(b: GraphBuilder, w, module: str, spec: LayerSpec, d_in: int, d_out: int, ns: str) -> str:
    """int4 codes [in,out] (ONNX packing), scales per block of inputs: DequantizeLinear(axis=0, block_size)."""
    wname = f"{module}.weight"
    codes = w.get(wname, (d_out, d_in // 2), raw=True)
    s, blk = _blocked_scale(b, w, module, spec, d_in, d_out)
    codes_t = b.initializer(wname, pack_int4(unpack_int4(codes).T), elem=TensorProto.INT4, dims=[d_in, d_out])
    return b.op("DequantizeLinear", [codes_t, s], f"{ns}/weight_quant/DequantizeLinear", axis=0, block_size=blk)


def _int8_blocked(b: GraphBuilder, w, module: str, spec: LayerSpec, d_in: int, d_out: int, ns: str) -> str:
    """int8 codes [in,out], scales per block of inputs (or per channel, repeated per block for the ``fine``
    kernel): DequantizeLinear(axis=0, block_size)."""
    wname = f"{module}.weight"
    codes = w.get(wname, (d_out, d_in), raw=True)
    if codes.dtype != np.int8:
        raise ExportError(f"{wname}: int8 codes expected, found {codes.dtype}")
    s, blk = _blocked_scale(b, w, module, spec, d_in, d_out)
    codes_t = b.initializer(wname, np.ascontiguousarray(codes.T))
    return b.op("DequantizeLinear", [codes_t, s], f"{ns}/weight_quant/DequantizeLinear", axis=0, block_size=blk)


# (weight format, grouped) -> emitter; (act, granularity) -> input emitter. A new format registers here.
WEIGHT_EMITTERS = {("int8", False): _per_channel, ("fp8", False): _per_channel, ("int4", True): _int4_blocked,
                   ("int8", True): _int8_blocked}
ACT_EMITTERS = {("fp8", "tensor"): _act_qdq, ("int8", "tensor"): _act_qdq, ("int8", "token"): _dynamic_int8}


def _emitter(table: dict, key, module: str, spec: LayerSpec):
    fn = table.get(key)
    if fn is None:
        raise ExportError(f"{module}: the ONNX exporter has no pattern for {spec.label()}")
    return fn


def linear(b: GraphBuilder, w, x: str, module: str, d_in: int, d_out: int, ns: str) -> str:
    """x [B,S,in] -> [B,S,out] for the torch Linear ``module`` (float, or quantized per its LayerSpec)."""
    spec = w.spec(module)
    if spec is None:
        wt = b.initializer(f"{module}.weight", np.ascontiguousarray(w.get(f"{module}.weight", (d_out, d_in)).T))
        y = b.op("MatMul", [x, wt], f"{ns}/MatMul")
    else:
        if spec.act is not None:
            x = _emitter(ACT_EMITTERS, (spec.act, spec.act_granularity), module, spec)(b, w, x, module, spec.act, ns)
        blocked = graph_block(spec.group_size, spec.kernel) is not None
        emit = _emitter(WEIGHT_EMITTERS, (spec.weight, blocked), module, spec)
        y = b.op("MatMul", [x, emit(b, w, module, spec, d_in, d_out, ns)], f"{ns}/MatMul")
    if w.has(f"{module}.bias"):
        bias = b.initializer(f"{module}.bias", w.get(f"{module}.bias", (d_out,)))
        y = b.op("Add", [y, bias], f"{ns}/Add")
    return y


def embedding(b: GraphBuilder, w, arch) -> str:
    """input_ids [B,S] -> [B,S,H]. A quantized (tied) table is gathered as codes + row scales, then scaled."""
    V, H = arch.vocab, arch.hidden
    ns = "/model/embed_tokens"
    spec = w.spec("lm_head") if arch.tied_embeddings else None
    name = f"{EMBED}.weight"
    if spec is None:
        table = b.initializer(name, w.get(name, (V, H)))
        return b.op("Gather", [table, "input_ids"], f"{ns}/Gather", axis=0)
    if spec.group_size is not None:  # blocked scales: dequantize the table, then gather (slow path, rare)
        g = spec.group_size
        if spec.weight == "int4":
            codes = w.get(name, (V, H // 2), raw=True)
            t = b.initializer(name, pack_int4(unpack_int4(codes)), elem=TensorProto.INT4, dims=[V, H])
        else:
            t = b.initializer(name, np.ascontiguousarray(w.get(name, (V, H), raw=True)))
        scale = w.get(f"{EMBED}.weight_scale", (V, H // g))
        s = b.initializer(f"{EMBED}.weight_scale", scale)
        table = b.op("DequantizeLinear", [t, s], f"{ns}/weight_quant/DequantizeLinear", axis=1, block_size=g)
        return b.op("Gather", [table, "input_ids"], f"{ns}/Gather", axis=0)
    # int8 / fp8 per-row codes, stored ONCE transposed to [H, V]: the lm_head reads them as DequantizeLinear ->
    # MatMul input 1 (ORT turns that into its int8 kernel; TensorRT gets its QDQ pattern) and the embedding
    # gathers columns of codes plus their scales (never the whole table).
    codes = w.get(name, (V, H), raw=True)
    scale = w.get(f"{EMBED}.weight_scale", (V,))
    if spec.weight == "int8":
        t = b.initializer(name, np.ascontiguousarray(codes.T))
    else:
        t = b.initializer(name, np.ascontiguousarray(codes.view(np.uint8).T), elem=TensorProto.FLOAT8E4M3FN)
    s = b.initializer(f"{EMBED}.weight_scale", scale)
    cols = b.op("Gather", [t, "input_ids"], f"{ns}/Gather", axis=1)  # codes [H,B,S]
    rows = b.op("Transpose", [cols], f"{ns}/Transpose", perm=[1, 2, 0])  # [B,S,H]
    rs = b.op("Gather", [s, "input_ids"], f"{ns}/Gather_scale", axis=0)  # [B,S]
    rows = b.op("Cast", [rows], f"{ns}/Cast", to=TensorProto.FLOAT)
    rs = b.op("Unsqueeze", [rs, b.const([-1])], f"{ns}/Unsqueeze")
    return b.op("Mul", [rows, rs], f"{ns}/Mul")


def lm_head(b: GraphBuilder, w, h: str, arch) -> str:
    """h [B,S,H] -> logits [B,K,V] for the K positions the ``logits_positions`` input names.
    float: Gemm(transB=1) on the [V,H] table (stored once with a tied embedding), prepacked once by ORT, so
           nothing is transposed per step.
    int8/fp8 tied: DequantizeLinear on the [H,V] codes -> MatMul input 1. The codes are the embedding's bytes
    (stored once) under a second initializer name, so ORT can fuse the head into MatMulNBits; with one shared
    initializer it dequantizes the whole [H,V] table every step.
    untied quantized: an ordinary quantized linear ([H,V] codes).
    int4 tied: blocked DequantizeLinear on the [V,H] table shared with the embedding -> Gemm(transB=1)."""
    V, H = arch.vocab, arch.hidden
    ns = "/model/lm_head"
    spec = w.spec("lm_head")
    tied = arch.tied_embeddings
    h = b.op("Gather", [h, POSITIONS], "/model/logits_positions/Gather", axis=1)  # [B,K,H]
    if spec is not None and not tied:
        y = linear(b, w, h, "lm_head", H, V, ns)
        return b.op("Identity", [y], f"{ns}/Identity", outputs=["logits"])[0]
    if spec is not None and spec.act is not None:
        raise ExportError(f"lm_head: the tied lm_head can only be weight-only, kiln.json says {spec.label()}")
    if spec is not None and spec.group_size is None:
        # the embedding's [H,V] codes and scales, aliased (same bytes in model.onnx.data, stored once)
        codes = b.alias("lm_head.weight", of=f"{EMBED}.weight")
        if spec.kernel == "fine":  # the row scales repeated per block of 16 inputs: [H/16, V]
            scale, blk = _blocked_scale(b, w, EMBED, spec, H, V, name="lm_head.weight_scale")
            dq = b.op("DequantizeLinear", [codes, scale], f"{ns}/weight_quant/DequantizeLinear", axis=0,
                      block_size=blk)
        else:
            scale = b.alias("lm_head.weight_scale", of=f"{EMBED}.weight_scale")
            dq = b.op("DequantizeLinear", [codes, scale], f"{ns}/weight_quant/DequantizeLinear", axis=1)  # [H,V]
        return b.op("MatMul", [h, dq], f"{ns}/MatMul", outputs=["logits"])[0]
    h2 = b.op("Reshape", [h, b.const([-1, H])], f"{ns}/Reshape_in")  # [B*S,H]
    if spec is None:
        table = f"{EMBED}.weight" if tied else b.initializer("lm_head.weight", w.get("lm_head.weight", (V, H)))
    else:  # tied int4: the embedding's dequantized [V,H] table
        table = "/model/embed_tokens/weight_quant/DequantizeLinear/output_0"
    y = b.op("Gemm", [h2, table], f"{ns}/Gemm", transB=1)  # [B*S,V]
    shape = b.op("Concat", [b.op("Shape", [h], f"{ns}/Shape", start=0, end=2), b.const([V])], f"{ns}/Concat",
                 axis=0)
    return b.op("Reshape", [y, shape], f"{ns}/Reshape_out", outputs=["logits"])[0]
