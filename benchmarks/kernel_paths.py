"""int8-wo artifacts by kernel path: quality on both corpora and decode speed, in one run.

    .venv/bin/python -m benchmarks.kernel_paths --work /tmp/kernels [--rounds 7] [--threads 2]

Builds under --work what is missing, with kiln's own commands: the default int8-wo (GPTQ) checkpoint of
SmolLM2 with the fast kernel, the same with ``--kernel fine``, and ``--kernel fine --ignore lm_head`` (tied
table float); each exported ``--form ort``. Then ``kiln eval ppl`` (8 x 512) of fp32, each checkpoint and each
artifact on builtin:pydoc and the held-out English corpus (benchmarks/corpora.py), and decode tokens/s of
the artifacts in interleaved rounds (one generation of 64 tokens per artifact per round; medians). Prints a
markdown table; decode ratios are against the fast artifact of the same run. The gate (docs/QUANTIZATION.md):
artifact ≤ 1.004 of fp32 on both corpora at ≥ 0.9x the fast artifact's decode speed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILN = [sys.executable, "-m", "kiln.cli"]
VARIANTS = {"fast": [], "fine": ["--kernel", "fine"], "fine, lm_head float": ["--kernel", "fine", "--ignore", "lm_head"]}


def _kiln(*args) -> dict:
    r = subprocess.run(KILN + [*args, "--json"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"kiln {' '.join(args)} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _ppl(src: str, text: str) -> float:
    return _kiln("eval", "ppl", src, "--text", text, "--windows", "8")["ppl"]


def _speed(arts: dict[str, Path], rounds: int, threads: int) -> dict[str, float]:
    from runtime import Engine

    engines = {k: Engine.load(p, threads=threads) for k, p in arts.items()}
    ts: dict[str, list] = {k: [] for k in arts}
    for _ in range(rounds):
        for k, e in engines.items():
            ts[k].append(e.generate("The history of the city begins", max_new_tokens=64).timings["decode_tokens_per_s"])
    return {k: statistics.median(v) for k, v in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/kernels")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from benchmarks.corpora import heldout_english

    work = Path(a.work)
    corpora = {"pydoc": "builtin:pydoc", "English": str(heldout_english())}
    rows, arts = {}, {}
    for name, extra in VARIANTS.items():
        tag = name.replace(", ", "-").replace(" ", "-")
        ck, art = work / f"ck-{tag}", work / f"onnx-{tag}"
        if not (ck / "kiln.json").is_file():
            _kiln("compress", "quantize", a.model, "--scheme", "int8-wo", *extra, "-o", str(ck), "--eval-windows", "0",
                  "--force")
        if not (art / "kiln.json").is_file():
            _kiln("export", "onnx", str(ck), "-o", str(art), "--form", "ort", "--force")
        arts[name] = art
        rows[name] = {"ckpt": {c: _ppl(str(ck), t) for c, t in corpora.items()},
                      "artifact": {c: _ppl(str(art), t) for c, t in corpora.items()},
                      "bytes": sum(p.stat().st_size for p in art.rglob("*") if p.is_file())}
    base = {c: _ppl(a.model, t) for c, t in corpora.items()}
    speed = _speed(arts, a.rounds, a.threads)
    print(f"fp32: pydoc {base['pydoc']:.4f}, English {base['English']:.4f}; decode medians of {a.rounds} "
          f"interleaved rounds, {a.threads} threads\n")
    print("| kernel | ckpt pydoc | ckpt English | artifact pydoc | artifact English | artifact MB | decode tok/s | vs fast |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        ck = [r["ckpt"][c] / base[c] for c in corpora]
        ar = [r["artifact"][c] / base[c] for c in corpora]
        print(f"| {name} | {ck[0]:.4f} | {ck[1]:.4f} | {ar[0]:.4f} | {ar[1]:.4f} | {r['bytes'] / 1e6:.1f} | "
              f"{speed[name]:.1f} | {speed[name] / speed['fast']:.2f} |")


if __name__ == "__main__":
    main()
