"""Pure parts of the TensorRT stage: profiles from flags, builder settings per scheme, compatibility checks."""
from __future__ import annotations

import pytest

from export.errors import ExportError
from export.tensorrt import (
    InputSpec,
    ProfileFlags,
    check_device,
    derive_profiles,
    graph_inputs,
    select_settings,
    tensorrt_blockers,
)
from runtime.layerspec import LayerSpec
from runtime.records import EngineInfo
from runtime.strict import from_json
from runtime.backends.tensorrt_compat import compatibility, rebuild_command
from runtime.errors import EngineError
from tests.export.trt_fixtures import HD, KV, LAYERS, contract_model


def contract_inputs(layers=LAYERS):
    specs = [InputSpec("input_ids", ("batch", "seq")), InputSpec("attention_mask", ("batch", "total")),
             InputSpec("position_ids", ("batch", "seq")), InputSpec("logits_positions", ("k",))]
    specs += [InputSpec(f"past_key_values.{i}.{kv}", ("batch", KV, "past", HD)) for i in range(layers)
              for kv in ("key", "value")]
    return specs


def test_profiles_cover_every_dynamic_input_including_each_kv_tensor():
    flags = ProfileFlags(max_batch=8, max_seq=2048, opt_seq=512)
    prefill, decode = derive_profiles(contract_inputs(), flags, layers=LAYERS, kv_heads=KV, head_dim=HD)
    names = {s.name for s in contract_inputs()}
    assert set(prefill.shapes) == set(decode.shapes) == names
    assert prefill.shapes["input_ids"] == ((1, 1), (1, 512), (8, 2048))
    assert prefill.shapes["attention_mask"] == ((1, 1), (1, 512), (8, 2048))
    assert prefill.shapes["past_key_values.1.value"] == ((1, KV, 0, HD), (1, KV, 0, HD), (8, KV, 2047, HD))
    assert decode.shapes["input_ids"] == ((1, 1), (1, 1), (8, 1))
    assert decode.shapes["past_key_values.0.key"] == ((1, KV, 0, HD), (1, KV, 512, HD), (8, KV, 2047, HD))
    assert decode.shapes["attention_mask"] == ((1, 1), (1, 513), (8, 2048))
    assert prefill.shapes["logits_positions"] == ((1,), (1,), (2048,))
    assert decode.shapes["logits_positions"] == ((1,), (1,), (1,))
    for p in (prefill, decode):  # T = P + S holds at min, opt and max
        for k in range(3):
            s = p.shapes["input_ids"][k][1]
            pst = p.shapes["past_key_values.0.key"][k][2]
            t = p.shapes["attention_mask"][k][1]
            assert t == s + pst or (k == 2 and t == 2048 and s + pst >= 2048)


def test_profiles_from_the_real_graph_inputs():
    specs = graph_inputs(contract_model())
    assert len(specs) == 4 + 2 * LAYERS and all(s.dynamic for s in specs)
    profiles = derive_profiles(specs, ProfileFlags(2, 64, 16), layers=LAYERS, kv_heads=KV, head_dim=HD)
    assert [p.name for p in profiles] == ["prefill", "decode"]
    assert profiles[1].shapes["past_key_values.1.key"] == ((1, KV, 0, HD), (1, KV, 16, HD), (2, KV, 63, HD))


def test_missing_kv_input_is_the_classic_failure_and_is_caught():
    specs = [s for s in contract_inputs() if s.name != "past_key_values.1.value"]
    with pytest.raises(ExportError, match=r"lacks input\(s\) past_key_values\.1\.value"):
        derive_profiles(specs, ProfileFlags(), layers=LAYERS, kv_heads=KV, head_dim=HD)
    with pytest.raises(ExportError, match="past_key_values.2.key"):
        derive_profiles(contract_inputs(3), ProfileFlags(), layers=LAYERS, kv_heads=KV, head_dim=HD)


def test_unknown_dynamic_input_and_wrong_static_dims_are_refused():
    specs = contract_inputs() + [InputSpec("token_type_ids", ("batch", "seq"))]
    with pytest.raises(ExportError, match="token_type_ids.*no optimization-profile rule"):
        derive_profiles(specs, ProfileFlags(), layers=LAYERS, kv_heads=KV, head_dim=HD)
    with pytest.raises(ExportError, match="static dim 2 where the architecture says 3"):
        derive_profiles(contract_inputs(), ProfileFlags(), layers=LAYERS, kv_heads=3, head_dim=HD)
    bad = [InputSpec("input_ids", ("batch",))] + contract_inputs()[1:]
    with pytest.raises(ExportError, match="rank 1, expected 2"):
        derive_profiles(bad, ProfileFlags(), layers=LAYERS, kv_heads=KV, head_dim=HD)


@pytest.mark.parametrize("kw,msg", [({"opt_seq": 4096}, "larger than --max-seq"), ({"max_batch": 0}, "positive"),
                                    ({"max_seq": 1, "opt_seq": 1}, "at least 2"), ({"opt_seq": 1.5}, "integer")])
def test_profile_flags_validated(kw, msg):
    with pytest.raises(ExportError, match=msg):
        ProfileFlags(**kw)


UP = "model.layers.0.mlp.up_proj"
INT8, INT4 = LayerSpec("int8"), LayerSpec("int4", group_size=128)
SQ = LayerSpec("int8", act="int8", act_granularity="tensor")
FP8 = LayerSpec("fp8", act="fp8", act_granularity="tensor")
DYN = LayerSpec("int8", act="int8", act_granularity="token")
SPARSE, SPARSE_HALF = LayerSpec(sparsity="2:4"), LayerSpec(sparsity="unstructured")


@pytest.mark.parametrize("specs,flags,need", [
    ({}, (), None),
    ({UP: INT8}, (), None),
    ({UP: SQ}, (), None),
    ({UP: FP8}, (), (8, 9)),
    ({UP: LayerSpec("fp8")}, (), (8, 9)),
    ({UP: INT4}, (), None),
    ({UP: SPARSE}, ("SPARSE_WEIGHTS",), (8, 0)),
    ({UP: LayerSpec("fp8", act="fp8", act_granularity="tensor", sparsity="2:4")}, ("SPARSE_WEIGHTS",), (8, 9)),
    ({UP: SPARSE_HALF}, (), None),
    ({UP: INT4, "model.layers.1.mlp.up_proj": FP8, "model.layers.0.self_attn.q_proj": SQ}, (), (8, 9)),
])
def test_settings_come_from_layer_specs_strongly_typed_without_precision_flags(specs, flags, need):
    s = select_settings(specs)
    assert s.strongly_typed and s.builder_flags == flags and s.min_compute_capability == need
    assert not {"FP16", "INT8", "FP8", "INT4", "BF16"} & set(s.builder_flags)
    assert select_settings(specs, version_compatible=True).builder_flags == flags + ("VERSION_COMPATIBLE",)
    assert sum(s.formats.values()) == sum(1 for v in specs.values() if v.quantized)


def test_prune_pattern_of_compress_configs_reaches_the_specs():
    from compress.prune.config import NM, Wanda

    assert Wanda(sparsity=NM(2, 4)).pattern == "2:4"
    assert Wanda(sparsity=NM(4, 8)).pattern == "unstructured"
    assert Wanda(sparsity=0.5).pattern == "unstructured"


def test_dynamic_activations_are_refused_with_what_to_do():
    with pytest.raises(ExportError, match="per token|run time.*--scheme int8-sq"):
        select_settings({UP: DYN})


def test_tensorrt_blockers_name_dynamic_scales_and_a_quantized_tied_table():
    assert tensorrt_blockers({UP: FP8, "lm_head": INT8}, _arch(False)) == []  # an untied head is a Linear
    assert tensorrt_blockers({UP: INT8}, _arch(True)) == []
    b = tensorrt_blockers({UP: DYN, "lm_head": INT8}, _arch(True))
    assert len(b) == 2 and "per token" in b[0] and "--ignore lm_head" in b[1]


def _arch(tied):
    from dataclasses import replace

    from tests.export.trt_fixtures import arch

    return replace(arch(), tied_embeddings=tied)


def test_device_requirements():
    fp8 = select_settings({UP: FP8})
    check_device(fp8, (9, 0), "NVIDIA H100 80GB HBM3")
    with pytest.raises(ExportError, match=r"A100.*8\.0.*FP8.*8\.9"):
        check_device(fp8, (8, 0), "NVIDIA A100-SXM4-80GB")
    sparse = select_settings({UP: SPARSE})
    with pytest.raises(ExportError, match="2:4 sparse"):
        check_device(sparse, (7, 5), "Tesla T4")


ENGINE_JSON = {"tensorrt_version": "10.15.1", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
               "build": {"max_batch": 4, "max_seq": 1024, "opt_seq": 256, "version_compatible": False},
               "source_artifact": {"path": "/art/onnx-fp8", "sha256": "0" * 64}}
ENGINE = from_json(EngineInfo, ENGINE_JSON, "engine")


def test_compatible_engine_loads_without_warnings():
    assert compatibility(ENGINE, trt_version="10.15.1", compute_capability=(9, 0),
                         gpu_name="NVIDIA H100 80GB HBM3", engine_dir="/e") == []


def test_version_mismatch_says_exactly_what_to_rebuild():
    with pytest.raises(EngineError) as e:
        compatibility(ENGINE, trt_version="10.16.0", compute_capability="9.0", gpu_name="NVIDIA H100 80GB HBM3",
                      engine_dir="/e")
    msg = str(e.value)
    assert "TensorRT 10.15.1" in msg and "10.16.0" in msg
    assert "kiln export tensorrt /art/onnx-fp8 -o /e --force --max-batch 4 --max-seq 1024 --opt-seq 256" in msg


def test_compute_capability_mismatch_and_gpu_name_warning():
    with pytest.raises(EngineError, match=r"compute capability 9\.0 .*A100.*8\.0"):
        compatibility(ENGINE, trt_version="10.15.1", compute_capability=(8, 0), gpu_name="NVIDIA A100",
                      engine_dir="/e")
    w = compatibility(ENGINE, trt_version="10.15.1", compute_capability=(9, 0), gpu_name="NVIDIA H100 PCIe",
                      engine_dir="/e")
    assert len(w) == 1 and "H100 PCIe" in w[0]


def test_version_compatible_engine_runs_on_newer_not_older():
    vc = from_json(EngineInfo, dict(ENGINE_JSON, build=dict(ENGINE_JSON["build"], version_compatible=True)), "e")
    assert compatibility(vc, trt_version="11.1.0", compute_capability="9.0", gpu_name=vc.gpu_name,
                         engine_dir="/e") == []
    with pytest.raises(EngineError, match="older TensorRT 10.14.0"):
        compatibility(vc, trt_version="10.14.0", compute_capability="9.0", gpu_name=vc.gpu_name, engine_dir="/e")
    assert rebuild_command(vc, "/e").endswith("--version-compatible")


def test_engine_block_must_be_complete():
    with pytest.raises(EngineError, match="no 'engine' block"):
        compatibility(None, trt_version="10.15.1", compute_capability="9.0", gpu_name="x", engine_dir="/e")
    from runtime.strict import RecordError

    with pytest.raises(RecordError, match="engine: missing compute_capability"):
        from_json(EngineInfo, {"tensorrt_version": "10.1.0", "gpu_name": "x", "build": ENGINE_JSON["build"]},
                  "engine")
