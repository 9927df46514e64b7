"""benchmarks/scale_decode.py's weight-kernel floor on a real (tiny) int4 ort-form export: the products it times
are the graph's DequantizeLinear -> MatMul weights, with their shapes, bits and blocks."""
from __future__ import annotations

import pytest

from benchmarks.scale_decode import kernel_floor, weight_products


@pytest.fixture(scope="module")
def int4_ort(tiny_dir, tmp_path_factory):
    from compress.quant.config import config_for
    from compress.quant.entry import quantize_checkpoint
    from export.onnx import export_onnx

    root = tmp_path_factory.mktemp("floor")
    quantize_checkpoint(str(tiny_dir), config_for("int4", method="rtn", group_size=32), root / "ck",
                        eval_windows=None)
    export_onnx(str(root / "ck"), root / "art", form="ort", validate=False)
    return root / "art"


def test_weight_products_and_floor(int4_ort):
    from runtime.manifest import read_manifest

    a = read_manifest(int4_ort).architecture
    prods = weight_products(int4_ort)
    h, i, kv = a.hidden, a.intermediate, a.kv_heads * a.head_dim
    # per layer (ort form): q/k/v stacked, o, gate, up as int4 in blocks of 32, down; then the tied int8 head
    # (per channel: ONNX Runtime's fused kernel keeps a scale per 32 inputs)
    per_layer = sorted([(h, h + 2 * kv, 4, 32), (h, h, 4, 32), (h, i, 4, 32), (h, i, 4, 32), (i, h, 4, 32)])
    assert sorted(prods) == sorted(per_layer * a.layers + [(h, a.vocab, 8, 32)])
    f = kernel_floor(int4_ort, threads=1, runs=1)
    want = sum(n * k * bits // 8 + n * (k // block) * 4 for k, n, bits, block in prods)
    assert f["products"] == len(prods) and f["weight_bytes"] == want and f["floor_ms"] > 0
