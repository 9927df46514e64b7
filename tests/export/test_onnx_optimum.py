"""`kiln export onnx --exporter optimum`: optimum-onnx's export (real subprocess) holds the same contract as the
builder's artifact: files, kiln.json, IO names and shapes, validation, logits, Engine generation, `kiln eval ppl`.

Needs a Python with optimum-onnx: $KILN_OPTIMUM_PYTHON, else .venv-optimum/bin/python (made by .ci/run)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from export.errors import ExportError
from export.onnx import export_onnx
from runtime.manifest import read_manifest, verify_files
from tests.export.onnx_helpers import feeds, make_quantized

ROOT = Path(__file__).resolve().parents[2]


def _optimum_python() -> str | None:
    if os.environ.get("KILN_OPTIMUM_PYTHON"):
        return os.environ["KILN_OPTIMUM_PYTHON"]
    local = ROOT / ".venv-optimum" / "bin" / "python"
    return str(local) if local.exists() else None


PY = _optimum_python()
needs_optimum = pytest.mark.skipif(
    PY is None, reason="needs a Python with optimum-onnx: set KILN_OPTIMUM_PYTHON or create .venv-optimum "
                       "(python3 -m venv .venv-optimum; see .ci/run for the packages)")


def _cli(*args):
    from kiln.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def opt_run(tiny_dir, tmp_path_factory):
    """The tiny model exported through the CLI with --exporter optimum; (artifact dir, the --json line)."""
    if PY is None:
        pytest.skip("needs a Python with optimum-onnx (KILN_OPTIMUM_PYTHON or .venv-optimum)")
    before = (tiny_dir / "config.json").read_bytes()
    out = tmp_path_factory.mktemp("optimum") / "art"
    r = _cli("export", "onnx", tiny_dir, "-o", out, "--exporter", "optimum", "--optimum-python", PY, "--json")
    assert r.exit_code == 0, r.output
    assert (tiny_dir / "config.json").read_bytes() == before  # the rope_theta patch went to a copy
    return out, json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def opt_art(opt_run):
    return opt_run[0]


@pytest.fixture(scope="module")
def kiln_art(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kiln") / "art"
    export_onnx(str(tiny_dir), out, validate=False)
    return out


def _sess(art):
    return ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])


@needs_optimum
def test_artifact_contract(opt_run):
    art, line = opt_run
    assert line["exporter"] == "optimum" and line["preset"] == "fp32" and line["form"] == "portable"
    m = read_manifest(art)
    verify_files(art, m, full=True)
    assert m.kind == "onnx" and m.passes == []
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "generation_config.json"} <= set(m.files)
    assert not any(n.startswith(".") for n in m.files)  # optimum's work dir is gone
    io = m.io
    assert (io.exporter, io.form, m.preset(), io.external_data) == ("optimum", "portable", "fp32",
                                                                     "model.onnx.data")
    g = onnx.load(str(art / "model.onnx"), load_external_data=False)
    assert io.opset == next(o.version for o in g.opset_import if o.domain in ("", "ai.onnx"))
    assert {p.key: p.value for p in g.metadata_props}["exporter"] == "optimum"
    big = [t for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and all(e.value == "model.onnx.data" for t in big for e in t.external_data if e.key == "location")
    v = m.validation
    assert v.passed and v.value <= 1e-5 and v.greedy_identical_prefix == v.greedy_tokens == 32
    # IO exactly as kiln.json states it (names, order of outputs, contract dim names)
    sess = _sess(art)
    ins = {i.name: i for i in sess.get_inputs()}
    assert {x.name for x in io.inputs} == set(ins) and "logits_positions" in ins
    assert [x.name for x in io.outputs] == [o.name for o in sess.get_outputs()]
    for x, o in zip(io.outputs, sess.get_outputs()):
        assert o.shape == list(x.shape) and o.type == "tensor(float)"
    for x in io.inputs:
        assert ins[x.name].shape == list(x.shape)
    a = m.architecture
    assert ins["past_key_values.1.value"].shape == ["batch", a.kv_heads, "past_seq", a.head_dim]
    assert ins["attention_mask"].shape == ["batch", "total_seq"]
    onnx.checker.check_model(str(art / "model.onnx"), full_check=True)


@needs_optimum
def test_logits_equal_the_kiln_artifact(opt_art, kiln_art):
    a = read_manifest(kiln_art).architecture
    mine, ref = _sess(opt_art), _sess(kiln_art)
    ids = np.array([[5, 17, 99, 3, 250, 41, 8, 77, 120, 9]], np.int64)
    full = mine.run(None, feeds(a, ids))
    want = ref.run(None, feeds(a, ids))
    for x, y in zip(full, want):  # logits and every present tensor
        np.testing.assert_allclose(x, y, atol=1e-4)
    first = mine.run(None, feeds(a, ids[:, :6]))
    rest = mine.run(None, feeds(a, ids[:, 6:], past=first[1:]))
    np.testing.assert_allclose(rest[0], want[0][:, 6:], atol=1e-4)
    # left padding: a batch of a 10-token and a 6-token prompt
    batch = np.stack([ids[0], np.r_[[0] * 4, ids[0, 4:]]])
    mask = np.array([[1] * 10, [0] * 4 + [1] * 6], np.int64)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    x = mine.run(None, feeds(a, batch, mask=mask, pos=pos))[0]
    y = ref.run(None, feeds(a, batch, mask=mask, pos=pos))[0]
    np.testing.assert_allclose(x[mask == 1], y[mask == 1], atol=1e-4)


@needs_optimum
def test_engine_and_eval_ppl_like_the_kiln_artifact(opt_art, kiln_art):
    from runtime import Engine

    prompts = ["The quick brown fox jumps", "def f(x):\n    return"]
    tokens = {}
    for name, art in (("optimum", opt_art), ("kiln", kiln_art)):
        with Engine.load(art, threads=1) as eng:
            if name == "optimum":  # the load-time lm_head edit found optimum's lm_head MatMul
                assert eng.describe()["logits_positions"] is True
            res = eng.generate(prompts, max_new_tokens=24, temperature=0.0, ignore_eos=True)
            tokens[name] = [r.token_ids for r in res]
    assert tokens["optimum"] == tokens["kiln"] and len(tokens["kiln"][0]) == 24
    ppl = {}
    for name, art in (("optimum", opt_art), ("kiln", kiln_art)):
        r = _cli("eval", "ppl", art, "--seq-len", "32", "--windows", "2", "--json")
        assert r.exit_code == 0, r.output
        ppl[name] = json.loads(r.stdout.strip().splitlines()[-1])
    assert ppl["optimum"]["tokens"] == ppl["kiln"]["tokens"] == 62
    assert abs(ppl["optimum"]["ppl"] - ppl["kiln"]["ppl"]) / ppl["kiln"]["ppl"] < 1e-5


@needs_optimum
def test_fallback_for_a_model_the_builder_refuses(tmp_path):
    """A gelu model (the builder is silu only), pruned to one layer (a checkpoint with kiln.json and a prune
    pass), whose rope theta and llama3 scaling live only in rope_parameters: without the config copy
    optimum's transformers 4.x would use theta 10000 and no scaling (about 2e-3 of the logit range off)."""
    from compress.prune import Depth, prune_checkpoint
    from tests.tiny import save_tiny

    src = save_tiny(tmp_path / "gelu", rope_scaling={
        "rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"hidden_act": "gelu_pytorch_tanh"}, indent=2))
    ckpt = tmp_path / "pruned"
    prune_checkpoint(str(src), ckpt, Depth(layers=1), calib_samples=4, calib_seq_len=64, progress=False)
    cfg = (ckpt / "config.json").read_bytes()
    assert b'"rope_theta": 500000.0' in cfg and b'"rope_scaling"' not in cfg
    with pytest.raises(ExportError, match="silu only; an fp32 source can go through --exporter optimum"):
        export_onnx(str(ckpt), tmp_path / "kiln")
    m = export_onnx(str(ckpt), tmp_path / "art", exporter="optimum", optimum_python=PY)
    assert (ckpt / "config.json").read_bytes() == cfg
    assert m.architecture.layers == 1 and m.architecture.hidden_act == "gelu_pytorch_tanh"
    assert [p.kind for p in m.passes] == ["prune"]
    assert m.validation.passed and m.validation.value <= 1e-5
    assert "past_key_values.1.key" not in {i.name for i in _sess(tmp_path / "art").get_inputs()}


# ---- bad input (no optimum needed) --------------------------------------------------------------------
def test_no_interpreter_is_a_one_line_error(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("KILN_OPTIMUM_PYTHON", raising=False)
    with pytest.raises(ExportError, match=r"python3 -m venv \.venv-optimum && .*optimum-onnx==0\.1\.0") as e:
        export_onnx(str(tiny_dir), tmp_path / "o", exporter="optimum")
    assert "\n" not in str(e.value) and "KILN_OPTIMUM_PYTHON" in str(e.value)
    r = _cli("export", "onnx", tiny_dir, "-o", tmp_path / "o", "--exporter", "optimum")
    assert r.exit_code == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "--optimum-python" in r.stderr
    assert not (tmp_path / "o").exists()


def test_quantized_checkpoint_is_refused(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("KILN_OPTIMUM_PYTHON", raising=False)  # refused before the interpreter matters
    q = make_quantized(tiny_dir, tmp_path / "q", "int8-wo")
    with pytest.raises(ExportError, match=r"quantized checkpoint \(int8-wo\); --exporter optimum exports fp32"):
        export_onnx(str(q), tmp_path / "o", exporter="optimum")
    assert not (tmp_path / "o").exists()


def test_interpreter_without_optimum_leaves_nothing(tiny_dir, tmp_path):
    out = tmp_path / "sub" / "o"
    with pytest.raises(ExportError, match="has no optimum-onnx; create one with"):
        export_onnx(str(tiny_dir), out, exporter="optimum", optimum_python=sys.executable)
    assert list((tmp_path / "sub").iterdir()) == []  # no artifact, no temporary dir
    with pytest.raises(ExportError, match="not an executable Python"):
        export_onnx(str(tiny_dir), out, exporter="optimum", optimum_python=str(tmp_path / "nope"))
    out.mkdir()
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_onnx(str(tiny_dir), out, exporter="optimum", optimum_python=sys.executable)
    with pytest.raises(ExportError, match="--opset applies to --exporter kiln"):
        export_onnx(str(tiny_dir), out, exporter="optimum", opset=21, optimum_python=sys.executable)
