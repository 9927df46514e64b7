"""``kiln compress quantize SOURCE --budget 1.015 --formats fp8,int8-wo,float --target h100 -o OUT``.

1. Sensitivity of every input group to every candidate format (compress.budget.sensitivity).
2. The cheapest assignment for the target whose predicted perplexity ratio is within the budget
   (compress.budget.search).
3. Quantize with it (every format in one layer-by-layer run, a pass record per format: activation formats
   first within each layer, so smoothing still folds into float ops), export the artifact the target runs
   (cpu: the ONNX Runtime form when it applies; h100: portable), and measure its perplexity on held-out
   windows (the start of the evaluation corpus; calibration comes from the end). Over budget: the proxy's scores are scaled by how much it under-predicted this artifact and the
   search runs again under them (search.recalibrate); where that changes nothing, the group with the highest
   predicted loss moves up one format. Up to ``max_rounds`` artifacts.
The checkpoint goes to OUT, the measured artifact to OUT-onnx (unless ``keep_artifact`` is False: `kiln pipeline`
exports it again, validated); kiln.json's last quantize pass records the
search (``stats.budget``). The model is held in memory (a model of SmolLM2's size); see docs/QUANTIZATION.md.
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from pathlib import Path

from compress.budget.search import COSTS, GROUPS, KERNEL_BLOCKS, choose, move_up, recalibrate
from compress.errors import CompressError
from runtime.corpus import BUILTIN

ACT_FORMATS = ("fp8", "int8-sq", "int8-dyn")


def format_config(fmt: str, targets: tuple[str, ...], group: int = 128):
    """The quantize config of candidate format ``fmt`` for the Linears ``targets``; grouped formats (int4,
    int8-group) at ``group`` inputs per scale (compress.budget.search.GROUPS)."""
    from compress.quant import config as C

    make = {"int8-wo": lambda: C.Int8WeightOnly(targets=targets),
            "int8-fine": lambda: C.Int8WeightOnly(targets=targets, kernel="fine"),
            "int8-group": lambda: C.Int8Grouped(targets=targets, group_size=group),
            "int4": lambda: C.Int4(targets=targets, group_size=group), "fp8": lambda: C.Fp8(targets=targets, ignore=()),
            "int8-sq": lambda: C.SmoothQuantInt8(targets=targets, ignore=(), float_inputs=()),
            "int8-dyn": lambda: C.Int8Dynamic(targets=targets)}
    if fmt not in make:
        raise CompressError(f"--formats: unknown format {fmt!r}; formats: {', '.join(make)}, float")
    return make[fmt]()


def parse_formats(text: str, target: str) -> list[str]:
    fmts = [f.strip() for f in str(text).split(",") if f.strip()]
    if not fmts:
        raise CompressError("--formats needs at least one format")
    bad = [f for f in fmts if f not in COSTS[target]]
    if bad:
        raise CompressError(f"--formats {bad[0]} is not a format for --target {target}; "
                            f"{target} takes {', '.join(COSTS[target])}")
    return fmts


HEAD_FORMATS = ("int4", "int8-wo", "float")  # what the cpu target's lm_head (a tied table too) may be


def apply(model, groups, formats: dict[str, str], calib, progress: bool, group: int = 128) -> None:
    """Quantize ``model`` in place: each group to its format, in one layer-by-layer run (quantize_joint_: a
    pass record per format, activation formats first within each layer). ``formats["lm_head"]`` (int8-wo or
    int4; absent or float: the head stays float) is quantized by GPTQ on the stream through the quantized
    decoder, in the pass record of its format."""
    from compress.quant import quantize_joint_

    head = formats.get("lm_head", "float")
    if head not in HEAD_FORMATS:
        raise CompressError(f"the lm_head takes {', '.join(HEAD_FORMATS)}, not {head}")
    by = {}
    for g in groups:
        if formats[g.name] != "float":
            by.setdefault(formats[g.name], []).extend(g.linears)
    fine = tuple(by.pop("int8-fine", ()))
    if fine:  # int8-wo weights too: one int8-wo config, which records the fine kernel for these
        by["int8-wo"] = by.get("int8-wo", []) + list(fine)
    if head != "float":
        by.setdefault(head, [])  # a config of the head's format, for the head alone where no group has it
    configs = []
    for fmt in sorted(by, key=lambda f: (f not in ACT_FORMATS, f == head, f)):  # the head's record last
        targets = tuple(by[fmt]) + (("lm_head",) if fmt == head else ())
        config = format_config(fmt, targets, group)
        if fmt == "int8-wo" and fine:
            config = dataclasses.replace(config, fine=fine)
        if fmt == "int4" == head:
            config = dataclasses.replace(config, lm_head="int4")
        configs.append(config)
    if configs:
        quantize_joint_(model, configs, calib=calib, progress=progress)


def quantize_budget(source: str, out, *, budget: float, formats: str, target: str = "cpu",
                    calib_text: str = BUILTIN, calib_samples: int = 16, seq_len: int = 512,
                    eval_text: str | None = None, eval_windows: int = 8, sensitivity_windows: int = 4,
                    max_rounds: int = 4, force: bool = False, progress: bool = False,
                    keep_artifact: bool = True) -> dict:
    from export.onnx import export_onnx
    from runtime import Engine
    from runtime.evaluate import perplexity as rt_perplexity

    from compress.budget.sensitivity import WEIGHT_FORMATS, group_scores
    from compress.calib import calibration_batches, forward_loop
    from compress.checkpoint import source_record
    from compress.evaluate import corpus_ids, perplexity
    from compress.loading import load_model
    from compress.quant import save_quantized
    from compress.quant.calibrate import layer_groups

    if not 1.0 < float(budget) < 10.0:
        raise CompressError(f"--budget is a perplexity ratio above 1 (e.g. 1.015), got {budget!r}")
    cands = parse_formats(formats, target)
    out = Path(out)
    art = out.with_name(out.name + "-onnx")
    for p in (out, art) if keep_artifact else (out,):
        if p.exists() and not force:
            raise CompressError(f"{p} already exists; pass --force to replace it")
    t0 = time.perf_counter()
    model0, tok, info = load_model(source, quiet=not progress)
    if info.manifest is not None and info.manifest.quantized:
        raise CompressError(f"{source} is already quantized; search from the float or pruned checkpoint")
    ids = corpus_ids(tok, calib_text)
    batches = calibration_batches(tok, calib_text, calib_samples, seq_len, ids=ids)
    eval_ids = ids if eval_text in (None, calib_text) else corpus_ids(tok, eval_text)
    base = perplexity(model0, tok, text=eval_text or calib_text, seq_len=seq_len, windows=eval_windows, ids=eval_ids)
    groups = layer_groups(model0)
    mods = dict(model0.named_modules())
    sizes = {g.name: sum(mods[n].weight.numel() for n in g.linears) for g in groups}
    t1 = time.perf_counter()
    # the cpu artifact's lm_head (and a tied table) is the search's too; h100's stays float (TensorRT)
    head = list(dict.fromkeys([f for f in HEAD_FORMATS if f in cands] + ["int8-wo"])) if target == "cpu" else None
    gptq = frozenset(f for f in set(cands) | set(head or ())
                     if f in WEIGHT_FORMATS and format_config(f, ()).method == "gptq")
    scores = group_scores(model0, batches[:sensitivity_windows], cands, KERNEL_BLOCKS[target], gptq=gptq,
                          head=head, hessian_batches=batches[sensitivity_windows:], group=GROUPS[target])
    if head:
        scores["lm_head"] = {f: v for f, v in scores["lm_head"].items() if f in head}
        sizes["lm_head"] = model0.get_output_embeddings().weight.numel()
    t_sens = time.perf_counter() - t1
    choice = choose(scores, sizes, cands, target, float(budget))
    rounds = []
    form = "ort" if target == "cpu" else "portable"
    work = out.with_name(f".{out.name}.budget")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        for r in range(max_rounds):
            model = copy.deepcopy(model0)
            apply(model, groups, choice.formats, forward_loop(batches), progress=progress, group=GROUPS[target])
            ck, onnx_dir = work / f"ckpt{r}", work / f"onnx{r}"
            save_quantized(model, tok, ck, source=source_record(info),
                           earlier_passes=list(info.manifest.passes) if info.manifest is not None else [])
            del model
            if any(choice.formats[g] in ("fp8", "int8-sq") for g in choice.formats):
                form = "portable"
            export_onnx(str(ck), onnx_dir, form=form, validate=False, force=True)
            with Engine.load(onnx_dir) as eng:
                ppl = rt_perplexity(eng, text=eval_text or calib_text, seq_len=seq_len, windows=eval_windows,
                                    ids=eval_ids).ppl
            measured = ppl / base.ppl
            rounds.append({"round": r, "predicted_ratio": round(choice.predicted_ratio, 5),
                           "proxy_scale": round(choice.scale, 4),
                           "measured_ratio": round(measured, 5), "cost": round(choice.cost),
                           "formats": _count(choice.formats), "lm_head": choice.formats.get("lm_head", "float"),
                           "bytes": _size(onnx_dir)})
            if progress:
                print(f"budget round {r}: predicted {choice.predicted_ratio:.4f}, "
                      f"measured {measured:.4f} "
                      f"({_count(choice.formats)})", flush=True)
            if measured <= float(budget):
                break
            better = recalibrate(choice, scores, sizes, cands, target, float(budget), measured)
            if better is not None:
                choice = better
            elif move_up(choice, scores, sizes, cands, target) is None:
                break
        last = rounds[-1]["round"]
        _finish(work / f"ckpt{last}", out, force, record={
            "budget": float(budget), "target": target, "formats": cands, "rounds": rounds,
            "groups": {g: {"format": f, "predicted_loss": round(scores[g][f], 8)} for g, f in choice.formats.items()},
            "group_size": GROUPS[target],
            "sensitivity": {"windows": sensitivity_windows, "labels": "model", "seconds": round(t_sens, 1),
                            "gptq": sorted(gptq), "lm_head": head},
            "calibration": {"text": calib_text, "samples": calib_samples, "seq_len": seq_len},
            "evaluation": {"text": eval_text or calib_text, "windows": eval_windows, "seq_len": seq_len,
                           "ppl_float": round(base.ppl, 4)}})
        if keep_artifact:
            _replace(work / f"onnx{last}", art, force)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    decoder = {g: f for g, f in choice.formats.items() if g != "lm_head"}  # the weight share is the decoder's
    weights = sum(sizes[g] for g in decoder)
    return {"output": str(out.resolve()), "artifact": str(art.resolve()) if keep_artifact else None,
            "budget": float(budget),
            "target": target, "met": rounds[-1]["measured_ratio"] <= float(budget), "rounds": rounds,
            "weight_share": {f: round(sum(sizes[g] for g in decoder if decoder[g] == f) / weights, 4)
                             for f in set(decoder.values())},
            "lm_head": choice.formats.get("lm_head", "float"), "seconds": round(time.perf_counter() - t0, 1)}


def _count(formats: dict) -> dict:
    """Decoder groups per format (the lm_head apart)."""
    out: dict[str, int] = {}
    for g, f in formats.items():
        if g == "lm_head":
            continue
        out[f] = out.get(f, 0) + 1
    return dict(sorted(out.items()))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _replace(src: Path, dst: Path, force: bool) -> None:
    if dst.exists():
        if not force:
            raise CompressError(f"{dst} already exists; pass --force to replace it")
        shutil.rmtree(dst)
    src.rename(dst)


def _finish(ck: Path, out: Path, force: bool, record: dict) -> None:
    """The chosen checkpoint to ``out``, with the search recorded in its last quantize pass."""
    from runtime.manifest import read_manifest

    m = read_manifest(ck)
    last = m.passes[-1]
    m.passes[-1] = dataclasses.replace(last, stats=dict(last.stats) | {"budget": record})
    m.save(ck)
    _replace(ck, out, force)
