"""Quantization transforms, checkpoints and bad input on the tiny random Llama."""
import json

import pytest
import torch

from compress import CompressError
from compress.calib import calibration_batches, forward_loop
from compress.loading import load_model
from compress.quant import SCHEMES, Fp8, Int4, Int8WeightOnly, config_for, quantize_, save_quantized
from compress.quant.calibrate import collect_stats, layer_groups
from compress.quant.modules import QuantLinear
from compress.quant.smooth import smooth_factors
from compress.quant.transforms import fold_smoothing
from runtime.fsutil import sha256_file
from runtime.layerspec import LayerSpec
from runtime.records import PrunePass


def _ids():
    return torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(5))


def test_smoothing_alone_leaves_outputs_unchanged(tiny_dir, calib):
    model, _, _ = load_model(str(tiny_dir))
    x = _ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    groups = layer_groups(model)
    st = collect_stats(model, forward_loop(calib), [g.linears[0] for g in groups])
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    for g in groups:
        w = torch.cat([model.get_submodule(n).weight.detach() for n in g.linears])
        s = smooth_factors(st[g.linears[0]].amax, w.abs().amax(0), 0.8, g.repeat, hd)
        assert float(s.max() / s.min()) > 2  # a real migration, not the identity
        fold_smoothing(model, g, s, hd)
    with torch.no_grad():
        out = model(input_ids=x).logits
    assert float((out - ref).abs().max()) <= 1e-5


# relative logit error of each preset on the tiny model (measured 0.0108, 0.0396, 0.0387, 0.0106, 0.0995,
# 0.0104; deterministic): a bound per scheme, about 1.5x its own figure
REL_BOUND = {"int8-wo": 0.016, "fp8": 0.06, "int8-sq": 0.06, "int8-dyn": 0.016, "int4": 0.15, "int8-group": 0.016}
CONFIG_KW = {"int8-group": {"group_size": 32}}  # 32 < the tiny model's input dims: really per group


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_scheme_round_trip_is_exact(scheme, tiny_copy, calib, tmp_path):
    before = {p.name: sha256_file(p) for p in tiny_copy.iterdir() if p.is_file()}
    model, tok, _ = load_model(str(tiny_copy))
    x = _ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    rec = quantize_(model, config_for(scheme, **CONFIG_KW.get(scheme, {})), calib=forward_loop(calib))
    tensorrt = scheme in ("fp8", "int8-sq")  # presets for TensorRT keep the tied lm_head float
    assert len(rec.layers) == 2 * 7 + (0 if tensorrt else 1)
    assert tensorrt or rec.layers["lm_head"].act is None
    with torch.no_grad():
        y = model(input_ids=x).logits
    rel = float((y - ref).norm() / ref.norm())
    assert 1e-3 < rel < REL_BOUND[scheme], rel  # quantized, and still the same model
    out = tmp_path / "q"
    save_quantized(model, tok, out, source={"id": "tiny"}, earlier_passes=[PrunePass(config={"x": 1})])
    man = json.loads((out / "kiln.json").read_text())
    assert [p["kind"] for p in man["passes"]] == ["prune", "quantize"]
    m2, _, _ = load_model(str(out))
    with torch.no_grad():
        y2 = m2(input_ids=x).logits
    assert torch.equal(y, y2)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dt = f.get_slice("model.layers.0.mlp.down_proj.weight").get_dtype()
        assert dt == {"int8-wo": "I8", "fp8": "F8_E4M3", "int8-sq": "I8", "int8-dyn": "I8", "int4": "U8",
                      "int8-group": "I8"}[scheme]
        assert "lm_head.weight" not in f.keys()
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == ("F32" if tensorrt else "I8")
        if scheme in ("fp8", "int8-sq"):
            assert f.get_tensor("model.layers.1.self_attn.o_proj.input_scale").shape == ()
            assert f.get_tensor("model.layers.1.mlp.up_proj.smooth_factor").shape == (64,) or \
                rec.stats["groups"][2]["alpha"] is None
    assert {p.name: sha256_file(p) for p in tiny_copy.iterdir() if p.is_file()} == before
    with pytest.raises(CompressError, match="already quantized"):  # every selected Linear is quantized already
        quantize_(m2, Int8WeightOnly(method="rtn", ignore=("lm_head",)))


def test_ignore_patterns(tiny_dir, calib):
    model, _, _ = load_model(str(tiny_dir))
    emb = model.get_input_embeddings().weight.detach().clone()
    rec = quantize_(model, Int4(ignore=("down_proj", "re:model\\.layers\\.1\\.self_attn\\..*", "lm_head")),
                    calib=forward_loop(calib))
    names = set(rec.layers)
    assert "lm_head" not in names and not any("down_proj" in n for n in names)
    assert not any(n.startswith("model.layers.1.self_attn") for n in names)
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.up_proj" in names
    assert isinstance(model.get_submodule("model.layers.0.mlp.gate_proj"), QuantLinear)
    assert not isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), QuantLinear)
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert rec.layers["model.layers.0.self_attn.q_proj"] == LayerSpec("int4", group_size=64)


def test_gptq_beats_round_to_nearest(tiny_dir, calib):
    x = _ids()
    errs = {}
    for method in ("rtn", "gptq"):
        model, _, _ = load_model(str(tiny_dir))
        with torch.no_grad():
            ref = model(input_ids=x).logits
        quantize_(model, Int4(method=method, ignore=("lm_head",)), calib=forward_loop(calib))
        with torch.no_grad():
            errs[method] = float((model(input_ids=x).logits - ref).norm())
    assert errs["gptq"] < errs["rtn"], errs


def test_bad_configs_say_what_to_do():
    with pytest.raises(CompressError, match="valid schemes: int8-wo, fp8, int8-sq, int8-dyn, int4, int8-group"):
        config_for("int3")
    with pytest.raises(CompressError, match="not a valid regular expression"):
        Int8WeightOnly(ignore=("re:(",))
    with pytest.raises(CompressError, match="alphas"):
        Fp8(alphas=(1.5,))
    with pytest.raises(CompressError, match="group_size"):
        Int4(group_size=100)


def test_activation_schemes_need_calibration(tiny_dir):
    model, _, _ = load_model(str(tiny_dir))
    with pytest.raises(CompressError, match="needs calibration data"):
        quantize_(model, Fp8())


def test_calibration_text_too_short_says_how_much(tiny_dir, tmp_path):
    _, tok, _ = load_model(str(tiny_dir))
    short = tmp_path / "short.txt"
    short.write_text("a few words only " * 20)
    with pytest.raises(CompressError, match=r"calibration text too short: .* need \d+ tokens"):
        calibration_batches(tok, str(short), samples=8, seq_len=64)


def test_gptq_head_lowers_the_head_output_error(tiny_dir):
    """With GPTQ, the lm_head (here the tied table) is quantized by GPTQ on the final norm's output: the decoder
    is the same as with the head rounded to nearest, and the head's output error on the calibration positions,
    |X (Q - W)^T|^2, is lower."""
    import torch

    from compress.calib import calibration_batches
    from compress.loading import load_model
    from compress.quant import config_for, quantize_

    models = {}
    for gh in (False, True):
        model, tok, _ = load_model(str(tiny_dir))
        w0 = model.get_output_embeddings().weight.detach().float().clone()
        batches = calibration_batches(tok, samples=2, seq_len=64)
        quantize_(model, config_for("int8-wo", gptq_head=gh), calib=batches)
        models[gh] = model
    a, b = models[False].state_dict(), models[True].state_dict()
    layers = [k for k in a if ".layers." in k]
    assert layers and all(torch.equal(a[k], b[k]) for k in layers)
    with torch.no_grad():  # the head's input: the final norm's output of the quantized decoder
        x = torch.cat([models[False].model(input_ids=t).last_hidden_state[0] for t in batches]).double()
    err = {gh: float(((x @ (m.get_output_embeddings().weight.detach().double() - w0.double()).T) ** 2).mean())
           for gh, m in models.items()}
    print(f"head output error: round to nearest {err[False]:.3e}, GPTQ {err[True]:.3e}")
    assert err[True] < 0.7 * err[False]
