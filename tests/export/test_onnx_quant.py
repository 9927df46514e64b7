"""ONNX export of tiny quantized checkpoints: every scheme's QDQ pattern, parity with the fake-quant torch model."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.errors import ExportError
from export.onnx import export_onnx
from export.onnx.qdq import pack_int4, unpack_int4
from runtime.manifest import ManifestError, read_manifest
from tests.export.onnx_helpers import feeds, make_quantized

SCHEMES = ["int8-wo", "fp8", "int8-sq", "int8-dyn", "int4", "int8-group"]
GROUPED = ("int4", "int8-group")
T = onnx.TensorProto


@pytest.fixture(scope="module")
def ckpts(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("qck")
    return {s: make_quantized(tiny_dir, root / s, s) for s in SCHEMES}


def _graph(art):
    return onnx.load(str(art / "model.onnx"), load_external_data=False).graph


def test_int4_packing_roundtrip():
    v = np.array([[-8, 7, 0, -1], [3, -4, 5, 1]], np.int8)
    lo_hi = (v[:, 0::2].astype(np.uint8) & 15) | ((v[:, 1::2].astype(np.uint8) & 15) << 4)  # FORMATS packing
    np.testing.assert_array_equal(unpack_int4(lo_hi), v)
    np.testing.assert_array_equal(pack_int4(v), lo_hi.reshape(-1))  # row-major pairs = ONNX INT4


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_export_parity(scheme, ckpts, tmp_path):
    out = tmp_path / "art"
    m = export_onnx(str(ckpts[scheme]), out)
    v = m.validation
    # the QDQ graph computes the fake-quant numerics; per-token rounding can flip a code on float noise
    assert v.passed and v.graph.value <= (2e-3 if scheme == "int8-dyn" else 1e-4), v
    assert v.ort_cpu.value <= v.tolerance
    assert m.preset() == scheme and m.passes[-1].kind == "quantize"
    assert m.io.weight_block == (32 if scheme in GROUPED else None)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    g = _graph(out)
    init = {t.name: t for t in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    mm = next(n for n in g.node if n.name == "/model/layers.0/mlp/down_proj/MatMul")
    w = init["model.layers.0.mlp.down_proj.weight"]
    want = {"int8-wo": T.INT8, "fp8": T.FLOAT8E4M3FN, "int8-sq": T.INT8, "int8-dyn": T.INT8, "int4": T.INT4,
            "int8-group": T.INT8}
    assert w.data_type == want[scheme] and list(w.dims) == [128, 64]  # [in, out]: feeds MatMul input 1
    dq = prod[mm.input[1]]
    assert dq.op_type == "DequantizeLinear" and dq.input[0] == w.name and len(dq.input) == 2  # zero point 0
    if scheme == "int8-dyn":  # per-token fake quant in front: Round(x / s_t) * s_t
        fq = prod[mm.input[0]]
        assert fq.op_type == "Mul" and prod[fq.input[0]].op_type == "Round"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs.get("axis") == (0 if scheme in GROUPED else 1)
    if scheme in GROUPED:
        assert attrs["block_size"] == m.passes[-1].layers["model.layers.0.mlp.down_proj"].group_size == 32
    act = prod[mm.input[0]]
    if scheme in ("fp8", "int8-sq"):
        assert act.op_type == "DequantizeLinear" and prod[act.input[0]].op_type == "QuantizeLinear"
        assert "model.layers.0.mlp.down_proj.input_scale" in act.input
    # tied lm_head quantized: codes stored once (the head's initializer aliases the embedding's bytes) and
    # gathered as codes, never dequantized whole for the embedding; the TensorRT presets keep it float
    if scheme in ("fp8", "int8-sq"):
        assert "lm_head" not in m.layer_specs() and init["model.embed_tokens.weight"].data_type == T.FLOAT
        assert prod[prod["logits"].input[0]].op_type == "Gemm"
    elif scheme != "int4":
        ext = {n: {e.key: e.value for e in init[n].external_data} for n in ("lm_head.weight",
                                                                            "model.embed_tokens.weight")}
        assert ext["lm_head.weight"] == ext["model.embed_tokens.weight"]
        emb = next(n for n in g.node if n.name == "/model/embed_tokens/Gather")
        table = init["model.embed_tokens.weight"]
        assert emb.input[0] == table.name and table.data_type == T.INT8 and list(table.dims) == [64, 512]  # [H,V]
        head = prod["logits"]
        assert head.op_type == "MatMul" and prod[head.input[1]].input[0] == "lm_head.weight"  # DQ -> MatMul input 1


def test_quantized_kv_invariance_and_padding(ckpts, tmp_path):
    out = tmp_path / "art"
    m = export_onnx(str(ckpts["int8-sq"]), out, validate=False)
    a = m.architecture
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    s = ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ids = np.array([[5, 17, 99, 3, 250, 41, 8, 77]], np.int64)
    full = s.run(None, feeds(a, ids))
    first = s.run(None, feeds(a, ids[:, :5]))
    rest = s.run(None, feeds(a, ids[:, 5:], past=first[1:]))
    np.testing.assert_allclose(rest[0], full[0][:, 5:], atol=1e-4)
    pad = np.concatenate([np.zeros((1, 3), np.int64), ids], 1)
    mask = (np.arange(pad.shape[1]) >= 3).astype(np.int64)[None]
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    padded = s.run(None, feeds(a, pad, mask=mask, pos=pos))
    np.testing.assert_allclose(padded[0][:, 3:], full[0], atol=1e-4)


def test_int4_lm_head(tiny_dir, tmp_path):
    from compress.calib import calibration_batches
    from compress.checkpoint import source_record
    from compress.loading import load_model
    from compress.quant import Int4, quantize_, save_quantized

    model, tok, info = load_model(str(tiny_dir))
    quantize_(model, Int4(method="rtn", group_size=32, lm_head="int4"), calib=calibration_batches(tok, samples=2, seq_len=64))
    save_quantized(model, tok, tmp_path / "ck", source=source_record(info))
    m = export_onnx(str(tmp_path / "ck"), tmp_path / "art")
    assert m.validation.passed and m.validation.graph.value <= 1e-4
    init = {t.name: t for t in _graph(tmp_path / "art").initializer}
    assert init["model.embed_tokens.weight"].data_type == T.INT4


def test_unknown_layer_format_refused_naming_the_field(ckpts, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(ckpts["int8-wo"], ck)
    kj = json.loads((ck / "kiln.json").read_text())
    kj["passes"][-1]["layers"]["model.layers.0.mlp.up_proj"]["weight"] = "int3"
    (ck / "kiln.json").write_text(json.dumps(kj))
    with pytest.raises(ManifestError, match=r"passes\[0\]\.layers\.model\.layers\.0\.mlp\.up_proj\.weight: "
                                            r"must be one of 'float', 'int8', 'fp8', 'int4', got 'int3'"):
        export_onnx(str(ck), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    kj["passes"][-1]["layers"]["model.layers.0.mlp.up_proj"] = {"weight": "fp8", "group_size": 32}
    (ck / "kiln.json").write_text(json.dumps(kj))
    with pytest.raises(ManifestError, match="up_proj: group_size applies to int8 and int4 weights, not fp8"):
        export_onnx(str(ck), tmp_path / "o")


def test_missing_quantized_tensor_named(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    shutil.copytree(ckpts["fp8"], ck)
    t = load_file(str(ck / "model.safetensors"))
    t.pop("model.layers.1.self_attn.o_proj.weight_scale")
    save_file(t, str(ck / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight_scale is missing"):
        export_onnx(str(ck), tmp_path / "o")
    assert read_manifest(ckpts["fp8"]).kind == "checkpoint"
