"""`--form ort`: the ONNX Runtime contrib-op graph computes what the portable graph computes, under the same IO."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.errors import ExportError
from export.onnx import export_onnx
from tests.export.onnx_helpers import feeds, make_quantized


@pytest.fixture(scope="module")
def arts(tiny_dir, tmp_path_factory):
    """scheme -> (portable artifact, ort artifact), both validated at export."""
    root = tmp_path_factory.mktemp("ortform")
    out = {}
    for scheme in ("fp32", "int8-wo", "int8-dyn", "int4"):
        src = tiny_dir if scheme == "fp32" else make_quantized(tiny_dir, root / f"ck-{scheme}", scheme)
        pm = export_onnx(str(src), root / f"{scheme}-portable", validate=False)
        om = export_onnx(str(src), root / f"{scheme}-ort", form="ort")
        out[scheme] = (root / f"{scheme}-portable", root / f"{scheme}-ort", pm, om)
    return out


def _session(art, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    return ort.InferenceSession(str(art / "model.onnx"), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("scheme", ["fp32", "int8-wo", "int8-dyn", "int4"])
def test_ort_form_matches_portable(arts, scheme):
    port, art, pm, om = arts[scheme]
    v = om.validation
    assert v.passed and (v.graph or v).value <= (2e-3 if scheme == "int8-dyn" else 1e-4), v
    assert om.io.form == "ort" and om.io.opset == 23 and om.io.inputs == pm.io.inputs
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import} == {"": 23, "com.microsoft": 1}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == om.architecture.layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * om.architecture.layers  # the first norm is plain
    assert any(n.name == "/model/layers.0/attn/qkv_proj/MatMul" for n in model.graph.node)  # q, k, v stacked
    a = om.architecture
    ids = np.array([[5, 17, 99, 3, 250, 41, 8, 77]], np.int64)
    ps, os_ = _session(port), _session(art)
    want, got = ps.run(None, feeds(a, ids)), os_.run(None, feeds(a, ids))
    tol = 2e-3 if scheme == "int8-dyn" else 1e-4
    for w, g in zip(want, got):  # logits and every present KV
        np.testing.assert_allclose(g, w, atol=tol)
    step = feeds(a, np.array([[9]], np.int64), past=got[1:])
    np.testing.assert_allclose(os_.run(None, step)[0], ps.run(None, step)[0], atol=tol)


def test_ort_form_kv_and_left_padding(arts):
    _, art, _, om = arts["int4"]
    a = om.architecture
    s = _session(art)  # the graph's own math: GroupQueryAttention runs, MatMulNBits does not re-round
    ids = np.array([[5, 17, 99, 3, 250, 41, 8, 77]], np.int64)
    full = s.run(None, feeds(a, ids))
    first = s.run(None, feeds(a, ids[:, :5]))
    rest = s.run(None, feeds(a, ids[:, 5:], past=first[1:]))
    np.testing.assert_allclose(rest[0], full[0][:, 5:], atol=1e-4)
    # a batch of two rows, the second left-padded by 3: each row as if alone, past and new tokens alike
    short = ids[:, 3:]
    batch = np.concatenate([ids, np.concatenate([np.zeros((1, 3), np.int64), short], 1)])
    mask = np.stack([np.ones(8, np.int64), (np.arange(8) >= 3).astype(np.int64)])
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    out = s.run(None, feeds(a, batch, mask=mask, pos=pos))
    alone = s.run(None, feeds(a, short))
    np.testing.assert_allclose(out[0][0], full[0][0], atol=1e-4)
    np.testing.assert_allclose(out[0][1, 3:], alone[0][0], atol=1e-4)
    assert np.isfinite(out[0]).all()  # padded query rows stay finite
    nxt = np.array([[9], [9]], np.int64)
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    step = s.run(None, feeds(a, nxt, mask=mask2, pos=pos[:, -1:] + 1, past=out[1:]))
    ref0 = s.run(None, feeds(a, nxt[:1], past=full[1:]))[0]
    ref1 = s.run(None, feeds(a, nxt[:1], past=alone[1:]))[0]
    np.testing.assert_allclose(step[0][0], ref0[0], atol=1e-4)
    np.testing.assert_allclose(step[0][1], ref1[0], atol=1e-4)


def test_ort_form_unstacked_when_qkv_differ(tiny_dir, tmp_path):
    from compress.calib import calibration_batches
    from compress.checkpoint import source_record
    from compress.loading import load_model
    from compress.quant import Int8WeightOnly, quantize_, save_quantized

    model, tok, info = load_model(str(tiny_dir))
    quantize_(model, Int8WeightOnly(method="rtn", ignore=("q_proj",)), calib=calibration_batches(tok, samples=2, seq_len=64))
    save_quantized(model, tok, tmp_path / "ck", source=source_record(info))
    m = export_onnx(str(tmp_path / "ck"), tmp_path / "art", form="ort")
    assert m.validation.passed and m.validation.graph.value <= 1e-4
    names = {n.name for n in onnx.load(str(tmp_path / "art" / "model.onnx"), load_external_data=False).graph.node}
    assert "/model/layers.0/attn/q_proj/MatMul" in names and "/model/layers.0/attn/qkv_proj/MatMul" not in names


@pytest.mark.parametrize("scheme", ["fp8", "int8-sq"])
def test_ort_form_refuses_static_activation_schemes(tiny_dir, tmp_path, scheme):
    ck = make_quantized(tiny_dir, tmp_path / "ck", scheme)
    with pytest.raises(ExportError, match="--form ort does not take this checkpoint: 14 Linear.*static scale.*--form portable"):
        export_onnx(str(ck), tmp_path / "o", form="ort")
    assert not (tmp_path / "o").exists()


def test_ort_form_opset_and_tensorrt(arts, tiny_dir, tmp_path):
    with pytest.raises(ExportError, match="--form ort is built at opset 23"):
        export_onnx(str(tiny_dir), tmp_path / "o", form="ort", opset=21)
    from export.tensorrt import check_onnx

    with pytest.raises(ExportError, match="com.microsoft"):
        check_onnx(arts["fp32"][1])
