"""Issue 16's gates for ``--budget`` on SmolLM2 (one command; held-out text is never used for calibration or
the search).

    KILN_CACHE=... python -m benchmarks.budget --work /tmp/budget [--runs h100,cpu,int8-sq,rank] [--rank-groups 12]
    python -m benchmarks.budget --decode ART,ART,REF [--repeats 5]   (decode of artifacts already built)

Runs (each writes WORK/NAME and prints one JSON line; all together print a markdown table at the end):
  h100    --target h100 --formats fp8,int8-wo,float --budget 1.015: measured artifact ratio on pydoc (the
          search's own held-out windows) and on held-out English text (benchmarks.corpora); share of decoder
          Linear weights in FP8 W8A8 (gate: ratio <= 1.015 on both, >= 85% FP8).
  cpu     --target cpu --formats int4,int8-wo --budget 1.02, against the int8-wo preset's ORT-form artifact:
          ratio, artifact bytes (gate <= 0.75x), decode tok/s (gate >= 1.15x, same run, alternating).
  int8-sq --target h100 --formats int8-sq,int8-wo,float --budget 1.01: which Linears the search keeps
          float-input (int8-wo) against the int8-sq preset's fixed choice (every down_proj), both measured.
  rank    the proxy against reality: for --rank-groups input groups spread over the layers, the perplexity
          change when only that group is quantized (fp8 and int4 GPTQ, fake-quant torch model, 4 windows)
          against the proxy's prediction, with the text's labels and with labels drawn from the model: Spearman
          rank correlation and the scale (sum predicted / sum measured); and every group at once against the
          sum of the proxy over all groups (additivity).
Also reported: search time against a plain GPTQ int8-wo quantization of the same model (gate <= 3x), and the
prediction error |predicted - measured| / measured of the log-ratio (gate <= 30%).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

SOURCE = "smollm2-135m"


def artifact_ratio(art: Path, text: str, base: float, windows: int = 8) -> float:
    from runtime import Engine
    from runtime.evaluate import perplexity

    with Engine.load(art) as eng:
        return perplexity(eng, text=text, windows=windows).ppl / base


def float_ppl(text: str, windows: int = 8) -> float:
    from compress.evaluate import perplexity
    from compress.loading import load_model

    model, tok, _ = load_model(SOURCE, quiet=True)
    return perplexity(model, tok, text=text, windows=windows).ppl


def decode_rate(art: Path, tokens: int = 96) -> float:
    from runtime import Engine

    with Engine.load(art, threads=2) as eng:
        eng.generate("def f(x):", max_new_tokens=8, ignore_eos=True)
        t0 = time.perf_counter()
        r = eng.generate("def fibonacci(n):", max_new_tokens=tokens, ignore_eos=True)
        return (len(r.token_ids) - 1) / (time.perf_counter() - t0)


def compare_decode(arts: list[Path], repeats: int) -> int:
    """Decode tok/s of each artifact, one after the other, ``repeats`` rounds; medians, and each against the
    last one given (the reference)."""
    missing = [str(a) for a in arts if not (a / "kiln.json").is_file()]
    if missing or repeats < 1:
        print(f"error: {'no artifact at ' + missing[0] if missing else '--repeats must be at least 1'}",
              file=sys.stderr)
        return 2
    rates: dict[str, list[float]] = {str(a): [] for a in arts}
    for _ in range(repeats):
        for a in arts:
            rates[str(a)].append(decode_rate(a))
    ref = statistics.median(rates[str(arts[-1])])
    print(json.dumps({a: {"tok_s": round(statistics.median(v), 1), "runs": [round(x, 1) for x in v],
                          "vs_last": round(statistics.median(v) / ref, 3)} for a, v in rates.items()}))
    return 0


def search(work: Path, name: str, formats: str, target: str, budget: float) -> dict:
    from kiln.budget import quantize_budget

    t0 = time.perf_counter()
    res = quantize_budget(SOURCE, work / name, budget=budget, formats=formats, target=target, force=True)
    res["search_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den if den else 0.0


def rank_check(n: int) -> dict:
    """The proxy against measured perplexity: n groups quantized alone, then every group, in fp8 and int4 (GPTQ,
    as the quantize pass makes it), for both label choices of the proxy (compress.budget.sensitivity)."""
    import copy

    from compress.budget.sensitivity import group_scores
    from compress.calib import calibration_batches, forward_loop
    from compress.evaluate import perplexity
    from compress.loading import load_model
    from compress.quant import quantize_
    from compress.quant.calibrate import layer_groups
    from kiln.budget import format_config

    model, tok, _ = load_model(SOURCE, quiet=True)
    batches = calibration_batches(tok, samples=16)
    fmts = ("fp8", "int4")
    scores = {lab: group_scores(model, batches[:4], list(fmts), gptq=frozenset({"int4"}),
                                hessian_batches=batches[4:], labels=lab) for lab in ("data", "model")}
    groups = layer_groups(model)
    picked = [groups[round(i * (len(groups) - 1) / max(n - 1, 1))] for i in range(n)]
    base = perplexity(model, tok, windows=4).ppl

    def measure(fmt, linears) -> float:
        m = copy.deepcopy(model)
        quantize_(m, format_config(fmt, tuple(linears)), calib=forward_loop(batches))
        return math.log(perplexity(m, tok, windows=4).ppl / base)

    rows = [{"group": g.name, "format": fmt, "measured": measure(fmt, g.linears),
             "predicted": {lab: s[g.name][fmt] for lab, s in scores.items()}} for fmt in fmts for g in picked]
    out = {"spearman": {}, "scale": {}, "whole": {}}
    for fmt in fmts:
        r = [x for x in rows if x["format"] == fmt]
        meas = [x["measured"] for x in r]
        out["spearman"][fmt] = {lab: round(spearman([x["predicted"][lab] for x in r], meas), 3) for lab in scores}
        out["scale"][fmt] = {lab: round(sum(x["predicted"][lab] for x in r) / sum(meas), 3) for lab in scores}
        whole = measure(fmt, [n for g in groups for n in g.linears])
        out["whole"][fmt] = {"measured": round(whole, 5)} | {
            f"predicted_{lab}": round(sum(s[g.name][fmt] for g in groups), 5) for lab, s in scores.items()}
    return out | {"groups": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/budget")
    ap.add_argument("--runs", default="h100,cpu,int8-sq,rank")
    ap.add_argument("--rank-groups", type=int, default=12)
    ap.add_argument("--decode", metavar="ART,ART,...",
                    help="only this: decode tok/s of artifacts already built, alternating, medians of --repeats")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.decode:
        return compare_decode([Path(a) for a in args.decode.split(",")], args.repeats)
    from benchmarks.corpora import heldout_english

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    held = str(heldout_english(work / "heldout.txt"))
    base = {"pydoc": float_ppl("builtin:pydoc"), "heldout": float_ppl(held)}
    results = {"float_ppl": base}
    runs = args.runs.split(",")
    if "h100" in runs or "cpu" in runs or "int8-sq" in runs:
        from compress.quant import config_for
        from compress.quant.entry import quantize_checkpoint

        t0 = time.perf_counter()
        quantize_checkpoint(SOURCE, config_for("int8-wo"), work / "gptq-int8", eval_windows=None, force=True)
        results["gptq_seconds"] = round(time.perf_counter() - t0, 1)
    for name, formats, target, budget in (("h100", "fp8,int8-wo,float", "h100", 1.015),
                                          ("cpu", "int4,int8-wo", "cpu", 1.02),
                                          ("int8-sq", "int8-sq,int8-wo,float", "h100", 1.01)):
        if name not in runs:
            continue
        res = search(work, name, formats, target, budget)
        art = Path(res["artifact"])
        res["measured"] = {"pydoc": round(artifact_ratio(art, "builtin:pydoc", base["pydoc"]), 5),
                           "heldout": round(artifact_ratio(art, held, base["heldout"]), 5)}
        last = res["rounds"][-1]
        pred, meas = math.log(last["predicted_ratio"]), math.log(max(last["measured_ratio"], 1e-9))
        res["prediction_error"] = round(abs(pred - meas) / abs(meas), 3) if meas else None
        res["search_vs_gptq"] = round(res["search_seconds"] / results["gptq_seconds"], 2)
        from export.onnx import export_onnx

        if name == "cpu":
            ref = work / "int8-wo-ort"
            export_onnx(str(work / "gptq-int8"), ref, form="ort", validate=False, force=True)
            res["int8_wo_ratio"] = round(artifact_ratio(ref, "builtin:pydoc", base["pydoc"]), 5)
            size = lambda p: sum(f.stat().st_size for f in Path(p).rglob("*.onnx.data"))  # noqa: E731
            res["bytes_vs_int8_wo"] = round(size(art) / size(ref), 3)
            rates = {"budget": [], "int8-wo": []}
            for _ in range(3):
                rates["budget"].append(decode_rate(art))
                rates["int8-wo"].append(decode_rate(ref))
            res["decode_tok_s"] = {k: round(statistics.median(v), 1) for k, v in rates.items()}
            res["decode_vs_int8_wo"] = round(statistics.median(rates["budget"]) / statistics.median(rates["int8-wo"]), 3)
        if name == "int8-sq":
            from runtime.manifest import read_manifest

            specs = read_manifest(work / name).layer_specs()
            res["float_input_linears"] = sorted(n for n, s in specs.items() if s.quantized and s.float_input)
            preset = work / "int8-sq-preset"
            quantize_checkpoint(SOURCE, config_for("int8-sq"), preset, eval_windows=None, force=True)
            export_onnx(str(preset), work / "int8-sq-preset-onnx", validate=False, force=True)
            res["preset_measured"] = {
                "pydoc": round(artifact_ratio(work / "int8-sq-preset-onnx", "builtin:pydoc", base["pydoc"]), 5),
                "heldout": round(artifact_ratio(work / "int8-sq-preset-onnx", held, base["heldout"]), 5)}
        results[name] = res
        print(json.dumps({name: res}), flush=True)
    if "rank" in runs:
        results["rank"] = rank_check(args.rank_groups)
        print(json.dumps({"rank": {k: results["rank"][k] for k in ("spearman", "scale", "whole")}}), flush=True)
    (work / "budget.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {work / 'budget.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
