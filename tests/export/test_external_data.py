"""Item 10, export side: whatever opens an artifact's ONNX graph besides ONNX Runtime — ``kiln export
tensorrt`` (TensorRT's parser reads the external data), ``kiln export triton`` (copies it), ``check_onnx`` —
refuses a graph whose external data lies outside the artifact dir or is a symlink, in one line, before reading
anything; kiln.json's hashes are consistent in every crafted case. TensorRT cannot run here: the recording
doubles stand in for it and cuda-python (their parser, like TensorRT's, reads any location that exists)."""
from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from export.errors import ExportError
from export.tensorrt import ProfileFlags, check_onnx, export_tensorrt
from runtime.onnx_files import check_model_locations, external_locations, unsafe_name
from tests.crafted_artifacts import KINDS, escape
from tests.export.trt_double import RecordingCudart, RecordingTensorRT
from tests.export.trt_fixtures import contract_artifact


@pytest.fixture
def art(tmp_path, tiny_dir):
    return contract_artifact(tmp_path / "art", tiny_dir)


@pytest.fixture
def doubles(monkeypatch):
    """`kiln export tensorrt` with the doubles standing in for tensorrt and cuda-python."""
    from export.tensorrt import build

    trt = RecordingTensorRT("10.15.1")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(build, "load_cudart", lambda: RecordingCudart())
    return trt


@pytest.mark.parametrize("how", KINDS)
def test_export_tensorrt_refuses_data_outside_the_artifact(art, tmp_path, how):
    escape(art, how)
    trt = RecordingTensorRT("10.15.1")
    with pytest.raises(ExportError) as e:
        export_tensorrt(art, tmp_path / "engine", ProfileFlags(2, 16, 4), trt=trt, cudart=RecordingCudart())
    msg = str(e.value)
    assert "\n" not in msg and ("outside.bin" in msg or "symlink" in msg or "not listed" in msg), msg
    assert "OnnxParser.parse_from_file" not in trt.names() and not (tmp_path / "engine").exists()


@pytest.mark.parametrize("how", ["dotdot", "dotdot-decoy", "symlink"])
def test_kiln_export_tensorrt_one_line(art, tmp_path, doubles, how):
    from kiln.cli import cli

    escape(art, how)
    r = CliRunner().invoke(cli, ["export", "tensorrt", str(art), "-o", str(tmp_path / "engine")])
    assert r.exit_code == 2, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert "OnnxParser.parse_from_file" not in doubles.names() and not (tmp_path / "engine").exists()


def test_kiln_export_tensorrt_builds_a_clean_artifact(art, tmp_path, doubles):
    from kiln.cli import cli

    r = CliRunner().invoke(cli, ["export", "tensorrt", str(art), "-o", str(tmp_path / "engine"), "--max-seq", "64",
                                 "--opt-seq", "8", "--max-batch", "2"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "engine" / "model.plan").is_file()


@pytest.mark.parametrize("how", ["dotdot-decoy", "symlink"])
def test_kiln_export_triton_refuses_data_outside_the_artifact(art, tmp_path, how):
    from kiln.cli import cli

    outside = escape(art, how)
    r = CliRunner().invoke(cli, ["export", "triton", str(art), "-o", str(tmp_path / "repo")])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "repo" / "art").exists()
    assert outside.is_file()  # never copied, never touched


@pytest.mark.parametrize("how", ["dotdot-decoy", "symlink", "symlink-inside"])
def test_check_onnx_refuses_before_reading_external_tensors(art, how):
    escape(art, how)
    with pytest.raises(ExportError, match="outside|symlink"):
        check_onnx(art)


def test_locations_of_every_tensor_kind(tmp_path):
    """The walker sees initializers, Constant values and subgraph initializers, and refuses every unsafe form."""
    from onnx import TensorProto, helper

    def ext(name, loc):
        t = helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0])
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        e = t.external_data.add()
        e.key, e.value = "location", loc
        return t

    sub = helper.make_graph([helper.make_node("Identity", ["s"], ["o"])], "sub", [],
                            [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])], [ext("s", "sub.bin")])
    nodes = [helper.make_node("Constant", [], ["c"], value=ext("c", "const.bin")),
             helper.make_node("If", ["cond"], ["y"], then_branch=sub, else_branch=sub)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [ext("w", "w.bin")])
    model = helper.make_model(g)
    assert set(external_locations(model)) == {"w.bin", "const.bin", "sub.bin"}
    for name in ("w.bin", "const.bin", "sub.bin"):
        (tmp_path / name).write_bytes(b"\0" * 4)
    assert check_model_locations(model, tmp_path) == {"w.bin", "const.bin", "sub.bin"}
    with pytest.raises(ExportError, match="not listed"):
        check_model_locations(model, tmp_path, listed={"w.bin"}, error=ExportError)
    for bad in ("../x.bin", "/etc/hostname", "a/../../x", "", "a\\..\\x", "./w.bin"):
        assert unsafe_name(bad), bad
    assert unsafe_name("sub/dir/w.bin") is None
    (tmp_path / "link.bin").symlink_to(tmp_path / "w.bin")
    model.graph.initializer[0].external_data[0].value = "link.bin"
    with pytest.raises(ExportError, match="symlink"):
        check_model_locations(model, tmp_path, error=ExportError)
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "w.bin").write_bytes(b"\0" * 4)
    (tmp_path / "dir").symlink_to(tmp_path / "real")  # a symlinked parent dir is refused too
    model.graph.initializer[0].external_data[0].value = "dir/w.bin"
    with pytest.raises(ExportError, match="symlink"):
        check_model_locations(model, tmp_path, error=ExportError)
    model.graph.initializer[0].external_data[0].value = "real/w.bin"
    assert "real/w.bin" in check_model_locations(model, tmp_path, error=ExportError)
