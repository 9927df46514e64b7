"""check_onnx: TensorRT's documented ONNX constraints, on good graphs and deliberately broken ones."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.errors import ExportError
from export.tensorrt import check_onnx, onnx_violations, opset_range
from tests.export.trt_fixtures import contract_artifact, contract_model, qdq_matmul


def rules(model, **kw) -> set[str]:
    return {v.rule for v in onnx_violations(model, **kw)}


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_good_quantized_weights_pass_and_run_in_onnxruntime(fmt):
    m = qdq_matmul(fmt)
    onnx.checker.check_model(m, full_check=True)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.ones((2, 64), np.float32)})[0]
    assert y.shape == (2, 32)
    assert onnx_violations(m) == []


def test_contract_artifact_passes_from_disk_with_external_data(tmp_path, tiny_dir):
    art = contract_artifact(tmp_path / "art", tiny_dir)
    assert (art / "model.onnx.data").stat().st_size > 0  # zero points/weights really external
    summary = check_onnx(art)
    assert summary["opset"] == 23 and summary["dequantize_linear"] == 2 and summary["quantize_linear"] == 1


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_nonzero_zero_point_is_refused(fmt):
    assert rules(qdq_matmul(fmt, zero_point=1)) == {"zero-point"}


def test_external_nonzero_zero_point_is_read_from_the_data_file(tmp_path, tiny_dir):
    m = contract_model()
    for t in m.graph.initializer:
        if t.name == "lm_head.wz":
            t.CopyFrom(numpy_helper.from_array(np.full(64, 3, np.int8), "lm_head.wz"))
    art = contract_artifact(tmp_path / "art", tiny_dir, model=m)
    with pytest.raises(ExportError, match=r"zero-point.*lm_head/weight/DequantizeLinear"):
        check_onnx(art)


def test_int4_blocked_scale_shape_must_match():
    assert rules(qdq_matmul("int4", scale_shape=[8, 32])) == {"int4-block"}  # 64/16 = 4 blocks, not 8
    assert rules(qdq_matmul("int4", scale_shape=[4, 16])) == {"int4-block"}  # N mismatch


def test_int4_weight_only():
    m = qdq_matmul("int8")
    # quantize an activation to INT4: TensorRT supports INT4 only as constant weights into DQ
    z4 = helper.make_tensor("z4", TensorProto.INT4, [], [0])
    m.graph.initializer.append(z4)
    m.graph.node.insert(0, helper.make_node("QuantizeLinear", ["x", "s1", "z4"], ["xq"], name="q4"))
    m.graph.initializer.append(numpy_helper.from_array(np.array(0.1, np.float32), "s1"))
    assert "int4-weight-only" in rules(m)


def test_quantized_constant_may_only_feed_dequantize():
    m = qdq_matmul("fp8")
    m.graph.node.append(helper.make_node("Cast", ["w"], ["wc"], to=TensorProto.FLOAT, name="cast"))
    m.graph.output.append(helper.make_tensor_value_info("wc", TensorProto.FLOAT, [64, 32]))
    found = onnx_violations(m)
    assert [v.rule for v in found] == ["quantized-constant"] and found[0].where == "w" and "Cast" in found[0].message


def test_fp8_e5m2_is_not_a_tensorrt_type():
    m = qdq_matmul("fp8")
    for t in m.graph.initializer:
        if t.name in ("w", "z"):
            t.data_type = TensorProto.FLOAT8E5M2
    assert "qtype" in rules(m)


def test_runtime_scale_is_refused():
    """A per-token dynamic scale (int8-dyn style): computed in the graph, so not a build-time constant."""
    m = qdq_matmul("int8")
    m.graph.node.insert(0, helper.make_node("ReduceMax", ["x"], ["amax"], keepdims=0, name="amax"))
    m.graph.node.insert(1, helper.make_node("Div", ["amax", "c127"], ["xs"], name="xscale"))
    m.graph.node.insert(2, helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="xq"))
    m.graph.node.insert(3, helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xdq"], name="xdq"))
    m.graph.node[-1].input[0] = "xdq"
    m.graph.initializer.extend([numpy_helper.from_array(np.array(127.0, np.float32), "c127"),
                                numpy_helper.from_array(np.array(0, np.int8), "xz")])
    found = onnx_violations(m)
    assert {v.rule for v in found} == {"scale"} and {v.where for v in found} == {"xq", "xdq"}


def test_custom_domain_and_control_flow_are_refused():
    m = qdq_matmul("int8")
    m.graph.node.append(helper.make_node("SimplifiedLayerNormalization", ["y"], ["y2"], domain="com.microsoft",
                                         name="ort_norm"))
    then = helper.make_graph([helper.make_node("Identity", ["y"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    m.graph.node.append(helper.make_node("If", ["cond"], ["t_out"], then_branch=then, else_branch=then, name="if"))
    m.graph.node.append(helper.make_node("Loop", ["", "cond"], [], body=then, name="loop"))
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    found = onnx_violations(m)
    assert {(v.rule, v.where) for v in found} >= {("domain", "ort_norm"), ("control-flow", "if"),
                                                  ("control-flow", "loop")}


def test_opset_range_per_tensorrt_major():
    assert opset_range("10.15.1") == (9, 24) and opset_range("11.2.0") == (9, 25)
    assert rules(qdq_matmul("int8", opset=23)) == set()
    m = qdq_matmul("int8")
    m.opset_import[0].version = 25
    assert rules(m, trt_version="10.15.1") == {"opset"}
    assert rules(m, trt_version="11.1.0") == set()
    m.opset_import[0].version = 8
    assert "opset" in rules(m)
    with pytest.raises(ExportError, match="TensorRT 10.x or 11.x"):
        opset_range("8.6.1")


def _attention_model(with_past: bool):
    B, H, S, D = 1, 2, 4, 8
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, H, S, D]) for n in ("q", "k", "v")]
    inputs = ["q", "k", "v", ""]
    outs = ["o"]
    if with_past:
        ins += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, H, S, D]) for n in ("pk", "pv")]
        inputs += ["pk", "pv"]
        outs += ["presk", "presv"]
    node = helper.make_node("Attention", inputs, outs, is_causal=1, name="attn")
    g = helper.make_graph([node], "a", ins, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    m.ir_version = 10
    return m


def test_attention_with_cache_inputs_is_refused():
    assert rules(_attention_model(False)) == set()
    found = onnx_violations(_attention_model(True))
    assert {v.rule for v in found} == {"attention"}
    msgs = " ".join(v.message for v in found)
    assert "past_key" in msgs and "past_value" in msgs and "present_key" in msgs


def test_check_onnx_error_is_one_line_listing_violations(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(qdq_matmul("int4", zero_point=2, scale_shape=[8, 32]), str(p))
    with pytest.raises(ExportError) as e:
        check_onnx(p)
    msg = str(e.value)
    assert "\n" not in msg and "2 TensorRT constraint violation(s)" in msg and "zero-point" in msg
    with pytest.raises(ExportError, match="no model.onnx"):
        check_onnx(tmp_path / "nowhere")


def test_int8_codes_gathered_directly_are_refused():
    """A quantized embedding gathered as INT8 codes (then Cast): TensorRT takes INT8 only through DQ."""
    m = qdq_matmul("int8")
    m.graph.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]))
    m.graph.node.append(helper.make_node("Gather", ["w", "ids"], ["rows"], axis=0, name="emb_gather"))
    m.graph.node.append(helper.make_node("Cast", ["rows"], ["rows_f"], to=TensorProto.FLOAT, name="emb_cast"))
    m.graph.output.append(helper.make_tensor_value_info("rows_f", TensorProto.FLOAT, ["n", 32]))
    found = onnx_violations(m)
    assert [(v.rule, v.where) for v in found] == [("quantized-constant", "w")] and "Gather" in found[0].message
