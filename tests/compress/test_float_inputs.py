"""``float_inputs``: named Linears of an activation scheme stay weight-only (quantized weights, float input)."""
from __future__ import annotations

import json

import pytest
import torch

from compress.calib import calibration_batches
from compress.errors import CompressError
from compress.loading import load_model
from compress.quant import config_for, quantize_
from compress.quant.modules import QuantLinear


@pytest.mark.parametrize("scheme", ["int8-sq", "fp8"])
def test_float_inputs_are_weight_only(tiny_dir, scheme):
    model, tok, _ = load_model(str(tiny_dir))
    ref, _, _ = load_model(str(tiny_dir))  # the float model, for the weights
    calib = calibration_batches(tok, samples=2, seq_len=64)
    rec = quantize_(model, config_for(scheme, float_inputs=("down_proj",), method="rtn"), calib=calib)  # RTN weights
    for name, spec in rec.layers.items():
        if name.endswith("down_proj"):
            assert spec.act is None and spec.weight == ("int8" if scheme == "int8-sq" else "fp8")
        elif name != "lm_head":
            assert spec.act == ("int8" if scheme == "int8-sq" else "fp8")
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(down, QuantLinear) and down.input_scale is None
    # the weight-only layer applies its dequantized weights to the float input (no rounding of x), and those
    # weights are close to the float ones (no smoothing folded in: its group has no activation scale)
    x = torch.randn(3, down.in_features)
    from compress.quant import primitives as P

    torch.testing.assert_close(down(x), x @ P.dequantize(down.codes, down.weight_scale).T)
    w = ref.get_submodule("model.layers.0.mlp.down_proj").weight
    assert (down.weight - w).norm() / w.norm() < (0.01 if scheme == "int8-sq" else 0.05)
    assert rec.config.float_inputs == ("down_proj",)


def test_float_inputs_bad_pattern_and_cli(tiny_dir, tmp_path):
    with pytest.raises(CompressError, match="float_inputs"):
        config_for("int8-sq", float_inputs=("re:(",))
    from click.testing import CliRunner

    from kiln.cli import cli

    r = CliRunner().invoke(cli, ["compress", "quantize", str(tiny_dir), "--scheme", "int8-wo", "-o",
                                 str(tmp_path / "q"), "--float-inputs", "down_proj"])
    assert r.exit_code == 2 and "--float-inputs applies to fp8, int8-sq and int8-dyn" in r.output
    assert not (tmp_path / "q").exists()
    out = tmp_path / "sq"
    r = CliRunner().invoke(cli, ["compress", "quantize", str(tiny_dir), "--scheme", "int8-sq", "-o", str(out),
                                 "--float-inputs", "down_proj", "--calib-samples", "2", "--seq-len", "64",
                                 "--eval-windows", "0", "--json"])
    assert r.exit_code == 0, r.output
    layers = json.loads((out / "kiln.json").read_text())["passes"][-1]["layers"]
    assert layers["model.layers.1.mlp.down_proj"]["act"] is None and layers["model.layers.1.mlp.up_proj"]["act"] == "int8"
    from export.onnx import export_onnx

    m = export_onnx(str(out), tmp_path / "art")  # the portable graph: int8 weight-only down_proj, QDQ elsewhere
    assert m.validation.passed and m.validation.graph.value <= 1e-4
