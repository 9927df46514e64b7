"""Export that reads float weights straight from safetensors (no torch model): same graph as the torch road."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import export.onnx.direct as direct
from export.onnx import export_onnx
from compress.tensorfile import SafetensorsFiles
from export.onnx.direct import direct_source, rope_tables_numpy
from runtime.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]


def _files(art: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(art.iterdir()) if p.name != "kiln.json"}


def test_same_artifact_as_the_torch_road(tiny_dir, tmp_path, monkeypatch):
    fast = export_onnx(str(tiny_dir), tmp_path / "fast", validate=False)
    assert fast.timings["weights_from"] == "safetensors files"
    monkeypatch.setattr(direct, "direct_source", lambda info: None)
    slow = export_onnx(str(tiny_dir), tmp_path / "slow", validate=False)
    assert slow.timings["weights_from"] == "torch model"
    a, b = _files(tmp_path / "fast"), _files(tmp_path / "slow")
    assert set(a) == set(b) >= {"model.onnx", "model.onnx.data", "tokenizer.json"}
    assert a["model.onnx"] == b["model.onnx"] and a["model.onnx.data"] == b["model.onnx.data"]
    ma, mb = read_manifest(tmp_path / "fast"), read_manifest(tmp_path / "slow")
    assert ma.architecture == mb.architecture and ma.source == mb.source and ma.io == mb.io


def test_validated_export_reads_the_files_too(tiny_dir, tmp_path):
    m = export_onnx(str(tiny_dir), tmp_path / "v")
    assert m.timings["weights_from"] == "safetensors files" and m.validation.passed
    assert m.validation.greedy_identical_prefix == 32


def test_no_validate_export_never_imports_torch(tiny_dir, tmp_path):
    code = ("import sys; from export.onnx import export_onnx; "
            f"export_onnx({str(tiny_dir)!r}, {str(tmp_path / 'a')!r}, validate=False); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_tables_match_transformers(scaling):
    from compress.loading import architecture_from_config
    from export.onnx.export import rope_tables
    from tests.tiny import make_model

    model = make_model(64, rope_scaling=scaling, hidden=128, heads=2, kv_heads=1)
    arch = architecture_from_config(model.config)
    cos, sin = rope_tables_numpy(arch)
    tc, ts = rope_tables(model, arch)
    assert cos.shape == tc.shape == (1024, 32) and cos.dtype == np.float32
    # float32 inverse frequencies agree to the last bit (default, linear) or within one ulp (llama3's
    # smoothing); one ulp times position 1023 is the worst a table entry can move
    atol = 3e-7 if scaling is None or scaling["rope_type"] == "linear" else 2e-5
    np.testing.assert_allclose(cos, tc, atol=atol, rtol=0)
    np.testing.assert_allclose(sin, ts, atol=atol, rtol=0)


def test_bf16_and_f16_read_like_torch(tmp_path):
    import torch
    from safetensors.torch import save_file

    t = {"a": torch.randn(5, 7).bfloat16(), "b": torch.randn(3).half(), "c": torch.randn(2, 2)}
    save_file(t, str(tmp_path / "m.safetensors"))
    st = SafetensorsFiles([tmp_path / "m.safetensors"])
    assert set(st.keys()) == {"a", "b", "c"} and "a" in st and "z" not in st
    for k, v in t.items():
        np.testing.assert_array_equal(st[k].astype(np.float32), v.float().numpy())
    assert st["a"].dtype == np.float32 and st.shape("a") == (5, 7)


def test_bf16_checkpoint_exports_from_the_files(tiny_dir, tmp_path):
    import torch

    from compress.loading import load_model

    model, tok, _ = load_model(str(tiny_dir))
    src = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(str(src), safe_serialization=True)
    tok.save_pretrained(str(src))
    m = export_onnx(str(src), tmp_path / "a")
    assert m.timings["weights_from"] == "safetensors files" and m.validation.passed


def test_declined_sources_take_the_torch_road(tiny_copy, tmp_path):
    from compress.sources import resolve

    cfg_path = tiny_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert direct_source(resolve(str(tiny_copy))) is not None
    cfg.pop("rms_norm_eps")  # left to the config class's default: only transformers knows it
    cfg_path.write_text(json.dumps(cfg))
    assert direct_source(resolve(str(tiny_copy))) is None
    m = export_onnx(str(tiny_copy), tmp_path / "a", validate=False)
    assert m.timings["weights_from"] == "torch model"
    (tiny_copy / "tokenizer.json").rename(tiny_copy / "tokenizer.json.bak")
    assert direct_source(resolve(str(tiny_copy))) is None
