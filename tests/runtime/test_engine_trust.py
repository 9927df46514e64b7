"""Item 9: a version-compatible TensorRT engine carries host code (TensorRT's lean runtime) that runs when the
plan is deserialized. Only the caller's ``trust_engine_code=True`` / ``--trust-engine-code`` may allow it, never
the artifact's own kiln.json. TensorRT cannot run here: the recording doubles stand in for it (their Runtime
refuses a version-compatible plan unless ``engine_host_code_allowed`` was set, as TensorRT does)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from click.testing import CliRunner

from export.tensorrt import ProfileFlags, TensorRTExport, export_tensorrt
from runtime.backends.tensorrt import TensorRTBackend
from runtime.errors import EngineError
from runtime.manifest import read_manifest
from tests.export.trt_double import RecordingCudart, RecordingTensorRT
from tests.export.trt_fixtures import VOCAB, contract_artifact


def _engine(tmp_path, tiny_dir, version_compatible):
    art = contract_artifact(tmp_path / "art", tiny_dir)
    eng = tmp_path / "engine"
    export_tensorrt(art, eng, ProfileFlags(2, 16, 4), TensorRTExport(version_compatible=version_compatible),
                    trt=RecordingTensorRT("10.15.1"), cudart=RecordingCudart())
    return eng



@pytest.fixture
def runtimes(monkeypatch):
    """Keep every RuntimeDouble a RecordingTensorRT creates, to look at its flags afterwards."""
    from tests.export import trt_runtime_double

    made = []
    orig = trt_runtime_double.RuntimeDouble.__init__

    def init(self, rec):
        orig(self, rec)
        made.append(self)

    monkeypatch.setattr(trt_runtime_double.RuntimeDouble, "__init__", init)
    return made


def test_version_compatible_engine_is_refused_without_trust(tmp_path, tiny_dir, runtimes):
    eng = _engine(tmp_path, tiny_dir, version_compatible=True)
    trt = RecordingTensorRT("11.1.0")
    with pytest.raises(EngineError) as e:
        TensorRTBackend(eng, read_manifest(eng), trt=trt, cudart=RecordingCudart())
    msg = str(e.value)
    assert "--trust-engine-code" in msg and "trust_engine_code=True" in msg and "\n" not in msg
    assert all(r.engine_host_code_allowed is False for r in runtimes)
    assert "Runtime.deserialize_cuda_engine" not in trt.names()  # refused before the plan was read


def test_version_compatible_engine_loads_with_trust(tmp_path, tiny_dir, runtimes):
    eng = _engine(tmp_path, tiny_dir, version_compatible=True)
    be = TensorRTBackend(eng, read_manifest(eng), trt=RecordingTensorRT("11.1.0"), cudart=RecordingCudart(),
                         trust_engine_code=True)
    assert be.runtime.engine_host_code_allowed is True
    out = be.forward(be.allocate(1, 4), np.array([[1, 2]]), np.ones((1, 2), np.int64), np.array([[0, 1]]))
    assert out.shape == (1, 1, VOCAB)
    be.close()


def test_plain_engine_never_allows_host_code_even_when_trusted(tmp_path, tiny_dir, runtimes):
    eng = _engine(tmp_path, tiny_dir, version_compatible=False)
    for trust in (False, True):
        be = TensorRTBackend(eng, read_manifest(eng), trt=RecordingTensorRT("10.15.1"), cudart=RecordingCudart(),
                             trust_engine_code=trust)
        assert be.runtime.engine_host_code_allowed is False
        be.close()
    assert runtimes and all(r.engine_host_code_allowed is False for r in runtimes)


@pytest.mark.parametrize("cmd", [["run", "{eng}", "hi"], ["bench", "{eng}", "--runs", "1"],
                                 ["eval", "ppl", "{eng}"], ["serve", "{eng}", "--port", "0"]])
def test_cli_needs_trust_engine_code(tmp_path, tiny_dir, runtimes, monkeypatch, cmd):
    """`kiln run/bench/eval ppl/serve` on a version-compatible engine: one line saying what to pass; with
    --trust-engine-code the backend loads it (the doubles stand in for TensorRT and cuda-python)."""
    from kiln.cli import cli as main
    from runtime.backends import tensorrt as trt_backend

    eng = _engine(tmp_path, tiny_dir, version_compatible=True)
    trt = RecordingTensorRT("10.15.1")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "load_cudart", lambda: RecordingCudart())
    args = [a.format(eng=eng) for a in cmd]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    line = r.stderr.strip()
    assert "\n" not in line and "--trust-engine-code" in line
    assert not runtimes
    # trusted: the backend is built with host code allowed; the load then stops at the tokenizer (this test
    # engine computes 64 logits, the tiny tokenizer has more tokens), a different one-line error
    r = CliRunner().invoke(main, args + ["--trust-engine-code"])
    assert r.exit_code == 2 and "--trust-engine-code" not in r.stderr and "tokenizer" in r.stderr, r.output
    assert [x.engine_host_code_allowed for x in runtimes] == [True]
