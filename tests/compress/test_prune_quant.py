"""Prune then quantize: the zeros of a 2:4 mask survive quantization, and kiln.json keeps both passes in order."""
import copy
import json

import pytest
import torch
from click.testing import CliRunner

from compress.loading import load_model
from compress.prune import NM, Wanda, prune_, prune_checkpoint
from compress.calib import calibration_batches

quant = pytest.importorskip("compress.quant", reason="compress.quant is not in this tree")


@pytest.fixture(scope="module")
def pruned(tiny_dir):
    model, tok, _ = load_model(str(tiny_dir))
    calib = calibration_batches(tok, "builtin:pydoc", 4, 64)
    prune_(model, Wanda(NM(2, 4)), calib=calib)
    zeros = {n: (m.weight == 0).clone() for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    return model, calib, zeros


def _nonzero_codes_where_pruned(model, zeros):
    from compress.quant.modules import QuantLinear

    seen, bad = 0, 0
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear) and n in zeros:
            seen += 1
            bad += int((m.codes[zeros[n]].float() != 0).sum())
            assert (m.weight[zeros[n]] == 0).all(), n
    assert seen == len(zeros)
    return bad


@pytest.mark.parametrize("make", [
    lambda q: q.Int8WeightOnly(method="rtn"), lambda q: q.Fp8(), lambda q: q.SmoothQuantInt8(),
    lambda q: q.Int8Dynamic(), lambda q: q.Int4(group_size=32, method="rtn"),
], ids=["int8-wo-rtn", "fp8", "int8-sq", "int8-dyn", "int4-rtn"])
def test_symmetric_quantization_keeps_2of4_zeros(pruned, make):
    model, calib, zeros = pruned
    q = copy.deepcopy(model)
    quant.quantize_(q, make(quant), calib=calib)
    assert _nonzero_codes_where_pruned(q, zeros) == 0


@pytest.mark.parametrize("make", [lambda q: q.Int8WeightOnly(method="gptq"),
                                  lambda q: q.Int4(group_size=32, method="gptq")], ids=["int8-wo-gptq", "int4-gptq"])
def test_gptq_keeps_2of4_zeros(pruned, make):
    model, calib, zeros = pruned
    q = copy.deepcopy(model)
    quant.quantize_(q, make(quant), calib=calib)
    assert _nonzero_codes_where_pruned(q, zeros) == 0


def test_cli_prune_then_quantize_records_both_passes(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    from kiln.cli import cli

    sparse = tmp_path / "sparse"
    prune_checkpoint(str(tiny_dir), sparse, Wanda(NM(2, 4)), calib_samples=4, calib_seq_len=64, progress=False)
    out = tmp_path / "sparse-fp8"
    r = CliRunner().invoke(cli, ["compress", "quantize", str(sparse), "--scheme", "fp8", "-o", str(out),
                                 "--calib-samples", "2", "--seq-len", "64", "--eval-windows", "0"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "kiln.json").read_text())
    assert [p["kind"] for p in m["passes"]] == ["prune", "quantize"]
    assert m["passes"][0]["config"] == {"method": "wanda", "pattern": "2:4",
                                        "calibration": {"text": "builtin:pydoc", "samples": 4, "seq_len": 64}}
    before = load_file(str(sparse / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    for k, w in before.items():
        if k.startswith("model.layers.") and k.endswith("_proj.weight"):
            assert (after[k][w == 0].float() == 0).all(), k
