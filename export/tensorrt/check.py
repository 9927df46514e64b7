"""The documented constraints TensorRT's ONNX parser puts on a graph, checked before any build.

Sources (TensorRT 10.x / 11.x documentation):
- ONNX-TensorRT ``operators.md``: TensorRT 10.15 parses opsets 9..24, TensorRT 11.x up to 25; only the
  standard ``ai.onnx`` domain (anything else needs a plugin); ``QuantizeLinear``/``DequantizeLinear`` zero
  points must be zero; ``Attention`` takes no ``past_key``/``past_value``/``nonpad_kv_seqlen`` inputs and
  produces no ``present_*``/``qk_matmul_output`` outputs; ``RotaryEmbedding`` ``position_ids`` must be INT64.
- "Working with Quantized Types" and the ``IDequantizeLayer`` reference: symmetric quantization only; the
  scale is a build-time constant (scalar per-tensor, 1-D per-channel, 2-D for INT4 block quantization);
  INT4 is weight-only (no ``QuantizeLinear`` to INT4); DQ inputs are INT8, FP8 E4M3, INT4 or FP4;
  low-precision constants are consumed by ``DequantizeLinear`` only.
- Operators ``operators.md`` lists as unsupported (``MatMulInteger``, ``DynamicQuantizeLinear``, sequences, ...).
- This project additionally refuses ``If``/``Loop`` (data-dependent control flow defeats the optimization
  profiles this stage builds).

``onnx_violations(model)`` is pure (a ModelProto in, a list of violations out); ``check_onnx(path)`` loads
the graph without its external data (reading only the few small tensors it must look at, after checking that
every external-data location is a plain file inside the graph's dir) and raises
``ExportError`` listing what is wrong.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExportError

STANDARD_DOMAINS = ("", "ai.onnx")
MIN_OPSET = 9
MAX_OPSET = {10: 24, 11: 25}  # per major version, from the documentation of 10.15 and 11.x
FORBIDDEN_OPS = ("If", "Loop")
# Standard-domain operators operators.md (TensorRT 10.15) marks unsupported ("N").
UNSUPPORTED_OPS = frozenset([
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im",
    "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det",
    "DynamicQuantizeLinear", "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix",
    "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement",
    "QLinearConv", "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty",
    "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss",
    "SplitToSequence", "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique"
])


@dataclass(frozen=True)
class Violation:
    rule: str  # short id: domain, opset, control-flow, zero-point, scale, qtype, int4-weight-only, ...
    where: str  # node or tensor name
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.where}: {self.message}"


def opset_range(trt_version: str | None = None) -> tuple[int, int]:
    """Inclusive ONNX opset range the parser of ``trt_version`` documents (10.x when unknown)."""
    major = 10
    if trt_version:
        try:
            major = int(str(trt_version).split(".")[0])
        except ValueError:
            raise ExportError(f"TensorRT version {trt_version!r} is not of the form MAJOR.MINOR[.PATCH]") from None
    if major not in MAX_OPSET:
        raise ExportError(f"TensorRT {trt_version} is not supported by this llmkiln; use TensorRT 10.x or 11.x")
    return MIN_OPSET, MAX_OPSET[major]


def _onnx():
    import onnx
    from onnx import TensorProto

    return onnx, TensorProto


# ---- helpers over the graph -------------------------------------------------------------------------------
def _all_nodes(graph):
    """Every node, including those in subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Consts:
    """Build-time constants of the top graph: initializers and ``Constant`` node outputs."""

    def __init__(self, graph, base_dir: Path | None):
        self.base_dir = base_dir
        self.tensors = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
                v = _attr(node, "value")
                if v is not None:
                    self.tensors[node.output[0]] = v
        self.fed_by_constant_dq = {}

    def has(self, name: str) -> bool:
        return name in self.tensors

    def dtype(self, name: str) -> int:
        return self.tensors[name].data_type

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name].dims)

    def array(self, name: str):
        from onnx import numpy_helper

        t = self.tensors[name]
        return numpy_helper.to_array(t, base_dir=str(self.base_dir) if self.base_dir else "")


# ---- the rules ---------------------------------------------------------------------------------------------
def _check_opset(model, lo, hi, out):
    versions = {o.domain: o.version for o in model.opset_import}
    v = versions.get("", versions.get("ai.onnx"))
    if v is None:
        out.append(Violation("opset", "model", "no opset for the standard ONNX domain is imported"))
    elif not lo <= v <= hi:
        out.append(Violation("opset", "model", f"opset {v} is outside the range {lo}..{hi} TensorRT parses"))


def _check_nodes(model, out):
    for node in _all_nodes(model.graph):
        where = node.name or f"{node.op_type}->{','.join(node.output)}"
        if node.domain not in STANDARD_DOMAINS:
            out.append(Violation("domain", where, f"{node.domain}::{node.op_type} is outside the standard ONNX "
                                                  "domain; TensorRT parses only ai.onnx operators"))
        if node.op_type in UNSUPPORTED_OPS and node.domain in STANDARD_DOMAINS:
            hint = (" (integer matmul of dynamically quantized activations: quantize with static scales, "
                    "--scheme int8-sq)") if node.op_type in ("MatMulInteger", "DynamicQuantizeLinear") else ""
            out.append(Violation("unsupported-op", where, f"{node.op_type} is not supported by the TensorRT ONNX "
                                                          f"parser{hint}"))
        if node.op_type in FORBIDDEN_OPS and node.domain in STANDARD_DOMAINS:
            out.append(Violation("control-flow", where, f"{node.op_type} (data-dependent control flow) is not "
                                                        "allowed in a TensorRT build input"))


def _qdq_types(TensorProto):
    ok = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4}
    if hasattr(TensorProto, "FLOAT4E2M1"):
        ok.add(TensorProto.FLOAT4E2M1)
    return ok


def _low_precision(TensorProto):
    # "INT8, INT4, FP8 and FP4 are treated as Quantized Types ... support is available only through
    # quantization from a floating-point type" (operators.md): such constants only make sense into a DQ
    lp = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2,
          TensorProto.FLOAT8E5M2FNUZ, TensorProto.INT4, TensorProto.UINT4}
    if hasattr(TensorProto, "FLOAT4E2M1"):
        lp.add(TensorProto.FLOAT4E2M1)
    return lp


def _check_qdq(model, consts: _Consts, elem_types: dict, out):
    _, TensorProto = _onnx()
    allowed = _qdq_types(TensorProto)
    tname = TensorProto.DataType.Name
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in STANDARD_DOMAINS:
            continue
        where = node.name or node.output[0]
        scale = node.input[1] if len(node.input) > 1 else ""
        zp = node.input[2] if len(node.input) > 2 else ""
        if not consts.has(scale):
            out.append(Violation("scale", where, f"scale {scale!r} is computed at run time; TensorRT needs a "
                                                 "build-time constant (static calibrated scales)"))
        elif len(consts.shape(scale)) > 2:
            out.append(Violation("scale", where, f"scale has rank {len(consts.shape(scale))}; TensorRT takes a "
                                                 "scalar, a 1-D (per-channel) or a 2-D (INT4 block) scale"))
        if zp:
            if not consts.has(zp):
                out.append(Violation("zero-point", where, f"zero point {zp!r} is not a constant"))
            elif bool((consts.array(zp).astype("float64") != 0).any()):
                out.append(Violation("zero-point", where, "zero point is not all zeros; TensorRT supports "
                                                          "symmetric quantization only"))
        if node.op_type == "QuantizeLinear":
            qt = _attr(node, "output_dtype", 0) or (consts.dtype(zp) if zp and consts.has(zp) else TensorProto.UINT8)
            if qt in (TensorProto.INT4, TensorProto.UINT4):
                out.append(Violation("int4-weight-only", where, "QuantizeLinear to INT4: TensorRT supports INT4 "
                                                                "for weight-only quantization (constant weights "
                                                                "into DequantizeLinear) only"))
            elif qt not in allowed:
                out.append(Violation("qtype", where, f"quantizes to {tname(qt)}; TensorRT quantizes to INT8, "
                                                     "FP8 E4M3 (or FP4)"))
            continue
        x = node.input[0]
        xt = consts.dtype(x) if consts.has(x) else elem_types.get(x)
        if xt is not None and xt not in allowed:
            out.append(Violation("qtype", where, f"dequantizes {tname(xt)}; TensorRT dequantizes INT8, "
                                                 "FP8 E4M3, INT4 (or FP4)"))
        if xt in (TensorProto.INT4, TensorProto.UINT4):
            _check_int4_dq(node, where, consts, out)


def _check_int4_dq(node, where, consts: _Consts, out):
    x, scale = node.input[0], node.input[1]
    if not consts.has(x):
        out.append(Violation("int4-weight-only", where, "INT4 input is not a constant weight; TensorRT supports "
                                                        "INT4 as weight-only quantization"))
        return
    xs = consts.shape(x)
    if len(xs) != 2:
        out.append(Violation("int4-block", where, f"INT4 weight has rank {len(xs)}; block quantization takes "
                                                  "2-D weights"))
        return
    if not consts.has(scale):
        return  # reported by the scale rule
    ss = consts.shape(scale)
    block = int(_attr(node, "block_size", 0) or 0)
    axis = int(_attr(node, "axis", 1))
    axis = axis + 2 if axis < 0 else axis
    if block <= 0:
        if len(ss) > 1:
            out.append(Violation("int4-block", where, f"2-D scale {ss} without a block_size attribute"))
        return
    if axis not in (0, 1):
        out.append(Violation("int4-block", where, f"blocked axis {axis} is not an axis of the 2-D weight"))
        return
    want = list(xs)
    want[axis] = math.ceil(xs[axis] / block)
    if len(ss) != 2 or ss != want:
        out.append(Violation("int4-block", where, f"scale shape {ss} does not match weight {xs} blocked by "
                                                  f"{block} along axis {axis} (expected {want})"))
    elif xs[axis] % block:
        out.append(Violation("int4-block", where, f"weight dim {xs[axis]} along axis {axis} is not a multiple "
                                                  f"of block_size {block}"))


def _check_low_precision_consumers(model, consts: _Consts, out):
    _, TensorProto = _onnx()
    lp = _low_precision(TensorProto)
    consumers: dict[str, list] = {}
    for node in _all_nodes(model.graph):
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    outputs = {o.name for o in model.graph.output}
    for name, t in consts.tensors.items():
        if t.data_type not in lp:
            continue
        tn = TensorProto.DataType.Name(t.data_type)
        if t.data_type in (TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ, TensorProto.FLOAT8E4M3FNUZ):
            out.append(Violation("qtype", name, f"{tn} constants are not a TensorRT type (FP8 is E4M3FN)"))
        # allowed: the quantized input of a DQ, or the zero point (input 2) of a Q/DQ, which only types it
        bad = [n for n, i in consumers.get(name, []) if not ((n.op_type == "DequantizeLinear" and i in (0, 2))
                                                             or (n.op_type == "QuantizeLinear" and i == 2))]
        if bad or name in outputs:
            ops = sorted({n.op_type for n in bad})
            what = ", ".join(ops) or "a graph output"
            hint = (" (a quantized embedding table: keep lm_head/embeddings float with `kiln compress quantize "
                    "--ignore lm_head` for TensorRT)") if "Gather" in ops else ""
            out.append(Violation("quantized-constant", name, f"{tn} constant feeds {what}; quantized constants "
                                                             f"may only feed DequantizeLinear{hint}"))


def _check_attention(model, elem_types: dict, ranks: dict, out):
    _, TensorProto = _onnx()
    for node in _all_nodes(model.graph):
        if node.domain not in STANDARD_DOMAINS:
            continue
        where = node.name or node.output[0]
        if node.op_type == "Attention":
            for i, what in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
                if len(node.input) > i and node.input[i]:
                    out.append(Violation("attention", where, f"Attention input {what} is unsupported by TensorRT "
                                                             "(export with --opset 21: plain attention ops)"))
            for i, what in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
                if len(node.output) > i and node.output[i]:
                    out.append(Violation("attention", where, f"Attention output {what} is unsupported by TensorRT"))
            for a in ("qk_matmul_output_mode", "softcap"):
                if _attr(node, a) not in (None, 0, 0.0):
                    out.append(Violation("attention", where, f"Attention attribute {a} is unsupported by TensorRT"))
            for i, what in ((0, "Q"), (1, "K"), (2, "V"), (3, "attn_mask")):
                if len(node.input) > i and node.input[i] and ranks.get(node.input[i], 4) != 4:
                    out.append(Violation("attention", where, f"Attention {what} has rank "
                                                             f"{ranks[node.input[i]]}; TensorRT needs 4-D"))
        elif node.op_type == "RotaryEmbedding" and len(node.input) > 3 and node.input[3]:
            t = elem_types.get(node.input[3])
            if t is not None and t != TensorProto.INT64:
                out.append(Violation("rotary", where, "RotaryEmbedding position_ids must be INT64"))


def _types_and_ranks(model):
    """Element types and ranks of every value TensorRT would see (after ONNX shape inference)."""
    onnx, _ = _onnx()
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is a help for the checks, never a requirement
        inferred = model
    g = inferred.graph
    types, ranks = {}, {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            ranks[vi.name] = len(tt.shape.dim)
    for t in g.initializer:
        types[t.name] = t.data_type
        ranks[t.name] = len(t.dims)
    return types, ranks


def onnx_violations(model, *, trt_version: str | None = None, base_dir: str | Path | None = None) -> list[Violation]:
    """All documented TensorRT constraints ``model`` (a ModelProto) breaks; empty when it is fit to build."""
    lo, hi = opset_range(trt_version)
    out: list[Violation] = []
    _check_opset(model, lo, hi, out)
    _check_nodes(model, out)
    consts = _Consts(model.graph, Path(base_dir) if base_dir else None)
    types, ranks = _types_and_ranks(model)
    _check_qdq(model, consts, types, out)
    _check_low_precision_consumers(model, consts, out)
    _check_attention(model, types, ranks, out)
    return out


def check_onnx(path: str | Path, *, trt_version: str | None = None) -> dict:
    """Check ``path`` (model.onnx or an ONNX artifact dir) against TensorRT's documented constraints.

    Raises ExportError naming every violation (the first ten, and how many more); returns a short summary
    (opset, node count, Q/DQ counts) when the graph is fit to build.
    """
    onnx, _ = _onnx()
    p = Path(path)
    if p.is_dir():
        p = p / "model.onnx"
    if not p.is_file():
        raise ExportError(f"{path}: no model.onnx here; pass an ONNX artifact dir or a .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise ExportError(f"{p}: not a readable ONNX model ({e})") from None
    from runtime.onnx_files import check_model_locations

    check_model_locations(model, p.parent, error=ExportError)  # the checks below read small external tensors
    found = onnx_violations(model, trt_version=trt_version, base_dir=p.parent)
    if found:
        shown = "; ".join(str(v) for v in found[:10])
        more = f" (and {len(found) - 10} more)" if len(found) > 10 else ""
        raise ExportError(f"{p}: {len(found)} TensorRT constraint violation(s): {shown}{more}")
    ops = [n.op_type for n in model.graph.node]
    opset = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), None)
    return {"path": str(p), "opset": opset, "nodes": len(ops), "quantize_linear": ops.count("QuantizeLinear"),
            "dequantize_linear": ops.count("DequantizeLinear"), "trt_opset_range": list(opset_range(trt_version))}
