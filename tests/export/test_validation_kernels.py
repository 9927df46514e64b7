"""kiln.json's validation record names the ONNX Runtime kernels its optimized session ran that the graph does
not contain (``ort_cpu.kernels``): where an artifact's numbers part from its checkpoint's. On a tiny int8-sq
model the graph's own math (basic optimizations) matches the fake-quant torch model to 1e-7 of the logit range;
all optimizations fuse QDQ groups into MatMulIntegerToFloat and MatMulNBits and move the logits by about 1%
of the range, and with ONNX Runtime's QDQ fusions disabled they match again."""
from __future__ import annotations

import numpy as np
import pytest

from export.onnx import export_onnx
from export.onnx.validate import PROMPT, run_ort
from runtime.manifest import read_manifest


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    from compress.quant.config import config_for
    from compress.quant.entry import quantize_checkpoint

    root = tmp_path_factory.mktemp("vk")
    out = {}
    for scheme in ("int8-sq", "fp8"):
        quantize_checkpoint(str(tiny_dir), config_for(scheme, method="rtn"), root / scheme, calib_samples=2,
                            seq_len=32, eval_windows=None)
        export_onnx(str(root / scheme), root / f"{scheme}-onnx")
        out[scheme] = (root / scheme, root / f"{scheme}-onnx")
    return out


def test_int8_sq_difference_is_in_the_qdq_fusions(exported):
    import onnxruntime as ort
    import torch

    from compress.loading import load_model

    ck, art = exported["int8-sq"]
    v = read_manifest(art).validation
    assert v.graph.kernels == {} and v.graph.value < 1e-6, v.graph  # measured 9e-8
    assert {"MatMulIntegerToFloat", "MatMulNBits"} <= set(v.ort_cpu.kernels), v.ort_cpu.kernels
    assert v.ort_cpu.value > 1e-3, v.ort_cpu.value  # measured 0.013
    model, tok, _ = load_model(str(ck))
    ids = np.asarray([tok(PROMPT, add_special_tokens=False)["input_ids"][:24]])
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    arch = read_manifest(art).architecture
    rel = {}
    for name, disabled in (("all", []), ("no qdq fusions", ["QDQSelectorActionTransformer"])):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(art / "model.onnx"), so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=disabled)
        out, _ = run_ort(sess, ids, None, arch)
        rel[name] = float(np.abs(out - ref).max() / (ref.max() - ref.min()))
    assert rel["all"] > 1e-3 and rel["no qdq fusions"] < 1e-6, rel


def test_fp8_graph_runs_without_quantized_matmul_fusions(exported):
    _, art = exported["fp8"]
    v = read_manifest(art).validation
    assert not {"MatMulNBits", "MatMulIntegerToFloat"} & set(v.ort_cpu.kernels), v.ort_cpu.kernels
    assert v.ort_cpu.value < 1e-6 and v.graph.value < 1e-6, (v.ort_cpu.value, v.graph.value)  # measured 1.2e-7
