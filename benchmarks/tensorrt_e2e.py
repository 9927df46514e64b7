"""TensorRT end to end on a GPU machine: ONNX (plain ops) -> engine -> perplexity and decode speed vs ONNX Runtime.

Needs ``llmkiln[gpu]`` and an NVIDIA GPU (H100 for FP8). One command, everything under --work:

    KILN_CACHE=/tmp/kc .venv/bin/python -m benchmarks.tensorrt_e2e --model smollm2-135m --schemes float fp8 int8-sq

Per scheme: quantize (tied lm_head kept float: ``--ignore lm_head``), ``kiln export onnx --opset 21``,
``kiln export tensorrt``, then perplexity (builtin:pydoc, 8 x 512, the project protocol) through ONNX Runtime
CPU and through the engine, and ``kiln bench`` on the engine. Prints one JSON line per scheme and a table.
Speed numbers are only meaningful on a quiet machine; run each twice and keep the second (timing cache warm).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def kiln(*args: str) -> dict:
    cmd = [sys.executable, "-m", "kiln.cli", *args, "--json"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemes", nargs="+", default=["float", "fp8", "int8-sq", "int4"])
    ap.add_argument("--work", default="/tmp/kiln-trt-e2e")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--timing-cache", default=None, help="default: WORK/timing.cache")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = a.timing_cache or str(work / "timing.cache")
    rows = []
    for scheme in a.schemes:
        src = a.model
        if scheme != "float":
            src = str(work / f"ckpt-{scheme}")
            kiln("compress", "quantize", a.model, "--scheme", scheme, "--ignore", "lm_head", "-o", src, "--force")
        onnx_dir, eng_dir = work / f"onnx-{scheme}", work / f"engine-{scheme}"
        kiln("export", "onnx", src, "-o", str(onnx_dir), "--opset", "21", "--force")
        build = kiln("export", "tensorrt", str(onnx_dir), "-o", str(eng_dir), "--timing-cache", cache, "--force")
        ppl_ort = kiln("eval", "ppl", str(onnx_dir), "--windows", str(a.windows))
        ppl_trt = kiln("eval", "ppl", str(eng_dir), "--windows", str(a.windows))
        bench = kiln("bench", str(eng_dir))
        row = {"scheme": scheme, "ppl_onnxruntime": ppl_ort["ppl"], "ppl_tensorrt": ppl_trt["ppl"],
               "build_seconds": build["engine"]["build"]["seconds"], "gpu": build["engine"]["gpu_name"],
               "tensorrt": build["engine"]["tensorrt_version"], "bench": bench}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"{'scheme':10} {'ppl ORT':>10} {'ppl TRT':>10} {'build s':>8}")
    for r in rows:
        print(f"{r['scheme']:10} {r['ppl_onnxruntime']:10.4f} {r['ppl_tensorrt']:10.4f} {r['build_seconds']:8.1f}")


if __name__ == "__main__":
    main()
