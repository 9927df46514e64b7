"""Grouped weights are written at blocks of 32 inputs (each scale repeated): the same weights, and ONNX
Runtime's fused int8-activation kernel (MatMulNBits, which quantizes activations per weight block) stays
closer to the exact math than at the checkpoint's groups of 64/128."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from runtime.manifest import read_manifest


def _outlier_checkpoint(tiny_dir, out, scheme: str, **kw) -> None:
    """The tiny model with a few outlier channels, as trained LLMs have (they set the activation blocks'
    scales), quantized by round to nearest to ``scheme`` and saved to ``out``."""
    import torch

    from compress.calib import calibration_batches
    from compress.checkpoint import source_record
    from compress.loading import load_model
    from compress.quant import config_for, quantize_, save_quantized

    model, tok, info = load_model(str(tiny_dir))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:2] *= 30
            layer.post_attention_layernorm.weight[:2] *= 30
    quantize_(model, config_for(scheme, method="rtn", **kw), calib=calibration_batches(tok, samples=2, seq_len=32))
    save_quantized(model, tok, out, source=source_record(info))


@pytest.fixture(scope="module")
def int4_ckpt(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("int4blocks")
    _outlier_checkpoint(tiny_dir, root / "ck", "int4")
    return root


def _blocks(path) -> list[int]:
    g = onnx.load(str(path), load_external_data=False).graph
    return sorted({a.i for n in g.node if n.op_type == "DequantizeLinear" for a in n.attribute
                   if a.name == "block_size"})


def _logits(path, level, f):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(["logits"], f)[0]


def _fused_errors(exact_graph, graphs, arch) -> list[float]:
    """Each graph's unfused logits equal ``exact_graph``'s (the same weights); returns each graph's mean
    |logits - exact| once ONNX Runtime fuses DequantizeLinear -> MatMul into its int8-activation kernel."""
    from tests.export.onnx_helpers import feeds

    f = feeds(arch, np.random.default_rng(0).integers(0, arch.vocab, (1, 48)))
    basic, every = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    exact = _logits(exact_graph, basic, f)
    for g in graphs:
        np.testing.assert_allclose(_logits(g, basic, f), exact, atol=1e-5)
    return [float(np.abs(_logits(g, every, f) - exact).mean()) for g in graphs]


def test_grouped_weights_are_written_at_blocks_of_32(int4_ckpt, monkeypatch):
    from export.onnx import export_onnx, qdq

    export_onnx(str(int4_ckpt / "ck"), int4_ckpt / "b32", validate=False)
    m = read_manifest(int4_ckpt / "b32")
    assert {s.group_size for s in m.layer_specs().values() if s.weight == "int4"} == {64, 128}  # the checkpoint's
    assert m.io.weight_block == 32 and _blocks(int4_ckpt / "b32" / "model.onnx") == [32]
    monkeypatch.setattr(qdq, "GRAPH_BLOCK", 128)  # the graph at the checkpoint's own groups, to compare
    export_onnx(str(int4_ckpt / "ck"), int4_ckpt / "native", validate=False)
    assert _blocks(int4_ckpt / "native" / "model.onnx") == [64, 128]

    native, b32 = int4_ckpt / "native" / "model.onnx", int4_ckpt / "b32" / "model.onnx"
    err_native, err32 = _fused_errors(native, [native, b32], m.architecture)
    assert err32 < 0.8 * err_native


@pytest.fixture(scope="module")
def int8_ckpts(tiny_dir, tmp_path_factory):
    """int8-wo RTN checkpoints of the same outlier model, with the default (fast) and the fine kernel."""
    root = tmp_path_factory.mktemp("int8fine")
    for kernel in (None, "fine"):
        _outlier_checkpoint(tiny_dir, root / f"ck-{kernel or 'fast'}", "int8-wo", kernel=kernel)
    return root


def test_fine_kernel_writes_blocks_of_16_and_stays_closer(int8_ckpts):
    """kernel "fine": the same int8 weights, their per-channel scales repeated per block of 16 inputs, so ONNX
    Runtime's fused kernel quantizes the activations per 16 inputs; the logits come closer to the exact math."""
    from export.onnx import export_onnx

    for k in ("fast", "fine"):
        export_onnx(str(int8_ckpts / f"ck-{k}"), int8_ckpts / k, validate=False)
    fine = read_manifest(int8_ckpts / "fine")
    assert {s.kernel for s in fine.layer_specs().values()} == {"fine"}
    assert fine.io.weight_block == 16 and _blocks(int8_ckpts / "fine" / "model.onnx") == [16]
    assert read_manifest(int8_ckpts / "fast").io.weight_block is None
    assert _blocks(int8_ckpts / "fast" / "model.onnx") == []

    fast_g, fine_g = int8_ckpts / "fast" / "model.onnx", int8_ckpts / "fine" / "model.onnx"
    err_fast, err_fine = _fused_errors(fast_g, [fast_g, fine_g], fine.architecture)
    print(f"fused-kernel error: fast {err_fast:.3e}, fine {err_fine:.3e}")
    assert err_fine < 0.8 * err_fast


def test_fine_kernel_spec_rules():
    from compress.errors import CompressError
    from compress.quant import config_for
    from runtime.layerspec import LayerSpec

    with pytest.raises(ValueError, match="int8 and int4"):
        LayerSpec("fp8", kernel="fine")
    with pytest.raises(ValueError, match="kernel must be one of"):
        LayerSpec("int8", kernel="slow")
    with pytest.raises(CompressError, match="kernel must be one of fast, fine"):
        config_for("int8-wo", kernel="exact")
    assert config_for("int4", kernel="fine").head_spec(64) == LayerSpec("int8", kernel="fine")
