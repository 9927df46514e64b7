"""Quantizing a checkpoint read one decoder layer at a time gives exactly what quantizing the loaded model
gives; bf16 sharded sources and Hub ids work; the layer-by-layer perplexity is the whole-model one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.calib import calibration_batches, forward_loop
from compress.loading import load_model
from compress.quant import config_for, quantize_
from compress.quant.entry import quantize_checkpoint
from compress.quant.modules import QuantLinear
from runtime.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]


def _codes(model) -> dict:
    return {n: (m.codes.view(torch.int8), m.weight_scale) for n, m in model.named_modules()
            if isinstance(m, QuantLinear)}


@pytest.fixture(scope="module")
def bf16_sharded(tmp_path_factory):
    """The tiny model in bfloat16, saved in several shards with an index (as Hub checkpoints come)."""
    from tests.tiny import make_model, make_tokenizer

    d = tmp_path_factory.mktemp("bf16") / "m"
    tok = make_tokenizer()
    model = make_model(len(tok)).to(torch.bfloat16)
    model.save_pretrained(str(d), safe_serialization=True, max_shard_size="60KB")
    tok.save_pretrained(str(d))
    assert len(list(d.glob("*.safetensors"))) > 2 and (d / "model.safetensors.index.json").is_file()
    return d


@pytest.mark.parametrize("scheme,kw", [("int8-wo", {}), ("int4", {"method": "rtn"}), ("int8-sq", {})],
                         ids=["int8-wo-gptq", "int4-rtn", "int8-sq"])
def test_streamed_equals_in_memory(tiny_dir, tmp_path, scheme, kw):
    cfg = config_for(scheme, **kw)
    model, tok, _ = load_model(str(tiny_dir))
    quantize_(model, cfg, calib=forward_loop(calibration_batches(tok, "builtin:pydoc", 4, 64)))
    out = tmp_path / "q"
    res = quantize_checkpoint(str(tiny_dir), cfg, out, calib_samples=4, seq_len=64, eval_windows=None,
                              shard_size=60_000)
    assert len(res["shards"]) > 1 and (out / "model.safetensors.index.json").is_file()
    streamed, _, _ = load_model(str(out))
    a, b = _codes(model), _codes(streamed)
    assert a.keys() == b.keys() and len(a) == 14
    for n in a:
        assert torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]), n
    x = torch.randint(3, 500, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, streamed(input_ids=x).logits)
    m = read_manifest(out)
    assert m.layer_specs() == {n: q.spec for n, q in model.named_modules() if isinstance(q, QuantLinear)} | (
        {"lm_head": model.kiln_quant["passes"][-1].layers["lm_head"]} if "lm_head" in m.layer_specs() else {})


def test_bf16_sharded_source_keeps_untouched_tensors_in_bf16(bf16_sharded, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "q"
    res = quantize_checkpoint(str(bf16_sharded), config_for("int8-wo", method="rtn"), out, eval_windows=2,
                              seq_len=64)
    assert 0.9 < res["perplexity"]["ratio"] < 1.1
    dtypes = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            dtypes |= {k: h.get_slice(k).get_dtype() for k in h.keys()}
    assert dtypes["model.layers.0.input_layernorm.weight"] == "BF16" and dtypes["model.norm.weight"] == "BF16"
    assert dtypes["model.layers.1.mlp.down_proj.weight"] == "I8" and dtypes["model.embed_tokens.weight"] == "I8"
    model, tok, _ = load_model(str(bf16_sharded))  # the same bf16 values, as float32
    quantize_(model, config_for("int8-wo", method="rtn"))
    streamed, _, _ = load_model(str(out))
    for n, (c, s) in _codes(model).items():
        assert torch.equal(c, _codes(streamed)[n][0]), n


def test_streamed_perplexity_is_the_whole_model_one(tiny_dir):
    from compress.evaluate import perplexity, perplexity_streamed
    from compress.lazy import LazyModel

    model, tok, _ = load_model(str(tiny_dir))
    whole = perplexity(model, tok, seq_len=64, windows=3)
    streamed = perplexity_streamed(LazyModel(tiny_dir), tok, seq_len=64, windows=3, head_chunk=100)
    assert streamed.tokens == whole.tokens and abs(streamed.ppl / whole.ppl - 1) < 1e-6


def _hub_cache(tmp_path: Path, src: Path, repo: str) -> Path:
    """huggingface_hub's cache layout for ``repo``: blobs, a snapshot of links to them, refs/main."""
    import hashlib
    import shutil

    cache = tmp_path / "hub"
    base = cache / ("models--" + repo.replace("/", "--"))
    commit = "0" * 39 + "1"
    snap = base / "snapshots" / commit
    (base / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        data = f.read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return cache


def test_hub_id_from_the_cache_offline_and_a_missing_one_in_one_line(bf16_sharded, tmp_path):
    cache = _hub_cache(tmp_path, bf16_sharded, "kiln-test/tiny-llama")
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "kiln.cli", "compress", "quantize", "kiln-test/tiny-llama", "--scheme", "int8-wo",
           "--method", "rtn", "-o", str(out), "--eval-windows", "0", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = read_manifest(out)
    assert m.source["id"] == "kiln-test/tiny-llama" and len(m.source["sha256"]) == 64
    cmd[5] = "kiln-test/not-there"
    r = subprocess.run(cmd[:-1] + ["--force"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "kiln-test/not-there: not in the Hugging Face cache" in r.stderr and str(cache) in r.stderr
    assert "HF_HUB_OFFLINE" in r.stderr and "Traceback" not in r.stderr
    json.loads(json.dumps(m.to_dict()))


def test_activations_over_budget_go_to_files_and_change_nothing(tiny_dir, tmp_path):
    cfg = config_for("int8-sq")  # both streams (float statistics, GPTQ inputs)
    quantize_checkpoint(str(tiny_dir), cfg, tmp_path / "mem", calib_samples=3, seq_len=64, eval_windows=None)
    quantize_checkpoint(str(tiny_dir), cfg, tmp_path / "disk", calib_samples=3, seq_len=64, eval_windows=None,
                        activation_budget=1)
    a, b = read_manifest(tmp_path / "mem"), read_manifest(tmp_path / "disk")
    assert b.quant_passes()[-1].stats.get("activations_on_disk") and not a.quant_passes()[-1].stats.get(
        "activations_on_disk")
    ma, _, _ = load_model(str(tmp_path / "mem"))
    mb, _, _ = load_model(str(tmp_path / "disk"))
    for n, (c, s) in _codes(ma).items():
        assert torch.equal(c, _codes(mb)[n][0]) and torch.equal(s, _codes(mb)[n][1]), n


def test_untied_head_streams_in_row_blocks(tmp_path, monkeypatch):
    from compress.quant import entry
    from tests.tiny import save_tiny

    src = save_tiny(tmp_path / "untied", tied=False)
    monkeypatch.setattr(entry, "ROWS", 100)  # several blocks of the 512-row table
    cfg = config_for("int4", method="rtn")
    model, tok, _ = load_model(str(src))
    quantize_(model, cfg)
    quantize_checkpoint(str(src), cfg, tmp_path / "q", eval_windows=None)
    streamed, _, _ = load_model(str(tmp_path / "q"))
    assert read_manifest(tmp_path / "q").layer_specs()["lm_head"].weight == "int8"
    x = torch.randint(3, 500, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, streamed(input_ids=x).logits)


def test_a_shared_hessian_is_the_mean_once(tiny_dir):
    """q/k/v (and gate/up) share one input and one Hessian: each gets mean x x^T, divided by the token count
    once however many Linears share it (windows of 37 tokens, so a second division would not be exact)."""
    from compress.quant.calibrate import capture_layer_inputs
    from compress.sequential import LayerJob, Stream, layer_groups_of

    model, tok, _ = load_model(str(tiny_dir))
    batches = calibration_batches(tok, samples=2, seq_len=37)
    inputs = capture_layer_inputs(model, forward_loop(batches))
    layer = model.model.layers[0]
    job = LayerJob(0, layer, layer_groups_of(model.config, 0, layer), None, Stream(inputs))
    names = [f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "mlp.gate_proj", "mlp.up_proj")]
    seen = {}
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("attn", []).append(a[0])),
             layer.mlp.gate_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("mlp", []).append(a[0]))]
    with torch.no_grad():
        for h, kw in inputs:
            layer(h, **kw)
    for hd in hooks:
        hd.remove()
    hess = job.hessians(names)
    for key, group in (("attn", names[:3]), ("mlp", names[3:])):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[key]]).double()
        want = (x.T @ x / x.shape[0]).float()
        for n in group:
            torch.testing.assert_close(hess[n], want, rtol=1e-4, atol=1e-6)
