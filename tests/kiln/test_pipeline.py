import json

import pytest
from click.testing import CliRunner

from kiln.cli import cli


@pytest.mark.slow  # end to end, ~20-30 s on 2 cores: CI runs it, the fast loop skips it
def test_pipeline_tiny_end_to_end_and_resume(tiny_dir, tmp_path):
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - kind: quantize\n    config: {scheme: int8-wo}\n"
                      "eval: {windows: 2, seq_len: 128}\nbench: {new_tokens: 16, runs: 1}\n")
    args = ["pipeline", str(tiny_dir), "-o", str(out), "--recipe", str(recipe), "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    # the log is the pipeline's own lines: none of transformers' per-tensor bars, warnings or blank lines
    assert "Loading weights" not in r.stderr and "Writing model shards" not in r.stderr and "\n\n" not in r.stderr
    names = [s["name"] for s in rep["stages"]]
    assert names == ["source", "quantized", "reference-onnx", "onnx"]
    by = {s["name"]: s for s in rep["stages"]}
    assert by["onnx"]["validation"]["passed"] is True
    assert abs(by["onnx"]["ppl_ratio"] - 1) < 0.01  # int8-wo on the tiny model barely moves perplexity
    assert by["onnx"]["decode_tokens_per_s"] > 0 and by["onnx"]["bytes_on_disk"] < by["reference-onnx"]["bytes_on_disk"]
    for f in ("report.json", "report.md", "report.png"):
        assert (out / f).is_file()
    assert json.loads((out / "report.json").read_text())["stages"][3]["ppl"] == by["onnx"]["ppl"]

    # the report's perplexity is what `kiln eval ppl` says about the artifact
    e = CliRunner().invoke(cli, ["eval", "ppl", str(out / "onnx"), "--windows", "2", "--seq-len", "128", "--json"])
    assert e.exit_code == 0, e.output
    assert json.loads(e.stdout.strip().splitlines()[-1])["ppl"] == by["onnx"]["ppl"]

    # a rerun reuses every finished stage
    r2 = CliRunner().invoke(cli, args + ["--no-bench"])
    assert r2.exit_code == 0, r2.output
    rep2 = json.loads(r2.stdout.strip().splitlines()[-1])
    assert all(s["reused"] for s in rep2["stages"] if s["name"] != "source")

    # target cpu exports the ONNX Runtime form; a recipe that asks for the portable one gets it, not the reuse
    from runtime.manifest import read_manifest

    assert read_manifest(out / "onnx").io.form == "ort"
    recipe.write_text(recipe.read_text() + "export: {form: portable}\n")
    r3 = CliRunner().invoke(cli, args + ["--no-bench"])
    assert r3.exit_code == 0, r3.output
    rep3 = {s["name"]: s for s in json.loads(r3.stdout.strip().splitlines()[-1])["stages"]}
    assert rep3["quantized"]["reused"] and not rep3["onnx"]["reused"]
    assert read_manifest(out / "onnx").io.form == "portable"
