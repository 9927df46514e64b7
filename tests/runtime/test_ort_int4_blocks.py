"""Load-time re-blocking of int4 weights for ONNX Runtime's MatMulNBits: same weights, smaller activation blocks."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from runtime.backends.ort_graph import POSITIONS, reblock_weights, edited_graph


@pytest.fixture(scope="module")
def int4_art(tiny_dir, tmp_path_factory):
    from compress.calib import calibration_batches
    from compress.checkpoint import source_record
    from compress.loading import load_model
    from compress.quant import config_for, quantize_, save_quantized
    from export.onnx import export_onnx

    root = tmp_path_factory.mktemp("int4blocks")
    import torch

    model, tok, info = load_model(str(tiny_dir))
    with torch.no_grad():  # a few outlier channels, as trained LLMs have: they set the activation blocks' scales
        for layer in model.model.layers:
            layer.input_layernorm.weight[:2] *= 30
            layer.post_attention_layernorm.weight[:2] *= 30
    quantize_(model, config_for("int4", method="rtn"), calib=calibration_batches(tok, samples=2, seq_len=32))
    save_quantized(model, tok, root / "ck", source=source_record(info))
    export_onnx(str(root / "ck"), root / "art", validate=False)
    return root / "art"


def _session(model, root, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(root))
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _blocks(graph) -> list[int]:
    return sorted({a.i for n in graph.node if n.op_type == "DequantizeLinear" for a in n.attribute
                   if a.name == "block_size"})


def test_reblocked_graph_keeps_the_weights_and_tightens_the_kernel(int4_art):
    from tests.export.onnx_helpers import feeds
    from runtime.manifest import read_manifest

    g = onnx.load(str(int4_art / "model.onnx"), load_external_data=False).graph
    assert _blocks(g) == [64, 128]  # groups of 128, or 64 where 128 does not divide the input dim
    assert reblock_weights(g, int4_art) == 7 * 2  # q k v o gate up down in each of 2 layers
    assert _blocks(g) == [32]
    edited = edited_graph(int4_art / "model.onnx")
    assert _blocks(onnx.load_from_string(edited).graph) == [32]

    arch = read_manifest(int4_art).architecture
    ids = np.random.default_rng(0).integers(0, arch.vocab, (1, 48))
    f = feeds(arch, ids)
    path = str(int4_art / "model.onnx")
    exact = _session(path, int4_art, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC).run(["logits"], f)[0]
    fused = _session(path, int4_art, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(["logits"], f)[0]
    f[POSITIONS] = np.arange(ids.shape[1], dtype=np.int64)
    fused32 = _session(edited, int4_art, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(["logits"], f)[0]
    same = _session(edited, int4_art, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC).run(["logits"], f)[0]
    np.testing.assert_allclose(same, exact, atol=1e-5)  # the edit changes no weight: identical graph math
    err, err32 = np.abs(fused - exact).mean(), np.abs(fused32 - exact).mean()
    assert err32 < 0.8 * err  # the fused int8-activation kernel moves less off the exact math at block 32
