"""check_onnx on every scheme's portable export of the tiny model, and the engine pipeline on a real export.

The plain-ops form (``--opset 21``) is what TensorRT's parser takes; the fused opset-23 form feeds the KV
cache into ``Attention`` (past_key/past_value), which the parser documents as unsupported, and check_onnx
says so before any build. ``int8-dyn`` quantizes activations at run time with per-token scales computed in
the graph, which TensorRT's Q/DQ cannot take; the engine build refuses it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from export.errors import ExportError
from export.onnx import export_onnx
from export.tensorrt import ProfileFlags, check_onnx, export_tensorrt
from tests.export.onnx_helpers import SCHEME_KW, make_quantized
from tests.export.trt_double import RecordingCudart, RecordingTensorRT

SCHEMES = ["float", "int8-wo", "fp8", "int8-sq", "int8-dyn", "int4"]


def _quantized(src, out, scheme, ignore=()):
    from compress.calib import calibration_batches
    from compress.checkpoint import source_record
    from compress.loading import load_model
    from compress.quant import config_for, quantize_, save_quantized

    model, tok, info = load_model(str(src))
    quantize_(model, config_for(scheme, ignore=ignore, **SCHEME_KW[scheme]),
              calib=calibration_batches(tok, samples=4, seq_len=64))
    save_quantized(model, tok, out, source=source_record(info))
    return out


@pytest.fixture(scope="module")
def exports(tiny_dir, tmp_path_factory):
    """scheme -> portable ONNX artifact (opset 21) of the tiny model, its tied lm_head/embedding kept float
    (``--ignore lm_head``); validation is the exporter's own tests' business."""
    d = tmp_path_factory.mktemp("schemes")
    out = {}
    for scheme in SCHEMES:
        src = tiny_dir if scheme == "float" else _quantized(tiny_dir, d / f"ckpt-{scheme}", scheme, ("lm_head",))
        export_onnx(str(src), d / f"onnx-{scheme}", opset=21, validate=False)
        out[scheme] = d / f"onnx-{scheme}"
    return out


@pytest.mark.parametrize("scheme", ["float", "int8-wo", "fp8", "int8-sq", "int4"])
def test_portable_export_meets_tensorrt_constraints(exports, scheme):
    summary = check_onnx(exports[scheme], trt_version="10.15.1")
    assert summary["opset"] == 21
    if scheme != "float":
        assert summary["dequantize_linear"] > 0
    if scheme in ("fp8", "int8-sq"):
        assert summary["quantize_linear"] > 0  # static activation Q/DQ pairs


def test_dynamic_int8_is_refused_with_what_to_do(exports, tmp_path):
    """int8-dyn computes its activation scales in the graph (ReduceMax per token): no build-time constant
    scale for TensorRT, so the engine build refuses it from kiln.json before touching TensorRT."""
    trt = RecordingTensorRT("10.15.1")
    with pytest.raises(ExportError, match=r"scales computed at run time.*--scheme int8-sq"):
        export_tensorrt(exports["int8-dyn"], tmp_path / "engine", ProfileFlags(1, 64, 16), trt=trt,
                        cudart=RecordingCudart())
    assert not (tmp_path / "engine").exists()


def test_quantized_tied_embedding_gathered_as_codes_is_refused(tiny_dir, tmp_path):
    """With lm_head quantized (the default) the tied embedding gathers INT8 codes: TensorRT takes quantized
    types only through DequantizeLinear, and check_onnx says what to do."""
    src = make_quantized(tiny_dir, tmp_path / "ckpt", "int8-wo")
    export_onnx(str(src), tmp_path / "onnx", opset=21, validate=False)
    with pytest.raises(ExportError, match=r"INT8 constant feeds Gather.*--ignore lm_head"):
        check_onnx(tmp_path / "onnx")


def test_fused_opset23_form_passes_the_tensorrt_check(tiny_dir, tmp_path):
    """The default opset-23 graph uses 4-D Attention without past inputs (the KV concat is in the graph)."""
    out = tmp_path / "fused"
    export_onnx(str(tiny_dir), out, opset=23, validate=False)
    summary = check_onnx(out)
    assert summary
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "Attention" in ops


def test_engine_pipeline_on_a_real_fp8_export(exports, tmp_path):
    trt = RecordingTensorRT("10.15.1")
    m = export_tensorrt(exports["fp8"], tmp_path / "engine", ProfileFlags(2, 64, 16), trt=trt,
                        cudart=RecordingCudart())
    layers = m.architecture.layers
    assert len(trt.args("IOptimizationProfile.set_shape")) == 2 * (4 + 2 * layers)
    assert m.engine.settings.formats == {"fp8 x fp8": 14} and m.engine.settings.min_compute_capability == "8.9"
    # and the engine publishes on Triton with the IO the exporter recorded in kiln.json
    from export.triton import export_triton
    from tests.export.triton_proto import enum_name, parse_model_config

    res = export_triton(tmp_path / "engine", tmp_path / "repo")
    cfg = parse_model_config((Path(res["model_dir"]) / "config.pbtxt").read_text())
    a = m.architecture
    ins = {i.name: (enum_name(i, "data_type"), list(i.dims)) for i in cfg.input}
    assert ins["past_key_values.0.key"] == ("TYPE_FP32", [-1, a.kv_heads, -1, a.head_dim])
    assert ins["position_ids"] == ("TYPE_INT64", [-1, -1]) and len(ins) == 4 + 2 * layers
    assert [(o.name, list(o.dims)) for o in cfg.output][0] == ("logits", [-1, -1, a.vocab])


def test_generation_through_the_engine_matches_onnxruntime(exports, tmp_path, monkeypatch):
    """The TensorRT backend in the real generation loop (``Engine``), with the recording doubles standing in
    for the ``tensorrt`` and cuda-python modules: greedy tokens identical to the ONNX Runtime backend."""
    from runtime import Engine

    trt, cud = RecordingTensorRT("10.15.1"), RecordingCudart()
    eng_dir = tmp_path / "engine"
    export_tensorrt(exports["float"], eng_dir, ProfileFlags(2, 64, 16), trt=trt, cudart=cud)
    cuda_pkg = type(sys)("cuda")
    bindings = type(sys)("cuda.bindings")
    bindings.runtime = cud
    cuda_pkg.bindings = bindings
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cud)
    with Engine.load(exports["float"]) as ref, Engine.load(eng_dir, backend="tensorrt") as eng:
        assert eng.describe()["backend"] == "tensorrt"
        prompts = ["The quick brown fox", "def main():"]
        a = ref.generate(prompts, max_new_tokens=12, temperature=0)
        b = eng.generate(prompts, max_new_tokens=12, temperature=0)
        assert [r.token_ids for r in a] == [r.token_ids for r in b] and all(len(r.token_ids) > 0 for r in a)
        ids = np.array(ref.tokenizer.encode("import os\nimport sys\n"), dtype=np.int64)
        assert np.allclose(ref.score(ids), eng.score(ids), atol=1e-4)
    assert "IExecutionContext.execute_async_v3" in trt.names()


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["float", "fp8", "int8-sq", "int4"])
def test_real_engine_scores_like_onnxruntime(exports, tmp_path, scheme):
    """Needs TensorRT and an NVIDIA GPU (FP8 needs compute capability 8.9+): a real build of each scheme's
    portable export, its logits against ONNX Runtime CPU on the same graph (TF32/FP8 kernels: loose tolerance,
    top-1 agreement)."""
    from runtime import Engine

    eng_dir = tmp_path / "engine"
    export_tensorrt(exports[scheme], eng_dir, ProfileFlags(2, 64, 16))
    with Engine.load(exports[scheme]) as ref, Engine.load(eng_dir) as eng:
        assert eng.describe()["backend"] == "tensorrt"
        ids = np.array(ref.tokenizer.encode("import os\nimport sys\ndef main():\n    return 0\n"), dtype=np.int64)
        a, b = ref.score(ids), eng.score(ids)
        assert a.shape == b.shape
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
        assert np.abs(a - b).max() < 0.05 * max(1.0, np.abs(a).max())
        out = eng.generate("The quick brown fox", max_new_tokens=8, temperature=0)
        assert len(out.token_ids) > 0


def test_real_2_4_pruned_checkpoint_builds_with_sparse_weights(tiny_dir, tmp_path):
    """kiln.json of a real Wanda 2:4 prune -> ONNX -> the builder gets SPARSE_WEIGHTS (and nothing else)."""
    from compress.prune import NM, Wanda, prune_checkpoint

    ckpt = prune_checkpoint(str(tiny_dir), tmp_path / "pruned", Wanda(sparsity=NM(2, 4)), calib_samples=2,
                            calib_seq_len=32, progress=False)
    assert ckpt
    export_onnx(str(tmp_path / "pruned"), tmp_path / "onnx", opset=21, validate=False)
    trt = RecordingTensorRT("11.1.0")
    m = export_tensorrt(tmp_path / "onnx", tmp_path / "engine", ProfileFlags(2, 64, 16), trt=trt,
                        cudart=RecordingCudart())
    assert [a[0].name for a in trt.args("IBuilderConfig.set_flag")] == ["SPARSE_WEIGHTS"]
    assert m.engine.settings.sparse_2_4 and m.passes[0].kind == "prune" and m.passes[0].pattern == "2:4"
    assert len(m.passes[0].layers) == 14 and m.engine.settings.formats == {}
