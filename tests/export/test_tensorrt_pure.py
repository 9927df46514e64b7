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
    is_2_4_prune,
    select_settings,
)
from runtime.backends.tensorrt_compat import compatibility, rebuild_command
from runtime.errors import EngineError
from tests.export.trt_fixtures import HD, KV, LAYERS, contract_model


def contract_inputs(layers=LAYERS):
    specs = [InputSpec("input_ids", ("batch", "seq")), InputSpec("attention_mask", ("batch", "total")),
             InputSpec("position_ids", ("batch", "seq"))]
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
    for p in (prefill, decode):  # T = P + S holds at min, opt and max
        for k in range(3):
            s = p.shapes["input_ids"][k][1]
            pst = p.shapes["past_key_values.0.key"][k][2]
            t = p.shapes["attention_mask"][k][1]
            assert t == s + pst or (k == 2 and t == 2048 and s + pst >= 2048)


def test_profiles_from_the_real_graph_inputs():
    specs = graph_inputs(contract_model())
    assert len(specs) == 3 + 2 * LAYERS and all(s.dynamic for s in specs)
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


def _quant(scheme, **spec):
    return {"kind": "quantize", "config": {"scheme": scheme},
            "layers": {"model.layers.0.mlp.up_proj": {"weight": spec.get("weight", "int8"), "act": spec.get("act")}}}


def _prune(**config):
    return {"kind": "prune", "config": config}


@pytest.mark.parametrize("passes,flags,need", [
    ([], (), None),
    ([_quant("int8-wo")], (), None),
    ([_quant("int8-sq", act="int8")], (), None),
    ([_quant("fp8", weight="fp8", act="fp8")], (), (8, 9)),
    ([_quant("int4", weight="int4")], (), None),
    ([_prune(method="wanda", pattern="2:4")], ("SPARSE_WEIGHTS",), (8, 0)),
    ([_prune(method="sparsegpt", pattern="2:4"), _quant("fp8", weight="fp8", act="fp8")], ("SPARSE_WEIGHTS",), (8, 9)),
    ([_prune(method="wanda", sparsity=0.5)], (), None),
    ([_prune(method="magnitude", pattern="4:8")], (), None),
    ([_prune(method="width", mlp=0.25, kv_groups=None)], (), None),
])
def test_settings_per_scheme_are_strongly_typed_without_precision_flags(passes, flags, need):
    s = select_settings(passes)
    assert s.strongly_typed and s.builder_flags == flags and s.min_compute_capability == need
    assert not {"FP16", "INT8", "FP8", "INT4", "BF16"} & set(s.builder_flags)
    assert select_settings(passes, version_compatible=True).builder_flags == flags + ("VERSION_COMPATIBLE",)


def test_prune_serialization_of_compress_prune_is_recognised():
    from compress.prune.config import NM, Wanda

    assert is_2_4_prune({"kind": "prune", "config": Wanda(sparsity=NM(2, 4)).to_dict()})
    assert not is_2_4_prune({"kind": "prune", "config": Wanda(sparsity=0.5).to_dict()})
    assert not is_2_4_prune({"kind": "quantize", "config": {"pattern": "2:4"}})


def test_dynamic_activation_scheme_is_refused_with_what_to_do():
    with pytest.raises(ExportError, match="int8-dyn.*--scheme int8-sq"):
        select_settings([_quant("int8-dyn", act="int8-dyn")])


def test_device_requirements():
    fp8 = select_settings([_quant("fp8", weight="fp8", act="fp8")])
    check_device(fp8, (9, 0), "NVIDIA H100 80GB HBM3")
    with pytest.raises(ExportError, match=r"A100.*8\.0.*FP8.*8\.9"):
        check_device(fp8, (8, 0), "NVIDIA A100-SXM4-80GB")
    sparse = select_settings([_prune(method="wanda", pattern="2:4")])
    with pytest.raises(ExportError, match="2:4 sparse"):
        check_device(sparse, (7, 5), "Tesla T4")


ENGINE = {"tensorrt_version": "10.15.1", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
          "build": {"max_batch": 4, "max_seq": 1024, "opt_seq": 256, "workspace_gb": None,
                    "version_compatible": False},
          "source_artifact": {"path": "/art/onnx-fp8"}}


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
    vc = dict(ENGINE, build=dict(ENGINE["build"], version_compatible=True))
    assert compatibility(vc, trt_version="11.1.0", compute_capability="9.0", gpu_name=vc["gpu_name"],
                         engine_dir="/e") == []
    with pytest.raises(EngineError, match="older TensorRT 10.14.0"):
        compatibility(vc, trt_version="10.14.0", compute_capability="9.0", gpu_name=vc["gpu_name"], engine_dir="/e")
    assert rebuild_command(vc, "/e").endswith("--version-compatible")


def test_engine_block_must_be_complete():
    with pytest.raises(EngineError, match="no 'engine' block"):
        compatibility(None, trt_version="10.15.1", compute_capability="9.0", gpu_name="x", engine_dir="/e")
    with pytest.raises(EngineError, match="lacks compute_capability"):
        compatibility({"tensorrt_version": "10.1.0", "gpu_name": "x"}, trt_version="10.15.1",
                      compute_capability="9.0", gpu_name="x", engine_dir="/e")
