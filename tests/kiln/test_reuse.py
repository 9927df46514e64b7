"""Item 14: `kiln pipeline` reuses a stage only when it would make the same output: a changed calibration
(samples), opset or a weaker validation redoes the stages it shapes; an unchanged recipe reuses everything."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kiln.cli import cli
from runtime.manifest import read_manifest

RECIPE = ("passes:\n  - kind: quantize\n    config: {{scheme: int8-wo, calibration: {{samples: {samples}, seq_len: 64}}}}\n"
          "eval: {{windows: 1, seq_len: 64}}\n{export}")


def _run(tiny_dir, out, recipe, samples, export=""):
    recipe.write_text(RECIPE.format(samples=samples, export=export))
    r = CliRunner().invoke(cli, ["pipeline", str(tiny_dir), "-o", str(out), "--recipe", str(recipe), "--json",
                                 "--no-bench"])
    assert r.exit_code == 0, r.output
    return {s["name"]: s for s in json.loads(r.stdout.strip().splitlines()[-1])["stages"]}


@pytest.mark.slow  # end to end, ~20-30 s on 2 cores: CI runs it, the fast loop skips it
def test_reuse_follows_calibration_opset_and_validation(tiny_dir, tmp_path):
    from export.onnx import export_onnx

    out, recipe = tmp_path / "out", tmp_path / "r.yaml"
    # a float artifact exported without validation sits where the pipeline's reference goes: not reused
    export_onnx(str(tiny_dir), out / "reference-onnx", form="portable", validate=False)
    portable = "export: {form: portable}\n"
    st = _run(tiny_dir, out, recipe, 4, portable)
    assert not st["reference-onnx"]["reused"] and not st["quantized"]["reused"]
    assert read_manifest(out / "reference-onnx").validation.passed is True
    calib = read_manifest(out / "quantized").passes[0].stats["calibration"]
    assert calib == {"text": "builtin:pydoc", "samples": 4, "seq_len": 64}

    st = _run(tiny_dir, out, recipe, 4, portable)  # unchanged: everything reused
    assert all(s["reused"] for n, s in st.items() if n != "source"), st

    st = _run(tiny_dir, out, recipe, 8, portable)  # more calibration samples: the checkpoint and its export
    assert not st["quantized"]["reused"] and not st["onnx"]["reused"] and st["reference-onnx"]["reused"]
    assert read_manifest(out / "quantized").passes[0].stats["calibration"]["samples"] == 8
    assert read_manifest(out / "onnx").passes[0].stats["calibration"]["samples"] == 8

    opset21 = "export: {form: portable, opset: 21}\n"  # the same form, another opset: both exports again
    st = _run(tiny_dir, out, recipe, 8, opset21)
    assert st["quantized"]["reused"] and not st["onnx"]["reused"] and not st["reference-onnx"]["reused"]
    assert read_manifest(out / "onnx").io.opset == read_manifest(out / "reference-onnx").io.opset == 21

    st = _run(tiny_dir, out, recipe, 8, opset21)
    assert all(s["reused"] for n, s in st.items() if n != "source"), st


def test_prune_calibration_is_part_of_the_key():
    """Prune passes record their calibration in the config, and only methods that calibrate are keyed on it."""
    from kiln.pipeline import _same_passes
    from runtime.records import PrunePass

    wanda = {"method": "wanda", "sparsity": 0.5}
    stored = [PrunePass(config={**wanda, "calibration": {"text": "builtin:pydoc", "samples": 64, "seq_len": 512}},
                        pattern="unstructured")]
    assert _same_passes(stored, [{"kind": "prune", "config": dict(wanda)}])
    assert not _same_passes(stored, [{"kind": "prune", "config": {**wanda, "calibration": {"samples": 32}}}])
    assert not _same_passes(stored, [{"kind": "prune", "config": {**wanda, "calibration": {"seq_len": 256}}}])
    magnitude = {"method": "magnitude", "sparsity": 0.5}
    stored = [PrunePass(config=dict(magnitude), pattern="unstructured")]
    assert _same_passes(stored, [{"kind": "prune", "config": {**magnitude, "calibration": {"samples": 8}}}])


def test_a_budget_pass_is_keyed_on_its_search():
    """A budget pass stands for the quantize passes its search wrote: reused when the last one records the same
    budget, target, formats and calibration, redone when any differs."""
    from kiln.pipeline import _same_passes
    from runtime.records import QuantPass

    calib = {"text": "builtin:pydoc", "samples": 16, "seq_len": 512}
    rec = {"budget": 1.02, "target": "cpu", "formats": ["int4", "int8-wo"], "calibration": calib, "rounds": []}
    stored = [QuantPass(config={"scheme": "int4"}, layers={}),
              QuantPass(config={"scheme": "int8-wo"}, layers={}, stats={"budget": rec})]
    want = {"kind": "quantize", "config": {"budget": 1.02, "formats": ["int4", "int8-wo"]}, "target": "cpu"}
    assert _same_passes(stored, [want])
    assert not _same_passes(stored, [want | {"config": {"budget": 1.01, "formats": ["int4", "int8-wo"]}}])
    assert not _same_passes(stored, [want | {"target": "h100"}])
    assert not _same_passes(stored, [want | {"config": {"budget": 1.02, "formats": ["int4", "int8-wo"],
                                                        "calibration": {"samples": 8}}}])
    assert not _same_passes(stored[:1], [want])  # a plain scheme pass is not a search
    prune = {"kind": "prune", "config": {"method": "magnitude", "sparsity": 0.5}}
    from runtime.records import PrunePass

    assert _same_passes([PrunePass(config=dict(prune["config"]), pattern="unstructured")] + stored, [prune, want])
    assert not _same_passes(stored, [prune, want])
