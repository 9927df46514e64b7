"""Float vs quantized KV cache on SmolLM2-135M (int8-wo weights), issue 16's gates for ``--kv-cache int8``:

- KV bytes per token (``backend.kv_bytes_per_token``: what the server's admission counts) and the bytes a
  cache for the streams really allocates;
- perplexity at 2k context fed through the cache 128 tokens at a time (``runtime.evaluate.perplexity(...,
  chunk=128)``, what ``kiln eval ppl ART --seq-len 2048 --chunk 128`` runs) — gate: within 0.5% of the float
  cache's;
- decode speed at 2k context, batch 1, greedy: each artifact prefilled once with a 2048-token pydoc prompt,
  then --rounds rounds of --steps decode steps, artifacts interleaved round by round so background load hits
  them alike; medians of wall and process-CPU time per token — gate: not below the float cache;
- server capacity: how many 2k-token streams (prompt + max_tokens = 2048) the server admits at once within
  --budget-mb, by the scheduler's own arithmetic (``Scheduler.kv_cost``), checked against a real allocation
  of that many rows — gate: >= 1.8x the float cache's.

    .venv/bin/python benchmarks/kv_cache.py                       # quantizes + exports into --work if missing
    .venv/bin/python benchmarks/kv_cache.py --kv int8,fp8 --windows 8 --threads 2
    .venv/bin/python benchmarks/kv_cache.py --form ort --kv int8    # the ort form: static int8 scales

The int8-wo checkpoint is ``kiln compress quantize smollm2-135m --scheme int8-wo --method rtn``; each cache
format is ``kiln export onnx CK --form FORM --kv-cache KV`` (validated against torch). Prints a markdown table and one
JSON line. The box's load average is printed beside the speed figures: on a shared 2-core machine only the
ratios of the same run mean anything.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KILN = [sys.executable, "-m", "kiln.cli"] if not (Path(sys.executable).parent / "kiln").exists() else \
    [str(Path(sys.executable).parent / "kiln")]
CTX = 2048


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def artifacts(work: Path, kvs: list[str], source: str, form: str = "portable") -> dict[str, Path]:
    ck = work / "ck"
    if not (ck / "kiln.json").exists():
        _run(KILN + ["compress", "quantize", source, "--scheme", "int8-wo", "--method", "rtn", "-o", str(ck)])
    out = {}
    for kv in ["float"] + kvs:
        art = work / (f"onnx-kv-{kv}" if form == "portable" else f"onnx-{form}-kv-{kv}")
        if not (art / "kiln.json").exists():
            _run(KILN + ["export", "onnx", str(ck), "-o", str(art), "--form", form, "--kv-cache", kv, "--json"])
        out[kv] = art
    return out


def capacity(engine, budget: int) -> dict:
    """Streams of 2048 positions the scheduler admits at once within ``budget`` bytes, and the bytes a cache of
    that many rows allocates."""
    from runtime.generate import GenerationConfig, Sequence
    from runtime.sampling import SamplingParams
    from runtime.scheduler import Scheduler

    sched = Scheduler(engine, max_batch=1 << 16, kv_budget=budget)
    try:
        cfg = GenerationConfig(max_new_tokens=256, sampling=SamplingParams(temperature=0.0))
        seq = Sequence(list(range(3, 3 + CTX - 256)), cfg, engine.tokenizer, engine.eos_ids)
        n = 0
        while sched.kv_cost([seq] * (n + 1)) <= budget:
            n += 1
        per = sched.kv_per_token
    finally:
        sched.close()
    cache = engine.backend.allocate(max(n, 1), CTX)
    real = cache.capacity_bytes
    del cache
    return {"kv_bytes_per_token": per, "streams": n, "allocated_bytes": real}


def decode_speed(engines: dict, ids: list[int], steps: int, rounds: int) -> dict:
    caches, last = {}, {}
    for kv, eng in engines.items():
        be = eng.backend
        c = be.allocate(1, CTX + steps * rounds + 1)
        for a in range(0, CTX, 256):
            e = min(a + 256, CTX)
            lg = be.forward(c, np.array([ids[a:e]]), np.ones((1, e), np.int64), np.arange(a, e)[None])
        caches[kv], last[kv] = c, int(lg[0, -1].argmax())
    wall = {kv: [] for kv in engines}
    cpu = {kv: [] for kv in engines}
    for _ in range(rounds):
        for kv, eng in engines.items():
            be, c, tok = eng.backend, caches[kv], last[kv]
            for _ in range(steps):
                t = c.length
                w0, c0 = time.perf_counter(), time.process_time()
                lg = be.forward(c, np.array([[tok]]), np.ones((1, t + 1), np.int64), np.array([[t]]))
                tok = int(lg[0, -1].argmax())
                wall[kv].append(time.perf_counter() - w0)
                cpu[kv].append(time.process_time() - c0)
            last[kv] = tok
    return {kv: {"tokens_per_s": 1.0 / statistics.median(wall[kv]), "cpu_ms_per_token": 1e3 * statistics.median(cpu[kv]),
                 "context": [CTX, caches[kv].length]} for kv in engines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/kiln-kv-bench", help="where the checkpoint and artifacts go (reused)")
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--kv", default="int8", help="quantized formats to compare with float (int8,fp8)")
    ap.add_argument("--form", choices=("portable", "ort"), default="portable",
                    help="the artifacts' form, float cache included (ort: int8 only, static scales)")
    ap.add_argument("--windows", type=int, default=4, help="2048-token windows for perplexity")
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-mb", type=int, default=1024, help="the server's --kv-budget-mb for the capacity count")
    ap.add_argument("--skip-ppl", action="store_true")
    args = ap.parse_args()

    from runtime import Engine
    from runtime.evaluate import corpus_ids, perplexity

    kvs = [k for k in args.kv.split(",") if k]
    arts = artifacts(Path(args.work), kvs, args.source, args.form)
    engines = {kv: Engine.load(a, threads=args.threads) for kv, a in arts.items()}
    load0 = os.getloadavg()
    res = {kv: {} for kv in engines}
    for kv, eng in engines.items():
        res[kv].update(capacity(eng, args.budget_mb << 20))
    ids = corpus_ids(engines["float"])
    if not args.skip_ppl:
        for kv, eng in engines.items():
            t = time.perf_counter()
            r = perplexity(eng, seq_len=CTX, windows=args.windows, ids=ids, chunk=args.chunk)
            res[kv].update(ppl=r.ppl, ppl_tokens=r.tokens, ppl_seconds=round(time.perf_counter() - t, 1))
            print(f"ppl {kv}: {r.ppl:.4f} over {r.tokens} tokens", file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    speed = decode_speed(engines, ids[:CTX], args.steps, args.rounds)
    load2 = os.getloadavg()
    for kv in engines:
        res[kv].update(speed[kv])
    f = res["float"]
    print(f"\nSmolLM2-135M int8-wo, {args.form} form, ONNX Runtime CPU, --threads {args.threads}; perplexity {args.windows} x {CTX} "
          f"pydoc fed {args.chunk} at a time; decode at {CTX}..{speed['float']['context'][1]} context, batch 1, "
          f"median of {args.steps * args.rounds} steps interleaved; capacity within --kv-budget-mb "
          f"{args.budget_mb}; load average {load0[0]:.1f} / {load1[0]:.1f} / {load2[0]:.1f} (start / before "
          f"decode / end)\n")
    print("| KV cache | bytes/token | ratio | 2k streams in budget | ratio | ppl @2k chunk 128 | ratio | "
          "decode tok/s @2k | ratio | CPU ms/token | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kv, r in res.items():
        ppl = f"{r['ppl']:.4f} | {r['ppl'] / f['ppl']:.4f}" if "ppl" in r else "- | -"
        print(f"| {kv} | {r['kv_bytes_per_token']:,} | {f['kv_bytes_per_token'] / r['kv_bytes_per_token']:.2f}x "
              f"smaller | {r['streams']} | {r['streams'] / max(f['streams'], 1):.2f}x | {ppl} | "
              f"{r['tokens_per_s']:.2f} | {r['tokens_per_s'] / f['tokens_per_s']:.3f} | {r['cpu_ms_per_token']:.1f} | "
              f"{r['cpu_ms_per_token'] / f['cpu_ms_per_token']:.3f} |")
    gates = {}
    for kv in kvs:
        r = res[kv]
        gates[kv] = {"streams_ratio>=1.8": r["streams"] >= 1.8 * f["streams"],
                     "decode_ratio>=1.0": r["tokens_per_s"] >= f["tokens_per_s"]}
        if "ppl" in r:
            gates[kv]["ppl_within_0.5%"] = abs(r["ppl"] / f["ppl"] - 1) <= 0.005
        print(f"\ngates {kv}: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in gates[kv].items()))
    print(json.dumps({"results": res, "gates": gates, "load": [load0, load1, load2], "threads": args.threads,
                      "windows": args.windows, "chunk": args.chunk, "budget_mb": args.budget_mb, "form": args.form}))


if __name__ == "__main__":
    main()
