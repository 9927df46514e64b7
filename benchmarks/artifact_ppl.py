"""Perplexity of each exported artifact against its checkpoint (the export issue's 0.1% / 0.5% bounds).

    KILN_CACHE=/tmp/kc .venv/bin/python -m benchmarks.artifact_ppl --work DIR [--schemes fp32,int8-wo,fp8,...]

For every scheme: quantize SmolLM2-135M (16 calibration windows from the end of builtin:pydoc), export the
checkpoint with `kiln export onnx` (default self-validation), then `kiln eval ppl` on the checkpoint (torch,
fake-quant) and on the artifact (runtime.Engine on ONNX Runtime CPU), 8 windows x 512 of builtin:pydoc.
Weights are rounded to nearest (GPTQ off): the bound is about the exporter and the runtime, which read the
same stored codes and scales whichever way they were chosen, and rounding keeps the run short.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILN = str(ROOT / ".venv" / "bin" / "kiln")
FAST = {"int8-wo": {"method": "rtn"}, "fp8": {}, "int8-sq": {"method": "rtn"}, "int8-dyn": {}, "int4": {"method": "rtn"}}
BOUND = {"fp32": 0.001}  # quantized schemes: 0.005


def _kiln_json(args: list[str]) -> dict:
    p = subprocess.run([KILN, *args, "--json"], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"kiln {' '.join(args)} failed: {p.stderr.strip()[-600:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="checkpoints and artifacts are written here")
    ap.add_argument("--schemes", default="fp32," + ",".join(FAST))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from compress.quant.config import config_for
    from compress.quant.entry import quantize_checkpoint

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in [x for x in args.schemes.split(",") if x]:
        ck, art = args.work / f"ck-{s}", args.work / f"art-{s}"
        t = time.perf_counter()
        if s == "fp32":
            ck = args.model
        else:
            quantize_checkpoint(args.model, config_for(s, **FAST[s]), ck, eval_windows=None, force=True)
        exp = _kiln_json(["export", "onnx", str(ck), "-o", str(art), "--force"])
        p_ck = _kiln_json(["eval", "ppl", str(ck), "--windows", str(args.windows)])["ppl"]
        p_art = _kiln_json(["eval", "ppl", str(art), "--windows", str(args.windows)])["ppl"]
        rel = p_art / p_ck - 1
        row = {"scheme": s, "checkpoint_ppl": round(p_ck, 4), "artifact_ppl": round(p_art, 4),
               "relative": round(rel, 5), "bound": BOUND.get(s, 0.005), "within": abs(rel) <= BOUND.get(s, 0.005),
               "validation": exp["validation"]["value"], "seconds": round(time.perf_counter() - t, 1)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print("| scheme | checkpoint ppl | artifact ppl | difference | bound |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scheme']} | {r['checkpoint_ppl']:.4f} | {r['artifact_ppl']:.4f} | {100 * r['relative']:+.2f}% | "
              f"{100 * r['bound']:.1f}% |")
    return 0 if all(r["within"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
