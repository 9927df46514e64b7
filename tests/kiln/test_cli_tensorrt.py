"""`kiln export tensorrt` / `kiln export triton` from the command line."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from kiln.cli import cli
from tests.export.trt_fixtures import contract_artifact

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TRT, reason="checks the behaviour on machines without TensorRT")
def test_tensorrt_without_tensorrt_is_one_line_exit_2_nothing_written(tmp_path, tiny_dir):
    art = contract_artifact(tmp_path / "art", tiny_dir)
    out = tmp_path / "engine"
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "export", "tensorrt", str(art), "-o", str(out)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT is not available")
    assert "pip install 'llmkiln[gpu]'" in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == "" and not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_tensorrt_help_lists_the_flags():
    r = CliRunner().invoke(cli, ["export", "tensorrt", "--help"])
    assert r.exit_code == 0
    for flag in ("--max-batch", "--max-seq", "--opt-seq", "--timing-cache", "--workspace-gb", "--version-compatible",
                 "--json"):
        assert flag in r.output


def test_triton_cli_json(tmp_path, tiny_dir):
    art = contract_artifact(tmp_path / "art", tiny_dir)
    r = CliRunner().invoke(cli, ["export", "triton", str(art), "-o", str(tmp_path / "repo"), "--name", "m",
                                 "--kind", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["platform"] == "onnxruntime_onnx" and out["name"] == "m" and out["version"] == 1
    assert (tmp_path / "repo" / "m" / "config.pbtxt").read_text().count("KIND_CPU") == 1
    r = CliRunner().invoke(cli, ["export", "triton", str(art), "-o", str(tmp_path / "repo"), "--name", "m"])
    assert r.exit_code == 2 and "already exists; pass --force" in r.output
