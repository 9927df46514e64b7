"""Small real ONNX graphs for the TensorRT-stage tests.

``contract_artifact`` writes an ONNX artifact dir (model.onnx + model.onnx.data + tokenizer + kiln.json kind
"onnx") whose graph follows the llmkiln IO contract exactly (input_ids, attention_mask, position_ids,
logits_positions, past_key_values.{i}.key|value -> logits, present.{i}.key|value) with an INT8 Q/DQ weight, so the engine
build pipeline can be driven end to end; ONNX Runtime runs it. It is not a language model.
``qdq_matmul`` builds one quantized MatMul in each of the weight formats (int8, fp8, int4 blocked).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.onnx.decoder import io_spec
from runtime.manifest import Architecture, Manifest
from runtime.records import POSITIONS

LAYERS, KV, HD, HIDDEN, VOCAB = 2, 2, 16, 32, 64
OPSET = 23


def arch(vocab=VOCAB) -> Architecture:
    return Architecture(model_type="llama", layers=LAYERS, hidden=HIDDEN, intermediate=64, heads=4, kv_heads=KV,
                        head_dim=HD, vocab=vocab, max_position=1024, rope_theta=10000.0, rms_eps=1e-5,
                        tied_embeddings=False)


def contract_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    inits.append(numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "emb"))
    nodes.append(helper.make_node("Gather", ["emb", "input_ids"], ["h0"], name="/model/embed_tokens/Gather"))
    # every graph input is used (a real parser may drop unused inputs): h = h0 + 0 * (pos + sum(mask))
    inits += [numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
              numpy_helper.from_array(np.array([1], np.int64), "mask_axis"),
              numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes += [helper.make_node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT, name="/use/pos/Cast"),
              helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT, name="/use/mask/Cast"),
              helper.make_node("ReduceSum", ["mask_f", "mask_axis"], ["mask_sum"], keepdims=1, name="/use/mask/Sum"),
              helper.make_node("Add", ["pos_f", "mask_sum"], ["aux"], name="/use/Add"),
              helper.make_node("Unsqueeze", ["aux", "last_axis"], ["aux3"], name="/use/Unsqueeze"),
              helper.make_node("Mul", ["aux3", "zero"], ["aux0"], name="/use/Mul"),
              helper.make_node("Add", ["h0", "aux0"], ["hall"], name="/use/AddHidden"),
              helper.make_node("Gather", ["hall", POSITIONS], ["h"], axis=1, name="/model/logits_positions/Gather")]
    # lm_head: INT8 weight [HIDDEN, VOCAB], per-channel scale, DQ -> MatMul input 1; activation Q/DQ pair
    w = rng.integers(-127, 128, (HIDDEN, VOCAB)).astype(np.int8)
    inits += [numpy_helper.from_array(w, "lm_head.w"),
              numpy_helper.from_array(np.full(VOCAB, 0.01, np.float32), "lm_head.ws"),
              numpy_helper.from_array(np.zeros(VOCAB, np.int8), "lm_head.wz"),
              numpy_helper.from_array(np.array(0.05, np.float32), "lm_head.xs"),
              numpy_helper.from_array(np.array(0, np.int8), "lm_head.xz")]
    nodes += [helper.make_node("DequantizeLinear", ["lm_head.w", "lm_head.ws", "lm_head.wz"], ["wdq"], axis=1,
                               name="/lm_head/weight/DequantizeLinear"),
              helper.make_node("QuantizeLinear", ["h", "lm_head.xs", "lm_head.xz"], ["hq"],
                               name="/lm_head/input/QuantizeLinear"),
              helper.make_node("DequantizeLinear", ["hq", "lm_head.xs", "lm_head.xz"], ["hdq"],
                               name="/lm_head/input/DequantizeLinear"),
              helper.make_node("MatMul", ["hdq", "wdq"], ["logits"], name="/lm_head/MatMul")]
    inits.append(numpy_helper.from_array(np.array([0, 0, KV, HD], np.int64), "kv_shape"))
    nodes += [helper.make_node("Gather", ["emb", "input_ids"], ["hk"], name="/kv/Gather"),
              helper.make_node("Reshape", ["hk", "kv_shape"], ["h4"], name="/kv/Reshape"),
              helper.make_node("Transpose", ["h4"], ["kvnew"], perm=[0, 2, 1, 3], name="/kv/Transpose")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info(POSITIONS, TensorProto.INT64, [POSITIONS])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", POSITIONS, VOCAB])]
    for i in range(LAYERS):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", TensorProto.FLOAT,
                                                        ["batch", KV, "past", HD]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT,
                                                         ["batch", KV, "total", HD]))
            nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.{kv}", "kvnew"], [f"present.{i}.{kv}"],
                                          axis=2, name=f"/model/layers.{i}/attn/{kv}/Concat"))
    graph = helper.make_graph(nodes, "contract", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="llmkiln-test")
    model.ir_version = 10
    return model


def io_block():
    return io_spec(arch(), form="portable", opset=OPSET)


def contract_artifact(out: Path, tokenizer_src: Path, passes: list | None = None, model=None) -> Path:
    out.mkdir(parents=True)
    model = model or contract_model()
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=256)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_src / name, out / name)
    m = Manifest(kind="onnx", architecture=arch(), source={"model": "test", "sha256": "0" * 64},
                 passes=passes or [], io=io_block())
    m.record_files(out)
    m.save(out)
    return out


def qdq_matmul(fmt: str, *, zero_point=0, block=16, scale_shape=None, opset=OPSET) -> onnx.ModelProto:
    """x [B, 64] @ DQ(W) with W in ``fmt`` (int8 per-channel, fp8 per-tensor, int4 blocked along K)."""
    K, N = 64, 32
    rng = np.random.default_rng(1)
    if fmt == "int8":
        w = helper.make_tensor("w", TensorProto.INT8, [K, N], rng.integers(-127, 128, K * N).tolist())
        s = numpy_helper.from_array(np.full(scale_shape or [N], 0.02, np.float32), "s")
        z = helper.make_tensor("z", TensorProto.INT8, list(scale_shape or [N]), [zero_point] * N)
        dq = helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=1, name="dq")
    elif fmt == "fp8":
        w = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [K, N], rng.standard_normal(K * N).tolist())
        s = numpy_helper.from_array(np.array(0.02, np.float32), "s")
        z = helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [float(zero_point)])
        dq = helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], name="dq")
    elif fmt == "int4":
        shp = list(scale_shape or [K // block, N])
        n = int(np.prod(shp))
        w = helper.make_tensor("w", TensorProto.INT4, [K, N], rng.integers(-8, 8, K * N).tolist())
        s = numpy_helper.from_array(np.full(shp, 0.02, np.float32), "s")
        z = helper.make_tensor("z", TensorProto.INT4, shp, [zero_point] * n)
        dq = helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=0, block_size=block, name="dq")
    else:
        raise ValueError(fmt)
    mm = helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm")
    graph = helper.make_graph([dq, mm], fmt, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N])], initializer=[w, s, z])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model
