"""The TensorRT build layer and the engine-dir writer, against the recording TensorRT test double.

The real library cannot run here; ``RecordingTensorRT`` (tests/export/trt_double.py) records every call and
rejects what the documented API rejects, so these tests check call order and arguments. Real builds are the
``gpu`` tests at the end, skipped without TensorRT.
"""
from __future__ import annotations

import hashlib
import json

import pytest

from export.errors import ExportError
from export.tensorrt import (
    ProfileFlags,
    TensorRTExport,
    derive_profiles,
    export_tensorrt,
    graph_inputs,
    select_settings,
)
from export.tensorrt.build import build_plan, device_info
from runtime.layerspec import LayerSpec
from runtime.manifest import read_manifest
from runtime.records import QuantPass
from tests.export.trt_double import DoubleError, RecordingCudart, RecordingTensorRT
from tests.export.trt_fixtures import HD, KV, LAYERS, contract_artifact, contract_model


@pytest.fixture
def artifact(tmp_path, tiny_dir):
    return contract_artifact(tmp_path / "onnx-art", tiny_dir)


def _profiles(flags=None, model=None):
    return derive_profiles(graph_inputs(model or contract_model()), flags or ProfileFlags(4, 256, 64), layers=LAYERS,
                           kv_heads=KV, head_dim=HD)


@pytest.mark.parametrize("version", ["10.15.1", "11.1.0"])
def test_build_call_sequence_matches_the_documented_api(artifact, version):
    trt = RecordingTensorRT(version)
    settings = select_settings({"model.layers.0.mlp.up_proj": LayerSpec(sparsity="2:4")}, version_compatible=True)
    plan, cache = build_plan(trt, str(artifact / "model.onnx"), settings, _profiles(), timing_cache=b"old",
                             workspace_bytes=2 << 30)
    names = trt.names()
    assert names[:5] == ["Logger", "Builder", "Builder.create_network", "OnnxParser", "OnnxParser.parse_from_file"]
    assert trt.args("Builder.create_network") == [(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED),)]
    assert trt.args("OnnxParser.parse_from_file") == [(str(artifact / "model.onnx"),)]
    assert trt.args("IBuilderConfig.set_memory_pool_limit") == [(trt.MemoryPoolType.WORKSPACE, 2 << 30)]
    assert [a[0].name for a in trt.args("IBuilderConfig.set_flag")] == ["SPARSE_WEIGHTS", "VERSION_COMPATIBLE"]
    assert trt.args("IBuilderConfig.create_timing_cache") == [(b"old",)]
    assert trt.args("IBuilderConfig.set_timing_cache")[0][1] is False
    # every dynamic input (4 + 2 per layer) gets shapes in both profiles, then the build, then the cache
    assert len(trt.args("IOptimizationProfile.set_shape")) == 2 * (4 + 2 * LAYERS)
    assert names.count("IBuilderConfig.add_optimization_profile") == 2
    assert names.index("Builder.build_serialized_network") > max(
        i for i, n in enumerate(names) if n == "IBuilderConfig.add_optimization_profile")
    assert names[-1] == "IBuilderConfig.get_timing_cache"
    desc = json.loads(plan[4:])
    assert desc["flags"] == ["SPARSE_WEIGHTS", "VERSION_COMPATIBLE"] and len(desc["profiles"]) == 2
    assert desc["profiles"][1]["past_key_values.1.value"] == [[1, KV, 0, HD], [1, KV, 64, HD], [4, KV, 255, HD]]
    assert cache.startswith(b"TCACHE")


def test_no_precision_flags_ever_reach_the_builder(artifact):
    trt = RecordingTensorRT("11.1.0")  # 11.x has no FP16/INT8/FP8/INT4 BuilderFlag at all
    for specs in ({}, {"m": LayerSpec("fp8", act="fp8", act_granularity="tensor")},
                  {"m": LayerSpec("int4", group_size=128)}):
        build_plan(trt, str(artifact / "model.onnx"), select_settings(specs), _profiles())
    assert trt.args("IBuilderConfig.set_flag") == []
    assert trt.args("IBuilderConfig.set_memory_pool_limit") == []


def test_profile_missing_a_kv_input_is_caught_before_the_build(artifact):
    profiles = _profiles()
    del profiles[1].shapes["past_key_values.1.key"]
    trt = RecordingTensorRT()
    with pytest.raises(ExportError, match=r"profile 'decode'.*past_key_values\.1\.key"):
        build_plan(trt, str(artifact / "model.onnx"), select_settings({}), profiles)
    assert "Builder.build_serialized_network" not in trt.names()


def test_parser_and_build_failures_are_one_line_errors(artifact, tmp_path):
    (artifact / "model.onnx.data").rename(tmp_path / "elsewhere")
    with pytest.raises(ExportError, match="could not parse.*model.onnx.data not found"):
        build_plan(RecordingTensorRT(), str(artifact / "model.onnx"), select_settings({}), _profiles())
    (tmp_path / "elsewhere").rename(artifact / "model.onnx.data")
    with pytest.raises(ExportError, match="failed to build an engine"):
        build_plan(RecordingTensorRT(fail_build=True), str(artifact / "model.onnx"), select_settings({}), _profiles())
    with pytest.raises(ExportError, match="refused the timing cache"):
        build_plan(RecordingTensorRT(timing_cache_ok=False), str(artifact / "model.onnx"), select_settings({}),
                   _profiles())


def test_double_rejects_what_tensorrt_rejects(artifact):
    """Sanity of the double itself: a profile with min > max, or a precision flag on 11.x, is refused."""
    trt = RecordingTensorRT("11.0.0")
    prof = trt.Builder(trt.Logger()).create_optimization_profile()
    with pytest.raises(DoubleError):
        prof.set_shape("input_ids", (1, 8), (1, 4), (1, 2))
    with pytest.raises(AttributeError):
        trt.BuilderFlag.FP16  # noqa: B018


def test_device_info_reads_name_and_compute_capability():
    assert device_info(RecordingCudart()) == {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    with pytest.raises(ExportError, match="no NVIDIA GPU|CUDA device query failed"):
        device_info(RecordingCudart(devices=()))


def test_export_writes_an_engine_dir_with_provenance(artifact, tmp_path):
    out, cache = tmp_path / "engine", tmp_path / "tc" / "timing.cache"
    trt, cud = RecordingTensorRT("10.15.1"), RecordingCudart()
    m = export_tensorrt(artifact, out, ProfileFlags(2, 128, 32), TensorRTExport(timing_cache=str(cache)),
                        trt=trt, cudart=cud)
    assert sorted(p.name for p in out.iterdir()) == ["kiln.json", "model.plan", "tokenizer.json",
                                                     "tokenizer_config.json"]
    again = read_manifest(out)
    assert again.kind == "engine" and again.to_dict() == m.to_dict()
    e = again.engine
    assert (e.tensorrt_version, e.gpu_name, e.compute_capability) == ("10.15.1", "NVIDIA H100 80GB HBM3", "9.0")
    assert [p.name for p in e.profiles] == ["prefill", "decode"]
    assert e.profiles[0].shapes["input_ids"] == ((1, 1), (1, 32), (2, 128))
    assert e.profiles[0].shapes["logits_positions"] == ((1,), (1,), (128,))
    assert e.timing_cache_sha256 == hashlib.sha256(cache.read_bytes()).hexdigest()
    src = read_manifest(artifact)
    assert e.source_artifact.sha256 == hashlib.sha256("".join(
        f"{n}\0{src.files[n].sha256}\n" for n in sorted(src.files)).encode()).hexdigest()
    assert e.settings.strongly_typed and e.build.max_seq == 128
    assert m.files["model.plan"].size == (out / "model.plan").stat().st_size
    assert again.architecture == src.architecture and again.io == src.io
    # the timing cache written by the first build is read by the second
    export_tensorrt(artifact, out, ProfileFlags(2, 128, 32), TensorRTExport(timing_cache=str(cache)),
                    force=True, trt=(t2 := RecordingTensorRT("10.15.1")), cudart=cud)
    assert t2.args("IBuilderConfig.create_timing_cache")[0][0].startswith(b"TCACHE")


def test_failed_build_writes_nothing_and_leaves_inputs_alone(artifact, tmp_path):
    before = {p.name: p.read_bytes() for p in artifact.iterdir()}
    out = tmp_path / "engine"
    with pytest.raises(ExportError):
        export_tensorrt(artifact, out, trt=RecordingTensorRT(fail_build=True), cudart=RecordingCudart())
    assert not out.exists() and not any(p.name.startswith(".engine") for p in tmp_path.iterdir())
    assert {p.name: p.read_bytes() for p in artifact.iterdir()} == before


def test_no_gpu_fails_before_reading_the_artifact(tmp_path):
    with pytest.raises(ExportError, match="no NVIDIA GPU|CUDA"):
        export_tensorrt(tmp_path / "does-not-exist", tmp_path / "e", trt=RecordingTensorRT(),
                        cudart=RecordingCudart(devices=()))
    assert not (tmp_path / "e").exists()


def test_fp8_artifact_on_an_older_gpu_is_refused(tmp_path, tiny_dir):
    art = contract_artifact(tmp_path / "a", tiny_dir, passes=[QuantPass(
        config={"scheme": "fp8"}, layers={"lm_head": LayerSpec("fp8", act="fp8", act_granularity="tensor")})])
    with pytest.raises(ExportError, match="FP8 E4M3.*8.9"):
        export_tensorrt(art, tmp_path / "e", trt=RecordingTensorRT(),
                        cudart=RecordingCudart(devices=((b"NVIDIA A100-SXM4-80GB", 8, 0),)))
    assert not (tmp_path / "e").exists()


def test_wrong_kind_and_tampered_artifact_are_refused(artifact, tmp_path, tiny_dir):
    with pytest.raises(ExportError, match="takes an ONNX artifact"):
        eng = tmp_path / "eng"
        export_tensorrt(artifact, eng, trt=RecordingTensorRT(), cudart=RecordingCudart())
        export_tensorrt(eng, tmp_path / "eng2", trt=RecordingTensorRT(), cudart=RecordingCudart())
    data = artifact / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="sha256 differs"):
        export_tensorrt(artifact, tmp_path / "e3", trt=RecordingTensorRT(), cudart=RecordingCudart())


@pytest.mark.gpu
def test_real_build_of_the_contract_artifact(artifact, tmp_path):
    m = export_tensorrt(artifact, tmp_path / "engine", ProfileFlags(2, 64, 16))
    assert (tmp_path / "engine" / "model.plan").stat().st_size > 0 and m.engine.profiles
