"""A checkpoint that mixes formats Linear by Linear (several quantize passes, each on the Linears still float)
exports and validates: the graph follows each Linear's LayerSpec, whatever preset made it."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from runtime.layerspec import LayerSpec
from runtime.manifest import read_manifest

ATTN = r"re:model\.layers\.[23]\.self_attn\.\w+_proj"
MLP = r"re:model\.layers\.[23]\.mlp\.\w+_proj"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """4 layers: layer 0 fp8 W8A8 (static scales), layer 1 float, layers 2-3 int4 attention and int8 MLP,
    lm_head int8 (tied)."""
    from compress.calib import calibration_batches
    from compress.checkpoint import source_record
    from compress.loading import load_model
    from compress.quant import Fp8, Int4, Int8WeightOnly, quantize_, save_quantized
    from tests.tiny import save_tiny

    root = tmp_path_factory.mktemp("mixed")
    src = save_tiny(root / "src", layers=4)
    model, tok, info = load_model(str(src))
    calib = calibration_batches(tok, samples=2, seq_len=64)
    quantize_(model, Fp8(targets=(r"re:model\.layers\.0\..*",)), calib=calib)
    quantize_(model, Int4(method="rtn", group_size=32, targets=(ATTN,)))
    quantize_(model, Int8WeightOnly(method="gptq", targets=(MLP, "lm_head")), calib=calib)
    x = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=x).logits
    save_quantized(model, tok, root / "ck", source=source_record(info))
    return root, x, logits


def test_passes_and_specs_are_recorded_per_linear(mixed):
    root, x, logits = mixed
    m = read_manifest(root / "ck")
    assert [p.preset for p in m.quant_passes()] == ["fp8", "int4", "int8-wo"]
    specs = m.layer_specs()
    fp8 = LayerSpec("fp8", act="fp8", act_granularity="tensor")
    assert {specs[f"model.layers.0.{n}"] for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")} == {fp8}
    assert not any(n.startswith("model.layers.1.") for n in specs)
    assert specs["model.layers.2.self_attn.k_proj"] == specs["model.layers.3.self_attn.o_proj"] == \
        LayerSpec("int4", group_size=32)
    assert specs["model.layers.3.mlp.down_proj"] == specs["lm_head"] == LayerSpec("int8")
    assert len(specs) == 7 + 4 * 2 + 3 * 2 + 1
    from compress.loading import load_model

    again, _, _ = load_model(str(root / "ck"))  # the stored codes rebuild the same fake-quant model
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, logits)


def test_portable_export_follows_each_spec_and_validates(mixed):
    from export.onnx import export_onnx

    root, _, _ = mixed
    m = export_onnx(str(root / "ck"), root / "art")
    v = m.validation
    assert v.passed and v.graph.value <= 1e-4 and v.tolerance == 0.1  # the loosest spec (fp8 x fp8) sets it
    g = onnx.load(str(root / "art" / "model.onnx"), load_external_data=False).graph
    prod = {o: n for n in g.node for o in n.output}
    init = {t.name: t for t in g.initializer}
    T = onnx.TensorProto

    def weight_of(ns):
        mm = next(n for n in g.node if n.name == f"{ns}/MatMul")
        src = prod.get(mm.input[1])
        return (init[src.input[0]].data_type, prod.get(mm.input[0])) if src is not None and \
            src.op_type == "DequantizeLinear" else (None, prod.get(mm.input[0]))

    dt, act = weight_of("/model/layers.0/mlp/up_proj")
    assert dt == T.FLOAT8E4M3FN and act.op_type == "DequantizeLinear"  # fp8 input QDQ in front
    assert weight_of("/model/layers.1/mlp/up_proj")[0] is None  # float
    assert weight_of("/model/layers.2/attn/q_proj")[0] == T.INT4
    dt, act = weight_of("/model/layers.3/mlp/down_proj")
    assert dt == T.INT8 and act.op_type != "DequantizeLinear"  # weight-only


def test_ort_form_takes_the_mix_without_static_scales(mixed, tmp_path):
    from compress.loading import load_model
    from compress.quant import Int4, Int8WeightOnly, quantize_, save_quantized
    from compress.checkpoint import source_record
    from export.errors import ExportError
    from export.onnx import export_onnx

    root, _, _ = mixed
    with pytest.raises(ExportError, match="7 Linear.*static scale.*--form portable"):
        export_onnx(str(root / "ck"), tmp_path / "no", form="ort")
    model, tok, info = load_model(str(root / "src"))
    quantize_(model, Int4(method="rtn", group_size=32, targets=(ATTN,)))
    quantize_(model, Int8WeightOnly(method="rtn", targets=(MLP, "lm_head")))
    save_quantized(model, tok, tmp_path / "ck", source=source_record(info))
    m = export_onnx(str(tmp_path / "ck"), tmp_path / "art", form="ort")
    assert m.validation.passed and m.validation.graph.value <= 1e-4 and m.io.form == "ort"
    names = {n.name for n in onnx.load(str(tmp_path / "art" / "model.onnx"), load_external_data=False).graph.node}
    assert "/model/layers.2/attn/qkv_proj/MatMul" in names  # q/k/v share a spec: stacked into one product
    assert "/model/layers.0/attn/qkv_proj/MatMul" in names and np.isfinite(m.validation.value)


def test_exact_kernel_is_refused_in_one_line(mixed, tmp_path):
    """A spec asking for the exact weight-only kernel (float activations) is refused before any graph is
    written: no exporter builds one (docs/QUANTIZATION.md)."""
    import json
    import shutil

    from export.errors import ExportError
    from export.onnx import export_onnx

    root, _, _ = mixed
    ck = tmp_path / "ck"
    shutil.copytree(root / "ck", ck)
    doc = json.loads((ck / "kiln.json").read_text())
    layers = next(p["layers"] for p in doc["passes"] if "model.layers.2.mlp.down_proj" in p["layers"])
    layers["model.layers.2.mlp.down_proj"]["kernel"] = "exact"
    (ck / "kiln.json").write_text(json.dumps(doc))
    with pytest.raises(ExportError, match=r"^1 Linear\(s\) ask for the exact .*model\.layers\.2\.mlp\.down_proj"):
        export_onnx(str(ck), tmp_path / "art")
    assert not (tmp_path / "art").exists()
    layers["model.layers.2.mlp.down_proj"]["kernel"] = "fast"
    (ck / "kiln.json").write_text(json.dumps(doc))
    m = export_onnx(str(ck), tmp_path / "art", validate=False)
    assert m.layer_specs()["model.layers.2.mlp.down_proj"].kernel == "fast"
