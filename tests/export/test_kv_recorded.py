"""kiln compress quantize --kv-cache int8: static KV scales measured on the quantize pass's calibration stream,
kept in the checkpoint (kv_cache/scales.safetensors + kiln.json's kv_cache record) and taken by the ort
form's export instead of its own calibration."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from compress.quant.config import config_for
from compress.quant.entry import quantize_checkpoint
from export.errors import ExportError
from export.onnx import export_onnx
from export.onnx.kvstatic import calibrate
from kiln.cli import cli
from runtime.kvscales import KV_SCALES_FILE, KVAmax
from runtime.manifest import ManifestError, read_manifest
from tests.export.onnx_helpers import kv_graph_scales

WINDOWS, SEQ = 4, 64


@pytest.fixture(scope="module")
def recorded(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kvrec")
    ck = root / "ck"
    # lm_head (tied: the embedding table too) stays float, so the checkpoint's embedding is the one the
    # calibration stream starts from and the whole-model reference below sees the same layer inputs
    cfg = config_for("int8-wo", method="rtn", ignore=("lm_head",))
    res = quantize_checkpoint(str(tiny_dir), cfg, ck, calib_samples=WINDOWS, seq_len=SEQ, eval_windows=None,
                              kv_cache="int8")
    art = root / "art"
    export_onnx(str(ck), art, form="ort", kv_cache="int8", validate=False)  # validated in test_kv_static
    return ck, art, res


def test_checkpoint_records_the_quantized_models_kv_maxima(recorded):
    """The recorded scales are the keys' pair-norm and the values' maxima / 127 of the quantized model (the
    checkpoint loaded whole, run on the same calibration windows), per layer, KV head and channel."""
    import torch

    from compress.calib import calibration_batches
    from compress.loading import load_model

    ck, _, res = recorded
    m = read_manifest(ck)
    kv = m.kv_cache
    assert (kv.format, kv.calibrated_by, kv.windows, kv.seq_len, kv.file) == ("int8", "quantize", WINDOWS, SEQ,
                                                                             KV_SCALES_FILE)
    assert res["kv_cache"]["file"] == KV_SCALES_FILE and KV_SCALES_FILE in m.files
    t = load_file(str(ck / KV_SCALES_FILE))
    model, tok, _ = load_model(str(ck))
    a = m.architecture
    amax = KVAmax(a.layers, a.kv_heads, a.head_dim)
    seen = {}

    def hook(i, kind):
        def f(_m, _a, out):
            seen[(i, kind)] = out.reshape(1, -1, a.kv_heads, a.head_dim).transpose(1, 2).numpy()
        return f

    hs = [getattr(layer.self_attn, f"{k}_proj").register_forward_hook(hook(i, k))
          for i, layer in enumerate(model.model.layers) for k in ("k", "v")]
    with torch.no_grad():
        for batch in calibration_batches(tok, "builtin:pydoc", WINDOWS, SEQ):
            model(batch)
            for i in range(a.layers):
                amax.add(i, seen[(i, "k")], seen[(i, "v")])
    for h in hs:
        h.remove()
    ref = amax.scales(WINDOWS, SEQ)
    np.testing.assert_allclose(t["key_scale"], ref.key, rtol=1e-5)
    np.testing.assert_allclose(t["value_scale"], ref.value, rtol=1e-5)


def test_export_takes_the_checkpoints_scales(recorded):
    """The ort graph's scales are the checkpoint's, bit for bit; kiln.json says where they came from."""
    ck, art, _ = recorded
    t = load_file(str(ck / KV_SCALES_FILE))
    m = read_manifest(art)
    a = m.architecture
    assert m.io.kv_static
    assert (m.kv_cache.calibrated_by, m.kv_cache.file, m.kv_cache.windows) == ("quantize", None, WINDOWS)
    got = kv_graph_scales(art)
    for i in range(a.layers):
        for kind in ("key", "value"):
            np.testing.assert_array_equal(got[f"/model/layers.{i}/attn/kv_cache/{kind}_scale"].reshape(
                a.kv_heads, a.head_dim), t[f"{kind}_scale"][i])


def test_export_calibrates_when_the_checkpoint_has_no_scales(recorded, tmp_path):
    """Without a record the export calibrates (8 windows of pydoc). On the checkpoint's own windows its scales
    come within 1.5% of the recorded ones, not closer: the ORT graph's int8 kernel quantizes k_proj's and
    v_proj's inputs per block of 32, the checkpoint's forward does not."""
    ck, _, _ = recorded
    plain = tmp_path / "plain"
    shutil.copytree(ck, plain)
    shutil.rmtree(plain / "kv_cache")
    d = json.loads((plain / "kiln.json").read_text())
    del d["kv_cache"], d["files"][KV_SCALES_FILE]
    (plain / "kiln.json").write_text(json.dumps(d))
    art = tmp_path / "art"
    m = export_onnx(str(plain), art, form="ort", kv_cache="int8", validate=False)
    assert (m.kv_cache.calibrated_by, m.kv_cache.corpus, m.kv_cache.windows) == ("export", "builtin:pydoc", 8)
    a = m.architecture
    flt = tmp_path / "flt"
    export_onnx(str(ck), flt, form="ort", validate=False)
    s = calibrate(flt / "model.onnx", flt, a, windows=WINDOWS, seq_len=SEQ)
    t = load_file(str(ck / KV_SCALES_FILE))
    for kind, table in (("key", s.key), ("value", s.value)):
        rel = np.abs(table / t[f"{kind}_scale"] - 1).max()
        assert rel < 0.015, (kind, rel)  # measured 0.37% (keys) and 0.82% (values)


@pytest.mark.parametrize("damage", ["shape", "missing", "nan"])
def test_bad_recorded_scales_are_refused_in_one_line(recorded, tmp_path, damage):
    ck, _, _ = recorded
    bad = tmp_path / "bad"
    shutil.copytree(ck, bad)
    f = bad / KV_SCALES_FILE
    t = load_file(str(f))
    if damage == "shape":
        save_file({"key_scale": t["key_scale"][:1], "value_scale": t["value_scale"]}, str(f))
    elif damage == "nan":
        k = t["key_scale"].copy()
        k[0, 0, 0] = np.nan
        save_file({"key_scale": k, "value_scale": t["value_scale"]}, str(f))
    else:
        f.unlink()
    d = json.loads((bad / "kiln.json").read_text())  # the listed size would catch a changed file first
    del d["files"][KV_SCALES_FILE]
    (bad / "kiln.json").write_text(json.dumps(d))
    with pytest.raises(ExportError) as e:
        export_onnx(str(bad), tmp_path / "art", form="ort", kv_cache="int8", validate=False)
    msg = str(e.value)
    assert "\n" not in msg and "scales.safetensors" in msg, msg
    assert not (tmp_path / "art").exists()


def test_crafted_record_path_is_refused(recorded, tmp_path):
    ck, _, _ = recorded
    bad = tmp_path / "bad"
    shutil.copytree(ck, bad)
    d = json.loads((bad / "kiln.json").read_text())
    d["kv_cache"]["file"] = "../../etc/passwd"
    (bad / "kiln.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="relative path inside the checkpoint"):
        read_manifest(bad)


def test_cli(tiny_dir, tmp_path):
    r = CliRunner().invoke(cli, ["compress", "quantize", str(tiny_dir), "--scheme", "int8-wo", "--method", "rtn",
                                 "--kv-cache", "int8", "--calib-samples", "2", "--seq-len", "32",
                                 "--eval-windows", "0", "-o", str(tmp_path / "ck"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["kv_cache"]["windows"] == 2 and (tmp_path / "ck" / KV_SCALES_FILE).is_file()
    r = CliRunner().invoke(cli, ["compress", "quantize", str(tiny_dir), "--scheme", "int8-wo", "--kv-cache", "fp8",
                                 "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "fp8" in r.output
    r = CliRunner().invoke(cli, ["compress", "quantize", str(tiny_dir), "--budget", "1.01", "--formats",
                                 "int8-wo,float", "--kv-cache", "int8", "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "--kv-cache" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
