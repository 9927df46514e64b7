"""--budget: sensitivity proxy, the cost-minimal choice within the prediction, and the measured-artifact loop."""
from __future__ import annotations

import json
import math

import pytest

from compress.budget.search import COSTS, choose, move_up, predicted_ratio
from compress.errors import CompressError


def test_choose_takes_the_cheapest_within_the_prediction_and_move_up_climbs():
    scores = {"a": {"int4": 0.010, "int8-wo": 0.001, "float": 0.0},
              "b": {"int4": 0.002, "int8-wo": 0.0002, "float": 0.0}}
    sizes = {"a": 100, "b": 100}
    c = choose(scores, sizes, ["int4", "int8-wo", "float"], "cpu", budget=math.exp(0.004))
    assert c.formats == {"a": "int8-wo", "b": "int4"}  # a's step buys the most loss per added byte
    assert c.predicted_ratio == pytest.approx(math.exp(0.003))
    assert c.cost == 100 * COSTS["cpu"]["int8-wo"] + 100 * COSTS["cpu"]["int4"]
    loose = choose(scores, sizes, ["int4", "int8-wo", "float"], "cpu", budget=1.5)
    assert loose.formats == {"a": "int4", "b": "int4"}
    assert move_up(c, scores, sizes, ["int4", "int8-wo", "float"], "cpu") == "b"  # the highest predicted loss
    assert c.formats == {"a": "int8-wo", "b": "int8-wo"} and c.predicted_ratio == predicted_ratio(scores, c.formats)


def test_choose_steps_back_a_group_a_later_large_step_made_unneeded():
    """The greedy moves the small group up first (the most loss per byte), is still over, and moves the big one
    up too, which alone would do: the small one steps back to the cheap format, still within the budget."""
    scores = {"big": {"int4": 0.0040, "int8-wo": 0.0}, "small": {"int4": 0.0010, "int8-wo": 0.0}}
    sizes = {"big": 1000, "small": 100}
    c = choose(scores, sizes, ["int4", "int8-wo"], "cpu", budget=math.exp(0.0011))
    assert c.formats == {"big": "int8-wo", "small": "int4"}
    assert c.predicted_ratio == pytest.approx(math.exp(0.0010))
    assert c.cost == 1000 * COSTS["cpu"]["int8-wo"] + 100 * COSTS["cpu"]["int4"]


def test_recalibrate_scales_the_proxy_by_the_measured_miss():
    """A measured miss scales every score by log(measured) / predicted loss and searches again: here the proxy
    predicted 0.003 of a 0.004 budget and the artifact measured 0.006 (k = 2), so the budget allows 0.002 of
    raw proxy loss: both groups int8-wo, predicted at the scaled 0.0024. No miss beyond the prediction, or no
    more precise choice, gives None (move_up then)."""
    from compress.budget.search import recalibrate

    scores = {"a": {"int4": 0.010, "int8-wo": 0.001, "float": 0.0},
              "b": {"int4": 0.002, "int8-wo": 0.0002, "float": 0.0}}
    sizes, cands = {"a": 100, "b": 100}, ["int4", "int8-wo", "float"]
    c = choose(scores, sizes, cands, "cpu", budget=math.exp(0.004))
    r = recalibrate(c, scores, sizes, cands, "cpu", math.exp(0.004), measured=math.exp(0.006))
    assert r.scale == pytest.approx(2.0) and r.formats == {"a": "int8-wo", "b": "int8-wo"}
    assert r.predicted_ratio == pytest.approx(math.exp(2 * 0.0012)) and r.cost > c.cost
    assert recalibrate(c, scores, sizes, cands, "cpu", math.exp(0.004), measured=math.exp(0.0025)) is None
    top = choose(scores, sizes, ["int8-wo"], "cpu", budget=1.0001)
    assert recalibrate(top, scores, sizes, ["int8-wo"], "cpu", 1.0001, measured=1.01) is None
    assert move_up(r, scores, sizes, cands, "cpu") == "a" and r.predicted_ratio == pytest.approx(
        math.exp(2 * 0.0002))  # move_up keeps the scale


def test_group_scores_rank_formats_and_groups(tiny_dir):
    from compress.budget.sensitivity import group_scores
    from compress.calib import calibration_batches
    from compress.loading import load_model

    model, tok, _ = load_model(str(tiny_dir))
    s = group_scores(model, calibration_batches(tok, samples=2, seq_len=64), ["int4", "int8-wo", "fp8"])
    assert len(s) == 8 and all(v["float"] == 0.0 for v in s.values())
    for g, v in s.items():  # fewer bits, more predicted loss, in every group
        assert v["int4"] > v["int8-wo"] > 0, g
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was


def test_cpu_scores_see_the_kernels_activation_blocks(tiny_dir):
    """On the cpu target a weight-only format's input is re-quantized per block as ONNX Runtime's kernel does:
    more predicted loss than with a float input, and less at blocks of 16 (int8-fine) than of 32."""
    from compress.budget.search import KERNEL_BLOCKS
    from compress.budget.sensitivity import group_scores
    from compress.calib import calibration_batches
    from compress.loading import load_model

    model, tok, _ = load_model(str(tiny_dir))
    batches = calibration_batches(tok, samples=2, seq_len=64)
    plain = group_scores(model, batches, ["int8-wo"])
    cpu = group_scores(model, batches, ["int8-wo", "int8-fine"], KERNEL_BLOCKS["cpu"])
    for g in cpu:
        assert cpu[g]["int8-wo"] > plain[g]["int8-wo"], g
    assert sum(v["int8-fine"] for v in cpu.values()) < sum(v["int8-wo"] for v in cpu.values())


def test_apply_quantizes_the_head_in_the_int8_pass_of_its_one_run(tiny_dir):
    """With int8-wo chosen, the lm_head is quantized in the same layer-by-layer run as the decoder, in the
    int8-wo pass record: the same codes as a pass of its own after that run, one run less."""
    import torch

    from compress.calib import calibration_batches, forward_loop
    from compress.loading import load_model
    from compress.quant import Int8WeightOnly, quantize_
    from compress.quant.api import quant_state
    from compress.quant.calibrate import layer_groups
    from kiln.budget import apply

    batches = calibration_batches(*load_model(str(tiny_dir))[1:2], samples=2, seq_len=32)
    heads = []
    for merged in (True, False):
        model, _, _ = load_model(str(tiny_dir))
        groups = layer_groups(model)
        formats = {g.name: ("int4", "int8-wo")[i % 2] for i, g in enumerate(groups)}
        if merged:
            apply(model, groups, formats | {"lm_head": "int8-wo"}, forward_loop(batches), progress=False, group=32)
        else:
            apply(model, groups, formats, forward_loop(batches), progress=False, group=32)
            quantize_(model, Int8WeightOnly(targets=("lm_head",)), calib=forward_loop(batches))
        state = quant_state(model)
        assert [p.config.scheme for p in state["passes"]] == ["int4", "int8-wo"] + ([] if merged else ["int8-wo"])
        assert state["passes"][0].stats["joint"] == ["int4", "int8-wo"]
        assert state["lm_head"] is not None and "lm_head" in state["passes"][-1].layers
        heads.append(state["lm_head"]["codes"])
    assert torch.equal(heads[0], heads[1])


def test_apply_quantizes_an_int4_head_in_the_int4_pass(tiny_dir):
    """A head chosen int4 goes in the int4 pass, made last: int4 codes in groups of the search's size, tied
    table included; with no int4 group, in a pass of its own."""
    from compress.calib import calibration_batches, forward_loop
    from compress.loading import load_model
    from compress.quant.api import quant_state
    from compress.quant.calibrate import layer_groups
    from kiln.budget import apply

    for decoder in ("int4", "int8-wo"):
        model, tok, _ = load_model(str(tiny_dir))
        groups = layer_groups(model)
        apply(model, groups, {g.name: decoder for g in groups} | {"lm_head": "int4"},
              forward_loop(calibration_batches(tok, samples=2, seq_len=32)), progress=False, group=32)
        state = quant_state(model)
        assert len(state["passes"]) == (1 if decoder == "int4" else 2), decoder
        spec = state["passes"][-1].layers["lm_head"]
        assert spec.weight == "int4" and spec.group_size == 32 and state["lm_head"]["codes"] is not None


def test_apply_records_the_fine_kernel_in_one_int8_pass(tiny_dir):
    """Groups chosen int8-wo and int8-fine are quantized in one int8-wo pass (the same weights); only the
    fine ones record kernel "fine"; float groups stay float."""
    from compress.calib import calibration_batches, forward_loop
    from compress.loading import load_model
    from compress.quant.calibrate import layer_groups
    from kiln.budget import apply

    model, tok, _ = load_model(str(tiny_dir))
    groups = layer_groups(model)
    cycle = ["int8-wo", "int8-fine", "float"]
    formats = {g.name: cycle[i % 3] for i, g in enumerate(groups)}
    apply(model, groups, formats | {"lm_head": "int8-wo"}, forward_loop(calibration_batches(tok, samples=2, seq_len=32)),
          progress=False)
    mods = dict(model.named_modules())
    for g in groups:
        for n in g.linears:
            spec = getattr(mods[n], "spec", None)
            if formats[g.name] == "float":
                assert spec is None, n
            else:
                assert spec.weight == "int8" and spec.kernel == ("fine" if formats[g.name] == "int8-fine" else None)


def test_budget_end_to_end_on_the_artifact(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from kiln.cli import cli
    from runtime.manifest import read_manifest

    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["compress", "quantize", str(tiny_dir), "--budget", "1.02", "--formats", "int4,int8-wo",
                                 "--target", "cpu", "-o", str(out), "--calib-samples", "2", "--seq-len", "64",
                                 "--eval-windows", "2", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    last = res["rounds"][-1]
    assert res["met"] and last["measured_ratio"] <= 1.02 and (tmp_path / "q-onnx" / "model.onnx").is_file()
    m = read_manifest(out)
    rec = m.quant_passes()[-1].stats["budget"]
    assert rec["rounds"] == res["rounds"] and set(rec["groups"]) == {f"model.layers.{i}.{g}" for i in range(2)
                                                                     for g in ("attn_in", "o_in", "mlp_in", "down_in")
                                                                     } | {"lm_head"}
    specs = m.layer_specs()
    head = {"int4": "int4", "int8-wo": "int8"}[res["lm_head"]]  # the head is one of the search's groups on cpu
    assert {s.weight for s in specs.values()} <= {"int4", "int8"} and specs["lm_head"].weight == head
    assert rec["groups"]["lm_head"]["format"] == res["lm_head"] == last["lm_head"]
    assert read_manifest(tmp_path / "q-onnx").io.form == "ort"


def test_bad_budget_requests_are_one_line(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from kiln.cli import cli

    base = ["compress", "quantize", str(tiny_dir), "-o", str(tmp_path / "q")]
    for extra, msg in ((["--budget", "1.01", "--formats", "fp8,float", "--target", "cpu"], "fp8 is not a format for"),
                       (["--budget", "0.9", "--formats", "int4"], "--budget is a perplexity ratio above 1"),
                       (["--budget", "1.01", "--formats", ","], "--formats needs at least one format"),
                       ([], "give --scheme NAME, or --budget")):
        r = CliRunner().invoke(cli, base + extra)
        assert r.exit_code == 2 and msg in r.output, r.output
    with pytest.raises(CompressError, match="unknown format"):
        from kiln.budget import format_config

        format_config("int3", ())


def test_scores_with_gptq_weights_and_the_head(tiny_dir):
    """With ``gptq`` the proxy scores the weights GPTQ makes (the Hessian of each group's input on other
    windows, as --budget does): less predicted loss than round to nearest over the model, for int4 and int8
    (0.46x and 0.81x on this model, 0.17x and 0.51x with the text's labels), and for the head, which ``head``
    adds as group ``lm_head`` in that one format, scored the same way (0.97x; 0.78x)."""
    from compress.budget.search import KERNEL_BLOCKS
    from compress.budget.sensitivity import group_scores
    from compress.calib import calibration_batches
    from compress.loading import load_model

    model, tok, _ = load_model(str(tiny_dir))
    batches = calibration_batches(tok, samples=6, seq_len=48)
    fmts = ["int4", "int8-wo"]
    rtn = group_scores(model, batches[:2], fmts, KERNEL_BLOCKS["cpu"], head=["int8-wo"])
    gq = group_scores(model, batches[:2], fmts, KERNEL_BLOCKS["cpu"], gptq=frozenset(fmts), head=["int8-wo"],
                      hessian_batches=batches[2:])
    assert set(gq) == set(rtn) and set(gq["lm_head"]) == {"int8-wo", "float"} and gq["lm_head"]["int8-wo"] > 0
    for f in fmts:
        total = {name: sum(v[f] for g, v in s.items() if g != "lm_head") for name, s in (("rtn", rtn), ("gq", gq))}
        assert total["gq"] < total["rtn"], (f, total)
    assert gq["lm_head"]["int8-wo"] < rtn["lm_head"]["int8-wo"]
    assert all(p.requires_grad for p in model.parameters())


def test_labels_drawn_from_the_model_are_seeded(tiny_dir):
    """The default proxy takes gradients for next tokens drawn from the model's own distribution (seeded: the
    same scores twice); ``labels="data"`` uses the text's; anything else is refused."""
    from compress.budget.sensitivity import group_scores
    from compress.calib import calibration_batches
    from compress.loading import load_model

    model, tok, _ = load_model(str(tiny_dir))
    batches = calibration_batches(tok, samples=2, seq_len=48)
    a, b = group_scores(model, batches, ["int4"]), group_scores(model, batches, ["int4"], labels="model")
    d = group_scores(model, batches, ["int4"], labels="data")
    assert a == b and a != d and all(v["int4"] > 0 for v in a.values())
    with pytest.raises(ValueError, match="labels: data or model"):
        group_scores(model, batches, ["int4"], labels="text")


def test_activation_formats_are_scored_as_their_pass_smooths_them():
    """For fp8 / int8-sq the proxy takes the smoothing and clip the preset's pass would choose: on an input with
    one massive channel it smooths, and the output error of what it scores is below that of the input
    quantized plainly at its calibration max (0.035x for int8-sq, 0.55x for fp8 here)."""
    import torch

    from compress.budget.sensitivity import ActChoice, act_choice, fake_input, fake_weight
    from compress.quant import primitives as P

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, 5] *= 60.0  # a massive activation channel
    w = torch.randn(96, 64, generator=g) / 8
    y = x @ w.T
    for fmt, act in (("int8-sq", "int8"), ("fp8", "fp8")):
        c = act_choice(fmt, x, x.abs().amax(dim=0), w, repeat=1, head_dim=16)
        assert c.smooth is not None and c.act == act, fmt
        err = float(((fake_input(x, fmt, act=c) @ fake_weight(w * c.smooth, fmt).T - y) ** 2).mean())
        plain = ActChoice(act, None, P.static_scale(x.abs().max(), act))
        err0 = float(((fake_input(x, fmt, act=plain) @ fake_weight(w, fmt).T - y) ** 2).mean())
        assert err < err0, (fmt, err, err0)
