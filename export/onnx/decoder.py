"""The Llama-style decoder graph, built from the weights (no tracing).

IO (docs/CONTRACTS.md, IO contract version 2):
  input_ids [B,S] int64, attention_mask [B,T] int64, position_ids [B,S] int64, logits_positions [K] int64,
  past_key_values.{i}.key|value [B,kv_heads,P,head_dim] float32   (P = T - S; zero-length on the first call)
  -> logits [B,K,vocab] float32 (the K positions asked for), present.{i}.key|value [B,kv_heads,T,head_dim]
A quantized cache (``kv``, IO contract version 3) makes past/present int8 or FP8 codes with float32
``.key_scale`` / ``.value_scale`` tensors [B,kv_heads,P|T,1] beside them (``kvcache``); the ort form's int8
cache (version 4) is codes only, its scales constants in the graph (``kvstatic``).

``fused=True`` uses the opset-23 ``RMSNormalization`` / ``RotaryEmbedding`` / ``Attention`` ops; otherwise the
same math is written with plain opset-21 ops. ``form="ort"`` builds the ONNX Runtime form (``ortform``) with
the same IO. Linear layers and embeddings come from ``qdq``.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from runtime.records import POSITIONS, IOSpec, TensorSpec, io_version

from . import kvcache, ortform
from .graph import GraphBuilder
from .kvcache import ONNX_TYPES
from .qdq import embedding, lm_head, linear


def io_tensors(arch, kv: kvcache.KVFormat = kvcache.FLOAT) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of the IO contract (docs/CONTRACTS.md) for ``arch`` and the cache format ``kv``."""
    kvh, hd = arch.kv_heads, arch.head_dim
    inputs = [TensorSpec("input_ids", "int64", ("batch", "seq")),
              TensorSpec("attention_mask", "int64", ("batch", "total_seq")),
              TensorSpec("position_ids", "int64", ("batch", "seq")),
              TensorSpec(POSITIONS, "int64", (POSITIONS,))]
    outputs = [TensorSpec("logits", "float32", ("batch", POSITIONS, arch.vocab))]
    for i in range(arch.layers):
        for past, present, dtype, last in kvcache.kv_tensors(kv, i, kvh, hd):
            inputs.append(TensorSpec(past, dtype, ("batch", kvh, "past_seq", last)))
            outputs.append(TensorSpec(present, dtype, ("batch", kvh, "total_seq", last)))
    return tuple(inputs), tuple(outputs)


def io_spec(arch, *, form: str, opset: int, exporter: str = "kiln", weight_block: int | None = None,
            kv: kvcache.KVFormat = kvcache.FLOAT) -> IOSpec:
    """The ``io`` record of kiln.json (version 2 for a float cache, 3 for a quantized one with per-token scale
    tensors, 4 for the ort form's int8 cache with static scales)."""
    inputs, outputs = io_tensors(arch, kv)
    return IOSpec(version=io_version(kv.dtype, kv.static), form=form, opset=opset, inputs=inputs, outputs=outputs,
                  kv_dtype=kv.dtype, exporter=exporter, weight_block=weight_block)


def _rmsnorm(b: GraphBuilder, x: str, w: np.ndarray, eps: float, ns: str, wname: str, fused: bool) -> str:
    scale = b.initializer(wname, w)
    if fused:
        return b.op("RMSNormalization", [x, scale], f"{ns}/RMSNormalization", axis=-1, epsilon=eps)
    sq = b.op("Pow", [x, b.const(2.0, "float32")], f"{ns}/Pow")
    ms = b.op("ReduceMean", [sq, b.const([-1])], f"{ns}/ReduceMean", keepdims=1)
    var = b.op("Add", [ms, b.const(eps, "float32")], f"{ns}/Add")
    rs = b.op("Sqrt", [var], f"{ns}/Sqrt")
    n = b.op("Div", [x, rs], f"{ns}/Div")
    return b.op("Mul", [n, scale], f"{ns}/Mul")


def _heads(b: GraphBuilder, x: str, n: int, hd: int, ns: str) -> str:
    """[B,S,n*hd] -> [B,n,S,hd]"""
    r = b.op("Reshape", [x, b.const([0, 0, n, hd])], f"{ns}/Reshape")
    return b.op("Transpose", [r], f"{ns}/Transpose", perm=[0, 2, 1, 3])


def _rope_plain(b: GraphBuilder, x: str, cos: str, sin: str, half: int, ns: str) -> str:
    """x [B,n,S,hd], cos/sin [B,1,S,hd/2] -> rotate-half RoPE (Llama layout)."""
    x1, x2 = b.op("Split", [x, b.const([half, half])], f"{ns}/Split", n_out=2, axis=-1)
    a = b.op("Sub", [b.op("Mul", [x1, cos], f"{ns}/Mul_0"), b.op("Mul", [x2, sin], f"{ns}/Mul_1")], f"{ns}/Sub")
    c = b.op("Add", [b.op("Mul", [x2, cos], f"{ns}/Mul_2"), b.op("Mul", [x1, sin], f"{ns}/Mul_3")], f"{ns}/Add")
    return b.op("Concat", [a, c], f"{ns}/Concat", axis=-1)


def _masks(b: GraphBuilder) -> str:
    """Boolean [B,1,S,T]: key j visible to query i iff attention_mask[b,j] and j <= P+i; the diagonal always
    (a padded query then attends to itself, which keeps every row finite)."""
    ns = "/model/attn_mask"
    s = b.op("Gather", [b.op("Shape", ["input_ids"], f"{ns}/Shape_0"), b.const(1)], f"{ns}/Gather_0", axis=0)
    t = b.op("Gather", [b.op("Shape", ["attention_mask"], f"{ns}/Shape_1"), b.const(1)], f"{ns}/Gather_1", axis=0)
    p = b.op("Sub", [t, s], f"{ns}/Sub")
    qpos = b.op("Unsqueeze", [b.op("Range", [p, t, b.const(1)], f"{ns}/Range_0"), b.const([1])], f"{ns}/Unsqueeze_0")
    kpos = b.op("Unsqueeze", [b.op("Range", [b.const(0), t, b.const(1)], f"{ns}/Range_1"), b.const([0])],
                f"{ns}/Unsqueeze_1")
    causal = b.op("LessOrEqual", [kpos, qpos], f"{ns}/LessOrEqual")  # [S,T]
    diag = b.op("Equal", [kpos, qpos], f"{ns}/Equal")
    pad = b.op("Cast", ["attention_mask"], f"{ns}/Cast", to=TensorProto.BOOL)
    pad = b.op("Unsqueeze", [pad, b.const([1, 2])], f"{ns}/Unsqueeze_2")  # [B,1,1,T]
    vis = b.op("And", [causal, pad], f"{ns}/And")
    return b.op("Or", [vis, diag], f"{ns}/Or")  # [B,1,S,T]


def _attention_plain(b, q, k, v, mask, layer, arch, ns, kv) -> tuple[str, str, str]:
    nh, kvh, hd = arch.heads, arch.kv_heads, arch.head_dim
    rep = nh // kvh
    pk, pv = kvcache.append(b, kv, k, v, layer, ns, hd)  # [B,kvh,T,hd] float: what the cache holds
    qg = b.op("Reshape", [q, b.const([0, kvh, rep, -1, hd])], f"{ns}/Reshape_q")  # [B,kvh,rep,S,hd]
    kt = b.op("Transpose", [pk], f"{ns}/Transpose_k", perm=[0, 1, 3, 2])  # [B,kvh,hd,T]
    kt = b.op("Unsqueeze", [kt, b.const([2])], f"{ns}/Unsqueeze_k")  # [B,kvh,1,hd,T]
    sc = b.op("MatMul", [qg, kt], f"{ns}/MatMul_qk")  # [B,kvh,rep,S,T]
    sc = b.op("Mul", [sc, b.const(1.0 / np.sqrt(hd), "float32")], f"{ns}/Mul_scale")
    m5 = b.op("Unsqueeze", [mask, b.const([1])], f"{ns}/Unsqueeze_m")  # [B,1,1,S,T]
    sc = b.op("Where", [m5, sc, b.const(-np.inf, "float32")], f"{ns}/Where")
    pr = b.op("Softmax", [sc], f"{ns}/Softmax", axis=-1)
    v5 = b.op("Unsqueeze", [pv, b.const([2])], f"{ns}/Unsqueeze_v")  # [B,kvh,1,T,hd]
    o = b.op("MatMul", [pr, v5], f"{ns}/MatMul_pv")  # [B,kvh,rep,S,hd]
    o = b.op("Reshape", [o, b.const([0, nh, -1, hd])], f"{ns}/Reshape_o")  # [B,nh,S,hd]
    o = b.op("Transpose", [o], f"{ns}/Transpose_o", perm=[0, 2, 1, 3])
    o = b.op("Reshape", [o, b.const([0, 0, nh * hd])], f"{ns}/Reshape_out")  # [B,S,nh*hd]
    return o, pk, pv


def _mlp(b: GraphBuilder, w, h: str, arch, p: str, ns: str) -> str:
    """SwiGLU MLP of layer ``p``: h [B,S,H] (normed) -> down_proj(silu(gate_proj(h)) * up_proj(h)) [B,S,H]."""
    H, inter = arch.hidden, arch.intermediate
    g = linear(b, w, h, f"{p}.mlp.gate_proj", H, inter, f"{ns}/mlp/gate_proj")
    u = linear(b, w, h, f"{p}.mlp.up_proj", H, inter, f"{ns}/mlp/up_proj")
    g = b.op("Mul", [g, b.op("Sigmoid", [g], f"{ns}/mlp/act/Sigmoid")], f"{ns}/mlp/act/Mul")
    return linear(b, w, b.op("Mul", [g, u], f"{ns}/mlp/Mul"), f"{p}.mlp.down_proj", inter, H, f"{ns}/mlp/down_proj")


def build_decoder(b: GraphBuilder, w, arch, rope_cos: np.ndarray, rope_sin: np.ndarray, fused: bool,
                  progress=None, form: str = "portable", kv: kvcache.KVFormat = kvcache.FLOAT) -> None:
    """Emit the whole graph into ``b``. rope_cos/sin: [max_position, head_dim/2] float32 (scaling applied).
    ``form="ort"`` needs ``fused`` (opset 23) and a float cache; ``kv``: how the cache is stored."""
    H, nh, kvh, hd = arch.hidden, arch.heads, arch.kv_heads, arch.head_dim
    if form == "ort" and kv.quantized:
        raise ValueError("the ort form builds a float KV cache only")
    inputs, outputs = io_tensors(arch, kv)
    for t in inputs:
        b.input(t.name, ONNX_TYPES[t.dtype], list(t.shape))
    for t in outputs:
        b.output(t.name, ONNX_TYPES[t.dtype], list(t.shape))

    x = embedding(b, w, arch)  # [B,S,H]
    b.boundaries = []  # per layer (input names, output names) of the residual stream: validate_layers cuts there
    cos = b.initializer("/model/rotary/cos_cache", rope_cos.astype(np.float32))
    sin = b.initializer("/model/rotary/sin_cache", rope_sin.astype(np.float32))
    if form == "ort":
        return _build_ort(b, w, arch, x, cos, sin, progress)
    mask = _masks(b)
    if not fused:
        ns = "/model/rotary"
        cg = b.op("Gather", [cos, "position_ids"], f"{ns}/Gather_cos", axis=0)  # [B,S,hd/2]
        sg = b.op("Gather", [sin, "position_ids"], f"{ns}/Gather_sin", axis=0)
        cos_b = b.op("Unsqueeze", [cg, b.const([1])], f"{ns}/Unsqueeze_cos")  # [B,1,S,hd/2]
        sin_b = b.op("Unsqueeze", [sg, b.const([1])], f"{ns}/Unsqueeze_sin")
    for i in range(arch.layers):
        p, ns = f"model.layers.{i}", f"/model/layers.{i}"
        x_in = x
        h = _rmsnorm(b, x, w.get(f"{p}.input_layernorm.weight", (H,)), arch.rms_eps, f"{ns}/input_layernorm",
                     f"{p}.input_layernorm.weight", fused)
        q = linear(b, w, h, f"{p}.self_attn.q_proj", H, nh * hd, f"{ns}/attn/q_proj")
        k = linear(b, w, h, f"{p}.self_attn.k_proj", H, kvh * hd, f"{ns}/attn/k_proj")
        v = linear(b, w, h, f"{p}.self_attn.v_proj", H, kvh * hd, f"{ns}/attn/v_proj")
        if fused:  # 4-D Attention without past inputs: the form TensorRT's parser accepts
            q4 = b.op("RotaryEmbedding", [_heads(b, q, nh, hd, f"{ns}/attn/q_heads"), cos, sin, "position_ids"],
                      f"{ns}/attn/q_rotary/RotaryEmbedding", interleaved=0)  # [B,nh,S,hd]
            k4 = b.op("RotaryEmbedding", [_heads(b, k, kvh, hd, f"{ns}/attn/k_heads"), cos, sin, "position_ids"],
                      f"{ns}/attn/k_rotary/RotaryEmbedding", interleaved=0)  # [B,kvh,S,hd]
            v4 = _heads(b, v, kvh, hd, f"{ns}/attn/v_heads")
            pk, pv = kvcache.append(b, kv, k4, v4, i, f"{ns}/attn", hd)  # [B,kvh,T,hd] float
            o = b.op("Attention", [q4, pk, pv, mask], f"{ns}/attn/Attention",
                     scale=float(1.0 / np.sqrt(hd)))  # [B,nh,S,hd], GQA from the head counts
            o = b.op("Transpose", [o], f"{ns}/attn/Transpose_o", perm=[0, 2, 1, 3])
            o = b.op("Reshape", [o, b.const([0, 0, nh * hd])], f"{ns}/attn/Reshape_out")  # [B,S,nh*hd]
        else:
            q4 = _rope_plain(b, _heads(b, q, nh, hd, f"{ns}/attn/q_heads"), cos_b, sin_b, hd // 2,
                             f"{ns}/attn/q_rotary")
            k4 = _rope_plain(b, _heads(b, k, kvh, hd, f"{ns}/attn/k_heads"), cos_b, sin_b, hd // 2,
                             f"{ns}/attn/k_rotary")
            v4 = _heads(b, v, kvh, hd, f"{ns}/attn/v_heads")
            o, _, _ = _attention_plain(b, q4, k4, v4, mask, i, arch, f"{ns}/attn", kv)
        o = linear(b, w, o, f"{p}.self_attn.o_proj", nh * hd, H, f"{ns}/attn/o_proj")
        x = b.op("Add", [x, o], f"{ns}/attn_residual/Add")
        h = _rmsnorm(b, x, w.get(f"{p}.post_attention_layernorm.weight", (H,)), arch.rms_eps,
                     f"{ns}/post_attention_layernorm", f"{p}.post_attention_layernorm.weight", fused)
        x = b.op("Add", [x, _mlp(b, w, h, arch, p, ns)], f"{ns}/mlp_residual/Add")
        b.boundaries.append(([x_in], [x]))
        if progress is not None:
            progress()
    h = _rmsnorm(b, x, w.get("model.norm.weight", (H,)), arch.rms_eps, "/model/norm", "model.norm.weight", fused)
    b.boundaries.append(([x], ["logits"]))
    lm_head(b, w, h, arch)


def _build_ort(b: GraphBuilder, w, arch, x: str, cos: str, sin: str, progress) -> None:
    """The layers and head in the ONNX Runtime form (see ``ortform``); residual adds ride in the norms."""
    H, nh, kvh, hd = arch.hidden, arch.heads, arch.kv_heads, arch.head_dim
    gqa = ortform.gqa_inputs(b)
    stacked = ortform.StackedQKV(w, (nh * hd, kvh * hd, kvh * hd))
    delta = None  # the branch output still to be added to the residual stream x
    for i in range(arch.layers):
        p, ns = f"model.layers.{i}", f"/model/layers.{i}"
        ins = [x] if delta is None else [x, delta]
        wn = w.get(f"{p}.input_layernorm.weight", (H,))
        if delta is None:
            h = _rmsnorm(b, x, wn, arch.rms_eps, f"{ns}/input_layernorm", f"{p}.input_layernorm.weight", True)
        else:
            h, x = ortform.skip_rmsnorm(b, x, delta, wn, f"{p}.input_layernorm.weight", arch.rms_eps,
                                        f"{ns}/input_layernorm")
        o = ortform.attention(b, w, stacked, h, i, arch, cos, sin, gqa, f"{ns}/attn")
        o = linear(b, w, o, f"{p}.self_attn.o_proj", nh * hd, H, f"{ns}/attn/o_proj")
        h, x = ortform.skip_rmsnorm(b, x, o, w.get(f"{p}.post_attention_layernorm.weight", (H,)),
                                    f"{p}.post_attention_layernorm.weight", arch.rms_eps,
                                    f"{ns}/post_attention_layernorm")
        delta = _mlp(b, w, h, arch, p, ns)
        b.boundaries.append((ins, [x, delta]))
        if progress is not None:
            progress()
    wn = w.get("model.norm.weight", (H,))
    b.boundaries.append(([x] if delta is None else [x, delta], ["logits"]))
    if delta is None:
        h = _rmsnorm(b, x, wn, arch.rms_eps, "/model/norm", "model.norm.weight", True)
    else:
        h, _ = ortform.skip_rmsnorm(b, x, delta, wn, "model.norm.weight", arch.rms_eps, "/model/norm")
    lm_head(b, w, h, arch)
