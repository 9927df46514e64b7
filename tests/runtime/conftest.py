"""Runtime fixtures: real ONNX artifacts of the tiny model (from the exporter) and a hand-built graph."""
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_onnx(tiny_dir, tmp_path_factory) -> Path:
    """The tiny Llama exported by `export.onnx.export_onnx` (fp32, portable form)."""
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("rt") / "tiny-onnx"
    export_onnx(str(tiny_dir), out, validate=False)
    return out


@pytest.fixture(scope="session")
def tiny_onnx_ort(tiny_dir, tmp_path_factory) -> Path:
    """The same tiny Llama in the ONNX Runtime form (``--form ort``: GroupQueryAttention and friends)."""
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("rt") / "tiny-onnx-ort"
    export_onnx(str(tiny_dir), out, form="ort", validate=False)
    return out


@pytest.fixture
def tiny_onnx_copy(tiny_onnx, tmp_path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(tiny_onnx, dst)
    return dst


@pytest.fixture(scope="session")
def hand_art(tiny_dir, tmp_path_factory) -> Path:
    """A graph written with onnx.helper that follows the IO contract (no torch, no exporter)."""
    from tests.runtime.handgraph import make_artifact

    return make_artifact(tmp_path_factory.mktemp("rt") / "hand", tiny_dir)


@pytest.fixture(scope="session")
def tiny_engine(tiny_onnx):
    from runtime import Engine

    return Engine.load(tiny_onnx, threads=1)


@pytest.fixture(scope="session")
def tiny_engine_ort(tiny_onnx_ort):
    from runtime import Engine

    return Engine.load(tiny_onnx_ort, threads=1)


@pytest.fixture(params=["portable", "ort"])
def any_engine(request):
    """The tiny model's engine in both graph forms."""
    return request.getfixturevalue("tiny_engine" if request.param == "portable" else "tiny_engine_ort")
