"""ONNX export of the tiny fp32 model: contract IO, ORT parity, KV cache and left-padding invariance, bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.errors import ExportError
from export.onnx import export_onnx
from runtime.manifest import read_manifest, verify_files
from tests.export.onnx_helpers import feeds


@pytest.fixture(scope="module")
def art(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "art"
    export_onnx(str(tiny_dir), out)
    return out


@pytest.fixture(scope="module")
def sess(art):
    return ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])


def _torch_logits(tiny_dir, ids, mask=None):
    import torch

    from compress.loading import load_model

    model, _, _ = load_model(str(tiny_dir))
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return model(input_ids=torch.from_numpy(ids), **kw).logits.numpy()


def test_artifact_contract(art, sess):
    m = read_manifest(art)
    verify_files(art, m, full=True)
    assert m.kind == "onnx" and m.preset() == "fp32" and m.io.form == "portable" and m.io.version == 2
    assert {"model.onnx", "model.onnx.data", "tokenizer.json"} <= set(m.files)
    v = m.validation
    assert v.passed and v.value <= 1e-3 and v.greedy_identical_prefix == 32 and v.graph is None
    a = m.architecture
    ins = {i.name: i for i in sess.get_inputs()}
    outs = {o.name: o for o in sess.get_outputs()}
    assert [i.name for i in sess.get_inputs()][:4] == ["input_ids", "attention_mask", "position_ids",
                                                       "logits_positions"]
    assert ins["logits_positions"].type == "tensor(int64)" and ins["logits_positions"].shape == ["logits_positions"]
    assert ins["input_ids"].type == ins["attention_mask"].type == ins["position_ids"].type == "tensor(int64)"
    for i in range(a.layers):
        for k in ("key", "value"):
            assert ins[f"past_key_values.{i}.{k}"].shape[1:] == [a.kv_heads, "past_seq", a.head_dim]
            assert outs[f"present.{i}.{k}"].type == "tensor(float)"
    assert outs["logits"].shape == ["batch", "logits_positions", a.vocab]
    assert [x.name for x in m.io.inputs] == [i.name for i in sess.get_inputs()]
    assert [x.name for x in m.io.outputs] == [o.name for o in sess.get_outputs()]
    onnx.checker.check_model(str(art / "model.onnx"), full_check=True)  # incl. shape inference
    g = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    names = {t.name for t in g.initializer}
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: stored once
    assert all(n.name.startswith("/model/") for n in g.node)
    assert any(n.name == "/model/layers.0/attn/q_proj/MatMul" for n in g.node)
    big = [t for t in g.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and all(e.value == "model.onnx.data" for t in big for e in t.external_data if e.key == "location")


def test_logits_positions_pick_the_rows_asked_for(art, sess):
    a = read_manifest(art).architecture
    ids = np.array([[5, 17, 99, 3, 250, 41, 8]], np.int64)
    f = feeds(a, ids)
    full = sess.run(["logits"], f)[0]  # every position
    f["logits_positions"] = np.array([6, 0], np.int64)
    part = sess.run(["logits"], f)[0]
    assert part.shape == (1, 2, a.vocab)
    np.testing.assert_allclose(part[0], full[0, [6, 0]], atol=1e-6)


def test_parity_with_torch_and_kv_invariance(art, sess, tiny_dir):
    a = read_manifest(art).architecture
    ids = np.array([[5, 17, 99, 3, 250, 41, 8, 77, 120, 9]], np.int64)
    ref = _torch_logits(tiny_dir, ids)
    full = sess.run(None, feeds(a, ids))
    assert np.abs(full[0] - ref).max() <= 1e-4
    first = sess.run(None, feeds(a, ids[:, :6]))
    rest = sess.run(None, feeds(a, ids[:, 6:], past=first[1:]))
    np.testing.assert_allclose(rest[0], full[0][:, 6:], atol=1e-5)
    for x, y in zip(rest[1:], full[1:]):  # present = past + new, same as one call
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_left_padded_batch_equals_single_runs(art, sess):
    a = read_manifest(art).architecture
    seqs = [[5, 17, 99, 3, 250, 41, 8], [77, 120, 9, 31]]
    T = max(map(len, seqs))
    ids = np.zeros((2, T), np.int64)
    mask = np.zeros((2, T), np.int64)
    for r, s in enumerate(seqs):
        ids[r, T - len(s):], mask[r, T - len(s):] = s, 1
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    out = sess.run(None, feeds(a, ids, mask=mask, pos=pos))
    nxt = np.array([[11], [12]], np.int64)
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    step = sess.run(None, feeds(a, nxt, mask=mask2, past=out[1:], pos=pos[:, -1:] + 1))
    assert np.isfinite(out[0]).all() and np.isfinite(step[0]).all()
    for r, s in enumerate(seqs):
        one = sess.run(None, feeds(a, np.array([s])))
        np.testing.assert_allclose(out[0][r, T - len(s):], one[0][0], atol=1e-5)
        one2 = sess.run(None, feeds(a, nxt[r:r + 1], past=one[1:]))
        np.testing.assert_allclose(step[0][r], one2[0][0], atol=1e-5)


def test_plain_opset_and_llama3_rope(tmp_path):
    from tests.tiny import save_tiny

    src = save_tiny(tmp_path / "m", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    for opset in (21, 23):
        m = export_onnx(str(src), tmp_path / f"a{opset}", opset=opset)
        assert m.io.opset == opset and m.validation.passed
        assert m.architecture.rope_scaling["rope_type"] == "llama3"
    ops21 = {n.op_type for n in onnx.load(str(tmp_path / "a21/model.onnx"), load_external_data=False).graph.node}
    assert not ops21 & {"Attention", "RotaryEmbedding", "RMSNormalization"}


def test_existing_out_refused_and_forced(art, tiny_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ExportError, match="already exists"):
        export_onnx(str(tiny_dir), out, validate=False)
    assert (out / "keep").read_text() == "x"
    export_onnx(str(tiny_dir), out, validate=False, force=True)
    v = read_manifest(out).validation
    assert not (out / "keep").exists() and v.skipped and v.passed is None


def test_interrupted_export_leaves_nothing(tiny_copy, tmp_path):
    out = tmp_path / "never"
    before = sorted(p.name for p in tmp_path.iterdir())

    def boom(tmp, manifest):
        assert (tmp / "model.onnx.data").stat().st_size > 0
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_onnx(str(tiny_copy), out, validate=False, before_rename=boom)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before


def _rewrite_safetensors(path, edit):
    from safetensors.torch import load_file, save_file

    t = load_file(str(path / "model.safetensors"))
    edit(t)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_or_misshaped_tensor_named(tiny_copy, tmp_path):
    _rewrite_safetensors(tiny_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ExportError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        export_onnx(str(tiny_copy), tmp_path / "o", validate=False)

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16].clone()

    _rewrite_safetensors(tiny_copy, shrink)
    with pytest.raises(ExportError, match=r"k_proj\.weight has shape \[16, 64\], expected \[32, 64\]"):
        export_onnx(str(tiny_copy), tmp_path / "o", validate=False)
    assert not (tmp_path / "o").exists()


def test_cli(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from kiln.cli import cli

    out = tmp_path / "cli"
    r = CliRunner().invoke(cli, ["export", "onnx", str(tiny_dir), "-o", str(out), "--no-validate", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["kind"] == "onnx" and d["preset"] == "fp32" and d["formats"] == {} and (out / "model.onnx").is_file()
    r = CliRunner().invoke(cli, ["export", "onnx", str(tiny_dir), "-o", str(out)])
    assert r.exit_code == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    shutil.rmtree(out)
