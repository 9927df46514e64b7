"""kiln export triton: the model repository layout, and config.pbtxt parsed back as Triton's ModelConfig."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from export.errors import ExportError
from export.tensorrt import ProfileFlags, export_tensorrt
from export.triton import TritonExport, export_triton
from tests.export.triton_proto import enum_name, parse_model_config
from tests.export.trt_double import RecordingCudart, RecordingTensorRT
from tests.export.trt_fixtures import HD, KV, LAYERS, VOCAB, contract_artifact


@pytest.fixture
def artifact(tmp_path, tiny_dir):
    return contract_artifact(tmp_path / "smol-int8", tiny_dir)


def test_onnx_artifact_becomes_an_onnxruntime_model(artifact, tmp_path):
    repo = tmp_path / "repo"
    res = export_triton(artifact, repo, TritonExport(version=3, instances=2))
    mdir = repo / "smol-int8"
    assert res["platform"] == "onnxruntime_onnx" and res["model_dir"] == str(mdir)
    assert sorted(p.name for p in mdir.iterdir()) == ["3", "config.pbtxt", "kiln.json", "tokenizer.json",
                                                      "tokenizer_config.json"]
    assert sorted(p.name for p in (mdir / "3" / "model.onnx").iterdir()) == ["model.onnx", "model.onnx.data"]
    cfg = parse_model_config((mdir / "config.pbtxt").read_text())
    assert (cfg.name, cfg.platform, cfg.max_batch_size, cfg.default_model_filename) == (
        "smol-int8", "onnxruntime_onnx", 0, "model.onnx")
    ins = {i.name: (enum_name(i, "data_type"), list(i.dims)) for i in cfg.input}
    outs = {o.name: (enum_name(o, "data_type"), list(o.dims)) for o in cfg.output}
    assert ins["input_ids"] == ("TYPE_INT64", [-1, -1]) and ins["attention_mask"] == ("TYPE_INT64", [-1, -1])
    assert ins["past_key_values.1.value"] == ("TYPE_FP32", [-1, KV, -1, HD])
    assert outs["logits"] == ("TYPE_FP32", [-1, -1, VOCAB]) and outs["present.0.key"] == ("TYPE_FP32", [-1, KV, -1, HD])
    assert ins["logits_positions"] == ("TYPE_INT64", [-1])
    assert len(ins) == 4 + 2 * LAYERS and len(outs) == 1 + 2 * LAYERS
    (group,) = cfg.instance_group
    assert group.count == 2 and enum_name(group, "kind") == "KIND_AUTO" and list(group.profile) == []
    # the version dir is loadable the way Triton's onnxruntime backend loads it: <dir>/model.onnx
    sess = ort.InferenceSession(str(mdir / "3" / "model.onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([[1, 2]]), "attention_mask": np.ones((1, 2), np.int64),
            "position_ids": np.array([[0, 1]]), "logits_positions": np.array([0, 1])}
    feed |= {f"past_key_values.{i}.{k}": np.zeros((1, KV, 0, HD), np.float32) for i in range(LAYERS)
             for k in ("key", "value")}
    assert sess.run(["logits"], feed)[0].shape == (1, 2, VOCAB)


def test_engine_dir_becomes_a_tensorrt_plan_model(artifact, tmp_path):
    eng = tmp_path / "smol-engine"
    export_tensorrt(artifact, eng, ProfileFlags(2, 64, 16), trt=RecordingTensorRT(), cudart=RecordingCudart())
    repo = tmp_path / "repo"
    export_triton(eng, repo, TritonExport(name="smol"))
    mdir = repo / "smol"
    assert (mdir / "1" / "model.plan").read_bytes() == (eng / "model.plan").read_bytes()
    cfg = parse_model_config((mdir / "config.pbtxt").read_text())
    assert (cfg.platform, cfg.default_model_filename, cfg.max_batch_size) == ("tensorrt_plan", "model.plan", 0)
    (group,) = cfg.instance_group
    assert enum_name(group, "kind") == "KIND_GPU" and list(group.profile) == ["0", "1"]
    assert dict(cfg.cc_model_filenames) == {"9.0": "model.plan"}
    assert [i.name for i in cfg.input][:4] == ["input_ids", "attention_mask", "position_ids", "logits_positions"]
    assert [list(i.dims) for i in cfg.input][3:5] == [[-1], [-1, KV, -1, HD]]
    assert {o.name for o in cfg.output} == {"logits"} | {f"present.{i}.{k}" for i in range(LAYERS)
                                                         for k in ("key", "value")}
    with pytest.raises(ExportError, match="GPU only"):
        export_triton(eng, repo, TritonExport(name="smol-cpu", kind="cpu"))


def test_existing_model_needs_force_and_bad_options_are_refused(artifact, tmp_path):
    repo = tmp_path / "repo"
    export_triton(artifact, repo)
    with pytest.raises(ExportError, match="already exists"):
        export_triton(artifact, repo)
    export_triton(artifact, repo, TritonExport(version=2), force=True)
    assert sorted(p.name for p in (repo / "smol-int8").iterdir() if p.is_dir()) == ["2"]
    for kw, msg in (({"version": 0}, "positive"), ({"name": "../x"}, "directory name"), ({"instances": 0}, "positive"),
                    ({"kind": "tpu"}, "auto, gpu or cpu")):
        with pytest.raises(ExportError, match=msg):
            TritonExport(**kw)


def test_parser_is_strict():
    """The test-side ModelConfig refuses what Triton refuses, so a passing parse means something."""
    with pytest.raises(text_format.ParseError):
        parse_model_config('name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch: 0\n')
    with pytest.raises(text_format.ParseError):
        parse_model_config('input [ { name: "x" data_type: TYPE_FLOAT32 dims: [ -1 ] } ]')
