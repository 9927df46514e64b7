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


def _pipeline(tiny_dir, out, recipe_text, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text)
    r = CliRunner().invoke(cli, ["pipeline", str(tiny_dir), "-o", str(out), "--recipe", str(recipe), "--json",
                                 "--no-bench"])
    assert r.exit_code == 0, r.output
    return {s["name"]: s for s in json.loads(r.stdout.strip().splitlines()[-1])["stages"]}


@pytest.mark.slow  # two pipelines end to end on the tiny model
def test_pipeline_kv_cache_and_budget(tiny_dir, tmp_path):
    """``export: {kv_cache: int8}`` records the static KV scales in the quantize pass and the ONNX Runtime form
    uses them (the reference keeps a float cache); the stage's perplexity goes through the cache, so it equals
    `kiln eval ppl --chunk 128`. A ``budget`` pass runs the search and leaves no second artifact; reruns reuse
    both."""
    from runtime.manifest import read_manifest

    out = tmp_path / "kv"
    text = ("passes:\n  - kind: quantize\n    config: {scheme: int8-wo, calibration: {samples: 4, seq_len: 64}}\n"
            "export: {form: ort, kv_cache: int8}\neval: {windows: 1, seq_len: 256}\n")
    st = _pipeline(tiny_dir, out, text, tmp_path)
    ck, art = read_manifest(out / "quantized"), read_manifest(out / "onnx")
    assert ck.kv_cache is not None and ck.kv_cache.calibrated_by == "quantize"
    assert art.io.kv_dtype == "int8" and art.io.kv_static and art.kv_cache.calibrated_by == "quantize"
    assert not read_manifest(out / "reference-onnx").io.kv_quantized
    e = CliRunner().invoke(cli, ["eval", "ppl", str(out / "onnx"), "--windows", "1", "--seq-len", "256", "--chunk",
                                 "128", "--json"])
    assert e.exit_code == 0, e.output
    assert json.loads(e.stdout.strip().splitlines()[-1])["ppl"] == st["onnx"]["ppl"]
    st = _pipeline(tiny_dir, out, text, tmp_path)
    assert all(s["reused"] for n, s in st.items() if n != "source"), st
    st = _pipeline(tiny_dir, out, text.replace("kv_cache: int8", "kv_cache: float"), tmp_path)
    assert st["quantized"]["reused"] and not st["onnx"]["reused"]  # the scales stay; the cache is float again
    assert not read_manifest(out / "onnx").io.kv_quantized

    out = tmp_path / "budget"
    text = ("passes:\n  - kind: quantize\n    config: {budget: 1.5, calibration: {samples: 6, seq_len: 48}}\n"
            "eval: {windows: 1, seq_len: 64}\n")
    st = _pipeline(tiny_dir, out, text, tmp_path)
    rec = read_manifest(out / "quantized").quant_passes()[-1].stats["budget"]
    assert rec["budget"] == 1.5 and rec["formats"] == ["int4", "int8-wo"] and rec["target"] == "cpu"
    assert rec["rounds"][-1]["measured_ratio"] <= 1.5 and not (out / "quantized-onnx").exists()
    assert st["onnx"]["validation"]["passed"] is True
    st = _pipeline(tiny_dir, out, text, tmp_path)
    assert all(s["reused"] for n, s in st.items() if n != "source"), st
