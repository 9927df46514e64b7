"""Per-layer self-validation: each decoder layer's subgraph against the torch layer on the same input, for
models whose float32 copy does not fit; chosen automatically under a memory budget."""
from __future__ import annotations

import json

import pytest

from export.errors import ExportError
from export.onnx import export_onnx
from runtime.manifest import read_manifest
from tests.export.onnx_helpers import make_quantized


@pytest.fixture(scope="module")
def int4_ckpt(tiny_dir, tmp_path_factory):
    return make_quantized(tiny_dir, tmp_path_factory.mktemp("vl") / "ck", "int4")


@pytest.mark.parametrize("form", ["portable", "ort"])
def test_per_layer_validation_of_a_quantized_checkpoint(int4_ckpt, tmp_path, form):
    m = export_onnx(str(int4_ckpt), tmp_path / "a", form=form, validation="per-layer")
    v = m.validation
    assert v.passed and v.mode == "per-layer" and v.reason == "asked for"
    assert [c.layer for c in v.per_layer] == [0, 1, -1]  # every decoder layer, then norm + lm_head
    assert max(c.graph for c in v.per_layer) <= 1e-5  # the graph's own math is the fake-quant torch layer's
    assert 0 < max(c.ort_cpu for c in v.per_layer) <= v.tolerance == 0.08  # ORT's int8-activation kernel
    again = read_manifest(tmp_path / "a").validation
    assert again == v


def test_auto_picks_per_layer_under_a_small_budget(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from kiln.cli import cli

    out = tmp_path / "a"
    r = CliRunner().invoke(cli, ["export", "onnx", str(tiny_dir), "-o", str(out), "--max-memory", "1MB", "--json"])
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout.strip().splitlines()[-1])["validation"]
    assert v["mode"] == "per-layer" and "over 0.0 GiB" in v["reason"] and v["per_layer"][0]["graph"] <= 1e-5
    m = export_onnx(str(tiny_dir), tmp_path / "b")  # plenty of memory: the whole model, greedy tokens too
    assert m.validation.mode == "whole-model" and m.validation.greedy_identical_prefix == 32


def test_a_wrong_graph_is_caught_at_its_layer_and_nothing_is_written(tiny_dir, tmp_path, monkeypatch):
    from export.onnx import decoder

    real = decoder._mlp

    def no_gate(b, w, h, arch, p, ns):  # an exporter bug: layer 1's MLP without its SiLU gate
        if not p.endswith(".1"):
            return real(b, w, h, arch, p, ns)
        op = b.op
        b.op = _drop_sigmoid(op)
        try:
            return real(b, w, h, arch, p, ns)
        finally:
            b.op = op

    monkeypatch.setattr(decoder, "_mlp", no_gate)
    with pytest.raises(ExportError, match="per layer.*layer 1's graph math differs"):
        export_onnx(str(tiny_dir), tmp_path / "bad", validation="per-layer")
    assert not (tmp_path / "bad").exists()


def _drop_sigmoid(op):
    def patched(op_type, inputs, name, *a, **kw):
        if op_type == "Sigmoid":
            op_type = "Identity"
        return op(op_type, inputs, name, *a, **kw)
    return patched
