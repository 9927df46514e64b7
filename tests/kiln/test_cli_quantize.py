"""`kiln compress quantize` end to end on the tiny model: artifact, --json, and one-line errors."""
import json

from click.testing import CliRunner

from kiln.cli import cli
from runtime.fsutil import sha256_file


def _run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_quantize_writes_checkpoint_and_reports(tiny_copy, tmp_path):
    before = {p.name: sha256_file(p) for p in tiny_copy.iterdir() if p.is_file()}
    out = tmp_path / "q"
    r = _run(["compress", "quantize", str(tiny_copy), "--scheme", "int8-dyn", "-o", str(out), "--calib-samples", "2",
              "--seq-len", "64", "--eval-windows", "2", "--ignore", "lm_head", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["scheme"] == "int8-dyn" and res["quantized_layers"] == 14
    assert res["bytes_on_disk"] > 0 and 0.9 < res["perplexity"]["ratio"] < 1.5
    man = json.loads((out / "kiln.json").read_text())
    q = man["passes"][-1]
    assert q["kind"] == "quantize" and q["config"]["scheme"] == "int8-dyn" and "lm_head" not in q["layers"]
    assert {p.name: sha256_file(p) for p in tiny_copy.iterdir() if p.is_file()} == before
    r = _run(["eval", "ppl", str(out), "--seq-len", "64", "--windows", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert abs(json.loads(r.stdout.strip().splitlines()[-1])["ppl"] - res["perplexity"]["ppl"]) < 1e-3
    # quantizing a quantized checkpoint is refused, in one line
    r = _run(["compress", "quantize", str(out), "--scheme", "int4", "-o", str(tmp_path / "qq")])
    assert r.exit_code == 2 and "already quantized" in r.output and not (tmp_path / "qq").exists()


def test_unknown_scheme_and_short_calibration(tiny_dir, tmp_path):
    r = _run(["compress", "quantize", str(tiny_dir), "--scheme", "int2", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "valid schemes: int8-wo, fp8, int8-sq, int8-dyn, int4" in r.output
    short = tmp_path / "short.txt"
    short.write_text("tiny text " * 50)
    r = _run(["compress", "quantize", str(tiny_dir), "--scheme", "fp8", "-o", str(tmp_path / "y"),
              "--calib", str(short)])
    assert r.exit_code == 2 and "calibration text too short" in r.output and "tokens" in r.output
    assert not (tmp_path / "y").exists()


def test_kernel_option(tiny_dir, tmp_path):
    """--kernel fine is recorded in every LayerSpec of a weight-only scheme; elsewhere it is a one-line error."""
    out = tmp_path / "fine"
    r = _run(["compress", "quantize", str(tiny_dir), "--scheme", "int8-wo", "--method", "rtn", "--kernel", "fine",
              "-o", str(out), "--eval-windows", "0", "--json"])
    assert r.exit_code == 0, r.output
    layers = json.loads((out / "kiln.json").read_text())["passes"][-1]["layers"]
    assert len(layers) == 15 and {v["kernel"] for v in layers.values()} == {"fine"}
    r = _run(["compress", "quantize", str(tiny_dir), "--scheme", "fp8", "--kernel", "fine", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--kernel applies to the weight-only schemes" in r.output
    r = _run(["compress", "quantize", str(tiny_dir), "--budget", "1.01", "--formats", "int8-wo,float", "--kernel",
              "fine", "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "--kernel, --method and --kv-cache apply to --scheme" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
