"""Item 10, runtime side: an ONNX artifact whose graph would read a file outside its dir (``../`` locations,
a symlinked data file) is refused in one line by ``Engine.load`` and ``kiln run``, with kiln.json's hashes
consistent. ``runtime.onnx_files`` refuses it before ONNX Runtime opens the graph; ONNX Runtime >= 1.24.1
(pinned in pyproject.toml) refuses the escaping locations too, which the last test pins on its own."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from runtime import Engine
from runtime.errors import EngineError
from runtime.manifest import read_manifest
from tests.crafted_artifacts import KINDS, escape


@pytest.mark.parametrize("how", KINDS)
def test_engine_load_refuses_data_outside_the_artifact(tiny_onnx_copy, how):
    escape(tiny_onnx_copy, how)
    with pytest.raises(EngineError) as e:
        Engine.load(tiny_onnx_copy, verify="full")
    msg = str(e.value)
    assert "\n" not in msg and ("outside.bin" in msg or "symlink" in msg or "not listed" in msg), msg


@pytest.mark.parametrize("how", ["dotdot", "symlink"])
def test_kiln_run_refuses_in_one_line(tiny_onnx_copy, how):
    from kiln.cli import cli

    escape(tiny_onnx_copy, how)
    r = CliRunner().invoke(cli, ["run", str(tiny_onnx_copy), "hello", "--max-new-tokens", "2"])
    assert r.exit_code == 2 and r.stdout == "", r.output
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")


@pytest.mark.parametrize("how", ["dotdot", "dotdot-decoy", "symlink"])
def test_onnxruntime_itself_refuses_escaping_locations(tiny_onnx_copy, how):
    """What the pin in pyproject.toml is for: ONNX Runtime opening the crafted graph from its path (as the
    runtime's backend does) refuses the location outside the dir, without llmkiln's own check."""
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    escape(tiny_onnx_copy, how)
    with pytest.raises(EngineError, match="External data path|escapes model directory"):
        OnnxRuntimeBackend(tiny_onnx_copy, read_manifest(tiny_onnx_copy))


def test_a_clean_artifact_still_loads(tiny_onnx_copy):
    with Engine.load(tiny_onnx_copy, verify="full") as eng:
        assert eng.generate("hello", max_new_tokens=2).token_ids


def test_a_symlinked_tokenizer_is_refused_before_it_is_read(tiny_onnx_copy, tmp_path):
    import shutil

    outside = tmp_path / "elsewhere.json"
    shutil.copyfile(tiny_onnx_copy / "tokenizer.json", outside)
    (tiny_onnx_copy / "tokenizer.json").unlink()
    (tiny_onnx_copy / "tokenizer.json").symlink_to(outside)  # same bytes, so the hashes still match
    with pytest.raises(EngineError, match="tokenizer.json.*symlink") as e:
        Engine.load(tiny_onnx_copy, verify="full")
    assert "\n" not in str(e.value)
