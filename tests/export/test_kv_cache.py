"""kiln export onnx --kv-cache int8|fp8: the graph's codes and scales against a numpy reference, the IO
contract (version 3 only for a quantized cache, float artifacts unchanged), validation, refusals, and the
TensorRT profile / Triton config rules for the scale tensors."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from export.errors import ExportError
from export.onnx import export_onnx
from export.onnx.kvcache import FORMATS, reference_quantize
from export.tensorrt import InputSpec, ProfileFlags, derive_profiles
from export.triton import manifest_io, model_config, onnx_io
from runtime.manifest import read_manifest
from runtime.records import IOSpec, TensorSpec
from tests.export.onnx_helpers import feeds

PROMPT = np.array([[5, 9, 30, 7, 100, 3, 77, 12, 4, 250, 31, 8]])


@pytest.fixture(scope="module", params=[(kv, opset) for kv in ("int8", "fp8") for opset in (23, 21)],
                ids=lambda p: f"{p[0]}-opset{p[1]}")
def quant_art(request, tiny_dir, tmp_path_factory):
    kv, opset = request.param
    out = tmp_path_factory.mktemp("kv") / f"tiny-{kv}-{opset}"
    export_onnx(str(tiny_dir), out, opset=opset, kv_cache=kv)  # validated against torch
    return kv, opset, out


@pytest.fixture(scope="module")
def float_art(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv") / "tiny-float"
    export_onnx(str(tiny_dir), out, validate=False)
    return out


def _session(art):
    return ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])


def _quant_feeds(sess, arch, ids):
    f = feeds(arch, ids)
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            z = np.zeros((ids.shape[0], arch.kv_heads, 0, i.shape[3]), np.int8 if i.type == "tensor(int8)"
                         else np.uint8 if "float8" in i.type else np.float32)
            f[i.name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(z, 17) if "float8" in i.type else z
    return f


def test_io_record_and_graph_declare_codes_and_scales(quant_art):
    kv, opset, art = quant_art
    m = read_manifest(art)
    io, arch = m.io, m.architecture
    assert io.version == 3 and io.kv_quantized and io.kv_dtype == FORMATS[kv].dtype and io.opset == opset
    assert len(io.kv_scales) == 2 * arch.layers and "past_key_values.1.value_scale" in io.kv_scales
    spec = {t.name: t for t in io.inputs + io.outputs}
    assert spec["past_key_values.0.key"].shape == ("batch", arch.kv_heads, "past_seq", arch.head_dim)
    assert spec["past_key_values.0.key_scale"] == TensorSpec("past_key_values.0.key_scale", "float32",
                                                              ("batch", arch.kv_heads, "past_seq", 1))
    assert spec["present.1.value_scale"].shape == ("batch", arch.kv_heads, "total_seq", 1)
    ins = {i.name: i.type for i in _session(art).get_inputs()}
    assert ins["past_key_values.1.key"] == ("tensor(int8)" if kv == "int8" else "tensor(float8e4m3fn)")
    assert ins["past_key_values.1.key_scale"] == "tensor(float)"
    v = m.validation
    assert v.passed and v.tolerance == {"int8": 0.02, "fp8": 0.1}[kv] and not v.greedy_required
    # measured on this model: int8 1.2e-3, fp8 6.6e-3 of the logit range (opsets 21 and 23 alike)
    assert v.value <= {"int8": 3e-3, "fp8": 1.5e-2}[kv], v.value
    assert f"graph's: {kv}" in v.reference


def test_codes_and_scales_equal_the_numpy_reference(quant_art, float_art):
    """Layer 0's keys/values are the float graph's up to the cache: the quantized graph's present codes and
    scales are the reference quantization of the float graph's present (one scale per token and head)."""
    kv, _, art = quant_art
    arch = read_manifest(art).architecture
    fl = _session(float_art).run(None, feeds(arch, PROMPT))
    sess = _session(art)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, _quant_feeds(sess, arch, PROMPT))))
    for j, kind in enumerate(("key", "value")):
        x = fl[1 + j]  # present.0.key / .value of the float graph: [1, kvh, S, hd]
        scale = got[f"present.0.{kind}_scale"]
        np.testing.assert_allclose(scale[..., 0], np.abs(x).max(-1) / FORMATS[kv].qmax, rtol=1e-6)
        codes = got[f"present.0.{kind}"]
        if kv == "int8":
            ref, ref_scale = reference_quantize(x, FORMATS[kv])
            np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
            diff = np.abs(codes.astype(int) - ref.astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # a tie rounded the other way at most
            assert np.abs(codes).max() == 127  # the largest element of each row maps to +-qmax
        else:
            ref = (x / scale).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
            assert (codes != ref).mean() < 1e-3
            back = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
            assert np.abs(back - x).max() <= np.abs(x).max() * 2 ** -4  # 3 mantissa bits: within 1/16 of a row's max


def test_float_cache_is_the_contract_as_before(float_art, tiny_dir, tmp_path):
    m = read_manifest(float_art)
    assert m.io.version == 2 and m.io.kv_dtype == "float32" and not m.io.kv_quantized and m.io.kv_scales == ()
    explicit = tmp_path / "explicit"
    export_onnx(str(tiny_dir), explicit, validate=False, kv_cache="float")
    for f in ("model.onnx", "model.onnx.data"):
        assert (explicit / f).read_bytes() == (float_art / f).read_bytes()
    assert json.loads((explicit / "kiln.json").read_text())["io"] == json.loads((float_art / "kiln.json").read_text())["io"]


def test_iospec_ties_the_version_to_the_cache():
    ins = (TensorSpec("input_ids", "int64", ("batch", "seq")),)
    IOSpec(version=3, form="portable", opset=23, inputs=ins, outputs=(), kv_dtype="int8")
    with pytest.raises(ValueError, match="version 3, not 2"):
        IOSpec(version=2, form="portable", opset=23, inputs=ins, outputs=(), kv_dtype="int8")
    with pytest.raises(ValueError, match="version 2, not 3"):
        IOSpec(version=3, form="portable", opset=23, inputs=ins, outputs=())
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        IOSpec(version=3, form="portable", opset=23, inputs=ins, outputs=(), kv_dtype="int4")
    with pytest.raises(ValueError, match="reads 2, 3 and 4"):
        IOSpec(version=5, form="portable", opset=23, inputs=ins, outputs=())


def test_refusals_are_one_line(tiny_dir, tmp_path):
    with pytest.raises(ExportError, match="--kv-cache must be one of float, int8, fp8"):
        export_onnx(str(tiny_dir), tmp_path / "b", kv_cache="int4")
    with pytest.raises(ExportError, match="optimum's graph keeps a float cache"):
        export_onnx(str(tiny_dir), tmp_path / "c", exporter="optimum", kv_cache="int8")
    from kiln.cli import cli

    r = CliRunner().invoke(cli, ["export", "onnx", str(tiny_dir), "-o", str(tmp_path / "d"), "--kv-cache", "int4"])
    assert r.exit_code == 2 and "int4" in r.output and not (tmp_path / "d").exists()


# ---- TensorRT profiles and the Triton config: pure -------------------------------------------------------
LAYERS, KV, HD = 2, 2, 16


def _inputs(scales=True, drop=None):
    specs = [InputSpec("input_ids", ("batch", "seq")), InputSpec("attention_mask", ("batch", "total")),
             InputSpec("position_ids", ("batch", "seq")), InputSpec("logits_positions", ("k",))]
    for i in range(LAYERS):
        for kind in ("key", "value"):
            specs.append(InputSpec(f"past_key_values.{i}.{kind}", ("batch", KV, "past", HD)))
            if scales:
                specs.append(InputSpec(f"past_key_values.{i}.{kind}_scale", ("batch", KV, "past", 1)))
    return [s for s in specs if s.name != drop]


def test_profiles_cover_the_scale_inputs():
    prefill, decode = derive_profiles(_inputs(), ProfileFlags(4, 2048, 512), layers=LAYERS, kv_heads=KV,
                                      head_dim=HD)
    assert set(prefill.shapes) == set(decode.shapes) == {s.name for s in _inputs()}
    assert prefill.shapes["past_key_values.1.value_scale"] == ((1, KV, 0, 1), (1, KV, 0, 1), (4, KV, 2047, 1))
    assert decode.shapes["past_key_values.0.key_scale"] == ((1, KV, 0, 1), (1, KV, 512, 1), (4, KV, 2047, 1))
    for p in (prefill, decode):  # codes and scales share P at min, opt and max
        for k in range(3):
            assert p.shapes["past_key_values.0.key"][k][2] == p.shapes["past_key_values.0.key_scale"][k][2]


def test_profiles_refuse_a_missing_or_misshapen_scale():
    with pytest.raises(ExportError, match="lacks KV scale input.*past_key_values.1.value_scale"):
        derive_profiles(_inputs(drop="past_key_values.1.value_scale"), ProfileFlags(), layers=LAYERS,
                        kv_heads=KV, head_dim=HD)
    bad = _inputs() + [InputSpec("past_key_values.2.key_scale", ("batch", KV, "past", 1))]
    with pytest.raises(ExportError, match="beyond the 2 layers"):
        derive_profiles(bad, ProfileFlags(), layers=LAYERS, kv_heads=KV, head_dim=HD)
    wrong = [s if s.name != "past_key_values.0.key_scale" else InputSpec(s.name, ("batch", KV, "past", HD))
             for s in _inputs()]
    with pytest.raises(ExportError, match="static dim 16 where the architecture says 1"):
        derive_profiles(wrong, ProfileFlags(), layers=LAYERS, kv_heads=KV, head_dim=HD)


def test_triton_config_lists_codes_and_scales(quant_art):
    kv, _, art = quant_art
    m = read_manifest(art)
    arch = m.architecture
    if kv == "fp8":
        with pytest.raises(ExportError, match="no FP8 data type.*--kv-cache int8"):
            onnx_io(art / "model.onnx")
        with pytest.raises(ExportError, match="no FP8 data type"):
            manifest_io(m)
        return
    for ins, outs in (onnx_io(art / "model.onnx"), manifest_io(m)):
        t = {x.name: (x.data_type, x.dims) for x in ins + outs}
        assert t["past_key_values.1.key"] == ("TYPE_INT8", (-1, arch.kv_heads, -1, arch.head_dim))
        assert t["past_key_values.1.key_scale"] == ("TYPE_FP32", (-1, arch.kv_heads, -1, 1))
        assert t["present.0.value_scale"] == ("TYPE_FP32", (-1, arch.kv_heads, -1, 1))
        text = model_config("m", "onnxruntime_onnx", ins, outs, instances=1, kind="KIND_CPU")
        assert text.count("_scale\"") == 4 * arch.layers


@pytest.mark.parametrize("kv,bound", [("int8", 5e-3), ("fp8", 3e-2)])
def test_per_layer_validation_feeds_codes_and_scales(tiny_dir, tmp_path, kv, bound):
    """Per-layer validation (big models) feeds each layer's zero-length past in the graph's own types;
    measured worst layer: int8 2.2e-3, fp8 1.6e-2 of the layer output's range."""
    m = export_onnx(str(tiny_dir), tmp_path / kv, validation="per-layer", kv_cache=kv)
    v = m.validation
    assert v.mode == "per-layer" and v.passed and v.tolerance == {"int8": 0.02, "fp8": 0.1}[kv]
    assert 0 < v.value <= bound, v.value
