"""Real-size Llama shapes under a peak-RSS meter: the instrument for issue 14's gates.

    .venv/bin/python -m benchmarks.scale build --shape 1b --out /tmp/scale/models/1b
    .venv/bin/python -m benchmarks.scale run --shapes 1b,8b --work /tmp/scale [--steps quant-int8-rtn,...]
        [--code .] [--code today=/tmp/baseline] [--max-rss-gib 20]
    .venv/bin/python -m benchmarks.scale decode --art ART [--art ART2] --source MODEL_DIR [--work /tmp/scale]
    .venv/bin/python -m benchmarks.scale table --work /tmp/scale

build: a random Llama with the real shapes of Llama-3.2-1B / 3.2-3B / 3.1-8B (vocabulary 128256, Llama-3 rope
scaling; `tiny` for smoke runs) as a Hub-style dir: config.json, generation_config.json, bf16 shards
model-0000k-of-0000N.safetensors + index, SmolLM2's tokenizer (vocabulary 49152: rows past it are never
looked up). Streamed tensor by tensor (benchmarks/scale_build.py): building needs tens of MB.

run: for each shape, the model is built once under WORK/models/SHAPE (reused when complete), then each step
runs the `kiln` CLI as a subprocess under the meter (benchmarks/scale_meter.py: wall seconds, peak RSS of
the step and its descendants; past --max-rss-gib it is killed and recorded as such). Steps are data
(STEPS below): each has command-line variants tried in order, so a flag this code does not have yet is
recorded as "refused: <its error>" (or falls back to an equivalent spelling) instead of failing the run.
--code DIR (repeatable, `LABEL=DIR`) runs the steps with that checkout first on PYTHONPATH, so today's
revision (e.g. `git archive 8bfd788 | tar -x -C /tmp/baseline`) and the working tree are measured in one
run; each child's `compress.__file__` is checked. Results go to WORK/results.json (merged with earlier runs
by shape/code/step) and a markdown table to docs/BENCHMARKS.md between `<!-- scale:begin -->` and
`<!-- scale:end -->` when both markers exist, else to WORK/table.md (and stdout).

decode: this box's read bandwidth with 2 threads, the bytes one decode step of an artifact streams, its
decode tok/s, the ratio to the bandwidth ceiling, and llama.cpp on a GGUF of the same checkpoint
(benchmarks/scale_decode.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .scale_build import DEFAULT_SHARD_BYTES, SHAPES, Shape, build
from .scale_meter import run_measured

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"
PIPELINE_MEMORY = {"tiny": "2.5GiB", "1b": "2.5GiB", "3b": "6GiB", "8b": "6GiB"}  # the gates' budgets


@dataclass(frozen=True)
class Step:
    name: str
    kind: str  # what the scaling gate compares: rtn | gptq | export | eval | run | pipeline | build
    variants: tuple[tuple[str, ...], ...]  # kiln argv templates, first accepted wins: {model} {out} {mem}
    needs: tuple[str, ...] = ()  # paths (templates) earlier steps must have produced
    output: str | None = None  # removed before the step (fresh measurement), must exist after it
    note: str = ""  # said in the table when a later variant (fallback) ran


def _q(*scheme_args: str) -> tuple[str, ...]:
    return ("compress", "quantize", "{model}", *scheme_args)


def _run(art: str) -> tuple[str, ...]:
    """32 greedy tokens from the artifact, as JSON."""
    return ("run", art, "Hello", "--max-new-tokens", "32", "--temperature", "0", "--ignore-eos", "--threads", "2",
            "--json")


INT8, INT4, INT4R = "{out}/ckpt-int8-wo-rtn", "{out}/ckpt-int4-gptq", "{out}/ckpt-int4-rtn"
ONNX8, ONNX4, ONNX4R = "{out}/onnx-int8-wo-rtn", "{out}/onnx-int4-gptq", "{out}/onnx-int4-rtn"
STEPS = [
    Step("build", "build", ()),
    Step("quant-int8-rtn", "rtn",
         (_q("--scheme", "int8-wo", "--method", "rtn", "-o", INT8, "--eval-windows", "0"),), output=INT8),
    Step("quant-int4-gptq", "gptq",
         (_q("--scheme", "int4", "--method", "gptq", "--calib-samples", "4", "-o", INT4, "--eval-windows", "0"),
          _q("--scheme", "int4", "--method", "gptq", "--calib-windows", "4", "-o", INT4, "--eval-windows", "0"),
          _q("--scheme", "int4", "--calib-samples", "4", "-o", INT4, "--eval-windows", "0")),
         output=INT4, note="int4's default method is GPTQ"),
    Step("export-int8", "export", (("export", "onnx", INT8, "-o", ONNX8, "--max-memory", "{mem}"),
                                   ("export", "onnx", INT8, "-o", ONNX8)), needs=(INT8,), output=ONNX8),
    Step("export-int4", "export", (("export", "onnx", INT4, "-o", ONNX4, "--max-memory", "{mem}"),
                                   ("export", "onnx", INT4, "-o", ONNX4)), needs=(INT4,), output=ONNX4),
    Step("eval-int8-ckpt", "eval", (("eval", "ppl", INT8, "--windows", "2", "--json"),), needs=(INT8,)),
    Step("eval-int4-onnx", "eval", (("eval", "ppl", ONNX4, "--windows", "2", "--threads", "2", "--json"),),
         needs=(ONNX4,)),
    Step("run-int4", "run", (_run(ONNX4),), needs=(ONNX4,)),
    # int4 by round-to-nearest: the same tensors, graph and artifact size as GPTQ's, at a fraction of its time
    Step("quant-int4-rtn", "rtn",
         (_q("--scheme", "int4", "--method", "rtn", "-o", INT4R, "--eval-windows", "0"),), output=INT4R),
    Step("export-int4-rtn", "export", (("export", "onnx", INT4R, "-o", ONNX4R, "--max-memory", "{mem}"),),
         needs=(INT4R,), output=ONNX4R),
    Step("run-int4-rtn", "run", (_run(ONNX4R),), needs=(ONNX4R,)),
    Step("pipeline", "pipeline",
         (("pipeline", "{model}", "-o", "{out}/pipeline", "--no-bench", "--max-memory", "{mem}"),
          ("pipeline", "{model}", "-o", "{out}/pipeline", "--no-bench")),
         output="{out}/pipeline", note="this code has no memory budget"),
]
STEP_NAMES = [s.name for s in STEPS]


# ---- one step -------------------------------------------------------------------------------------------------
def kiln_argv() -> list[str]:
    exe = Path(sys.executable).with_name("kiln")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kiln.cli"]


def code_env(code_dir: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code_dir), os.environ.get("PYTHONPATH")]))
    return env


def probe(code_dir: Path, env: dict, cwd: Path) -> dict:
    """Where the children import llmkiln's packages from (must be code_dir: PYTHONPATH beats the editable
    install)."""
    code = ("import compress, export, kiln, runtime, json; print(json.dumps("
            "{m.__name__: m.__file__ for m in (compress, export, kiln, runtime)}))")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, check=False)
    files = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {}
    ok = bool(files) and all(Path(f).resolve().is_relative_to(code_dir.resolve()) for f in files.values())
    return {"ok": ok, "files": files, "error": None if r.returncode == 0 else r.stderr.strip()[-300:]}


def _last_line(path: Path, prefer: str = "") -> str:
    try:
        lines = [x.strip() for x in path.read_text(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
    except OSError:
        return ""
    pref = [x for x in lines if prefer and x.startswith(prefer)]
    return (pref or lines or [""])[-1][:300]


def _json_tail(path: Path) -> dict:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.startswith("{")]
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def run_step(step: Step, sub: dict, env: dict, logs: Path, limit: int, timeout_s: float) -> dict:
    """Run one step (variants in order until one is not refused by the CLI's parser) and measure it."""
    def fill(s: str) -> str:
        return s.format(**sub)

    missing = [fill(n) for n in step.needs if not Path(fill(n)).exists()]
    if missing:
        return {"status": f"skipped: {missing[0]} missing (an earlier step failed or was not run)"}
    refusals = []
    for k, variant in enumerate(step.variants):
        argv = [fill(a) for a in variant]
        if step.output:
            shutil.rmtree(fill(step.output), ignore_errors=True)
        out, err = logs / f"{step.name}.out", logs / f"{step.name}.err"
        print(f"[scale] {sub['shape']} {sub['code']} {step.name}: kiln {' '.join(argv)}", flush=True)
        load0 = os.getloadavg()[0]
        with open(out, "w") as fo, open(err, "w") as fe:
            m = run_measured(kiln_argv() + argv, env=env, cwd=sub["work"], limit_bytes=limit, timeout_s=timeout_s,
                             stdout=fo, stderr=fe)
        rec = {"argv": "kiln " + " ".join(argv), "wall_s": round(m.wall_s, 2), "cpu_s": round(m.cpu_s, 1),
               "peak_rss_gib": round(m.peak_rss_bytes / GIB, 3), "rc": m.rc, "log": str(err),
               "load": [round(load0, 2), round(os.getloadavg()[0], 2)]}  # 1-min load average before / after
        text = err.read_text(errors="replace")
        if m.rc == 2 and "Usage:" in text[:2000] and m.killed_at_bytes is None:
            refusals.append(_last_line(err, "Error:"))
            continue
        if k:
            first = [fill(x) for x in step.variants[0]]
            gone = [x for x in first if x.startswith("--") and x not in argv]
            new = [x for x in argv if x.startswith("--") and x not in first]
            rec["note"] = (f"ran without {' '.join(gone) or '-'} / with {' '.join(new) or '-'}: {step.note} "
                           f"(first spelling refused: {refusals[0]})")
        if m.killed_at_bytes is not None:
            rec["status"] = f"killed at {m.killed_at_bytes / GIB:.1f} GiB"
        elif m.timed_out:
            rec["status"] = f"timeout after {timeout_s:.0f}s"
        elif m.rc != 0:
            rec["status"] = f"failed (rc {m.rc}): {_last_line(err)}"
        elif step.output and not Path(fill(step.output)).exists():
            rec["status"] = f"failed: {fill(step.output)} not written"
        else:
            rec["status"] = "ok"
            res = _json_tail(out)
            if step.kind == "eval" and "ppl" in res:
                rec["detail"] = f"ppl {res['ppl']:.4g} on {res.get('tokens')} tokens"
            if step.kind == "pipeline":
                try:
                    rep = json.loads((Path(fill(step.output)) / "report.json").read_text())
                    rec["detail"] = "stages s: " + ", ".join(f"{x['name']} {x.get('seconds') or 0:.0f}"
                                                             for x in rep.get("stages", []))
                except (OSError, ValueError, KeyError, TypeError):
                    pass
            if step.kind == "run":
                rec["detail"] = f"{res.get('timings', {}).get('completion_tokens')} tokens, text {res.get('text', '')[:40]!r}"
                if not res.get("text", "").strip():
                    rec["status"] = "failed: no text"
        return rec
    return {"status": f"refused: {refusals[0]}", "refusals": refusals}


def run_build(shape: Shape, model: Path, seed: int, shard_bytes: int, logs: Path, limit: int) -> dict | None:
    """Build the model under the meter (in a subprocess); None when a complete build is reused."""
    from .scale_build import is_complete

    if is_complete(model, shape, seed):
        print(f"[scale] {shape.name}: reusing {model}", flush=True)
        return None
    argv = [sys.executable, "-m", "benchmarks.scale", "build", "--shape", shape.name, "--out", str(model),
            "--seed", str(seed), "--shard-bytes", str(shard_bytes)]
    with open(logs / "build.out", "w") as fo:
        m = run_measured(argv, cwd=ROOT, limit_bytes=limit, stdout=fo, stderr=subprocess.STDOUT)
    ok = m.rc == 0 and is_complete(model, shape, seed)
    return {"argv": "python -m benchmarks.scale build --shape " + shape.name, "wall_s": round(m.wall_s, 2),
            "cpu_s": round(m.cpu_s, 1),
            "peak_rss_gib": round(m.peak_rss_bytes / GIB, 3), "rc": m.rc,
            "status": "ok" if ok else f"failed (rc {m.rc}): {_last_line(logs / 'build.out')}"}


# ---- results and table ----------------------------------------------------------------------------------------
def _git_label(d: Path) -> str:
    r = subprocess.run(["git", "-C", str(d), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        return d.name
    dirty = subprocess.run(["git", "-C", str(d), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return r.stdout.strip() + ("+wt" if dirty else "")


def load_results(work: Path) -> dict:
    p = work / "results.json"
    return json.loads(p.read_text()) if p.exists() else {"runs": [], "steps": [], "decode": []}


def save_results(work: Path, res: dict) -> None:
    tmp = work / "results.json.tmp"
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, work / "results.json")


def _merge(rows: list[dict], new: dict, keys: tuple[str, ...]) -> None:
    rows[:] = [r for r in rows if any(r.get(k) != new.get(k) for k in keys)] + [new]


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def _fmt(x, nd=2) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def table(res: dict) -> str:
    from .scale_decode import decode_table

    lines = [f"Made by `{r['command']}` on {r['date']} ({r['machine']})" + ("  " if i < len(res["runs"]) - 1 else "")
             for i, r in enumerate(res["runs"][-6:])]
    lines += ["", ("Peak RSS: the step's process tree (0.2 s /proc poll of VmRSS sums and VmHWM, plus the "
                   "kernel's ru_maxrss). load: the box's 1-minute load average before / after the step (2 cores: "
                   "above ~2 other work was competing, and wall time stretches; CPU s, user + system, "
                   "stretches less). s / (param·in) is GPTQ's wall time per decoder-Linear parameter × its mean input dimension "
                   "(Σ in²·out), in 1e-12 s."), "",
              ("| shape | params | code | step | wall s | CPU s | s / B params | s / (param·in) | peak RSS GiB | load "
              "| status |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(["tiny", "1b", "3b", "8b"])}
    for r in sorted(res["steps"], key=lambda r: (order.get(r["shape"], 9), r["code"], STEP_NAMES.index(r["step"])
                                                 if r["step"] in STEP_NAMES else 99)):
        status = r["status"] + (f"; {r['detail']}" if r.get("detail") else "") + (f"; {r['note']}" if r.get("note") else "")
        lines.append(f"| {r['shape']} | {_params(r['params'])} | {r['code']} | {r['step']} | {_fmt(r.get('wall_s'), 1)} "
                     f"| {_fmt(r.get('cpu_s'), 0)} "
                     f"| {_fmt(r.get('s_per_bparam'))} | {_fmt(r.get('s_per_tparam_in'), 3)} "
                     f"| {_fmt(r.get('peak_rss_gib'))} | {'/'.join(f'{x:.1f}' for x in r.get('load', []))} "
                     f"| {status.replace('|', '/')} |")
    growth = growth_rows(res["steps"])
    if growth:
        lines += ["", "Growth from 1B to 8B (gate ≤ 1.3×): s / param for rtn, export, eval; s / (param·in) for GPTQ.",
                  "", "| code | step | 1b | 8b | 8b / 1b (wall) | 8b / 1b (CPU s) |", "|---|---|---|---|---|---|"]
        lines += growth
    if res.get("decode"):
        lines += ["", decode_table(res["decode"])]
    return "\n".join(lines) + "\n"


def growth_rows(steps: list[dict]) -> list[str]:
    by = {(r["code"], r["step"], r["shape"]): r for r in steps if r["status"] == "ok"}
    out = []
    for (code, step, shape), r in sorted(by.items()):
        big = by.get((code, step, "8b"))
        if shape != "1b" or not big or r["kind"] not in ("rtn", "gptq", "export", "eval"):
            continue
        key = "s_per_tparam_in" if r["kind"] == "gptq" else "s_per_bparam"
        cpu = (f"{(big['cpu_s'] / big['wall_s']) / (r['cpu_s'] / r['wall_s']) * big[key] / r[key]:.2f}"
               if r.get("cpu_s") and big.get("cpu_s") else "")
        out.append(f"| {code} | {step} ({key}) | {r[key]:.3f} | {big[key]:.3f} | {big[key] / r[key]:.2f} | {cpu} |")
    return out


def publish(work: Path, text: str, docs: bool = True) -> str:
    (work / "table.md").write_text(text)
    doc = ROOT / "docs" / "BENCHMARKS.md"
    body = doc.read_text() if doc.exists() else ""
    if not docs:
        print(text)
        return f"--no-docs: table written to {work / 'table.md'} only"
    if BEGIN in body and END in body and body.index(BEGIN) < body.index(END):
        head, rest = body.split(BEGIN, 1)
        doc.write_text(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])
        return f"table written to {doc} (and {work / 'table.md'})"
    print(text)
    return f"{doc} has no {BEGIN} / {END} markers: table written to {work / 'table.md'} only"


def machine() -> str:
    with open("/proc/meminfo") as f:
        mem = next((int(x.split()[1]) for x in f if x.startswith("MemTotal")), 0)
    return f"{os.cpu_count()} cores, {mem / (1 << 20):.1f} GiB RAM, load {os.getloadavg()[0]:.2f} at start"


# ---- commands -------------------------------------------------------------------------------------------------
def cmd_run(a) -> int:
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    shapes = [SHAPES[s] for s in a.shapes.split(",")]
    steps = [s for s in STEPS if s.name in (a.steps.split(",") if a.steps else STEP_NAMES)]
    codes = []
    for c in a.code or ["."]:
        label, _, d = c.rpartition("=")
        d = Path(d).resolve()
        codes.append((label or _git_label(d), d))
    limit = int(a.max_rss_gib * GIB)
    res = load_results(work)
    res["runs"].append({"command": "python -m benchmarks.scale " + " ".join(sys.argv[1:]),
                        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine()})
    for shape in shapes:
        model = work / "models" / shape.name
        base = {"shape": shape.name, "params": shape.params}
        # every step needs the model: build it (or reuse a complete build)
        logs = work / "logs" / "build" / shape.name
        logs.mkdir(parents=True, exist_ok=True)
        rec = run_build(shape, model, a.seed, a.shard_bytes, logs, limit)
        if rec is not None:
            _merge(res["steps"], {**base, "code": "builder", "step": "build", "kind": "build", **rec,
                                  "s_per_bparam": rec["wall_s"] / (shape.params / 1e9)}, ("shape", "code", "step"))
            save_results(work, res)
            if rec["status"] != "ok":
                print(f"[scale] {shape.name}: build {rec['status']}", flush=True)
                continue
        for label, code_dir in codes if any(s.kind != "build" for s in steps) else []:
            env = code_env(code_dir)
            out = work / "out" / label / shape.name
            logs = work / "logs" / label / shape.name
            out.mkdir(parents=True, exist_ok=True)
            logs.mkdir(parents=True, exist_ok=True)
            pr = probe(code_dir, env, work)
            print(f"[scale] code {label}: {pr['files'].get('compress') or pr['error']}", flush=True)
            if not pr["ok"]:
                print(f"[scale] code {label}: children do not import from {code_dir}; skipped", flush=True)
                continue
            sub = {"model": str(model), "out": str(out), "mem": PIPELINE_MEMORY[shape.name], "shape": shape.name,
                   "code": label, "work": str(work)}
            for step in steps:
                if step.kind == "build":
                    continue
                rec = {**base, "code": label, "code_dir": str(code_dir), "step": step.name, "kind": step.kind,
                       "date": time.strftime("%Y-%m-%d %H:%M"),
                       **run_step(step, sub, env, logs, limit, a.timeout_min * 60)}
                if rec["status"] == "ok":
                    rec["s_per_bparam"] = rec["wall_s"] / (shape.params / 1e9)
                    if step.kind == "gptq":
                        rec["s_per_tparam_in"] = rec["wall_s"] / (shape.gptq_work / 1e12)
                print(f"[scale] {shape.name} {label} {step.name}: {rec['status']} "
                      f"{rec.get('wall_s', '')} s, {rec.get('peak_rss_gib', '')} GiB", flush=True)
                _merge(res["steps"], rec, ("shape", "code", "step"))
                save_results(work, res)
    print(publish(work, table(res), not a.no_docs), flush=True)
    return 0


def cmd_build(a) -> int:
    build(SHAPES[a.shape], Path(a.out), seed=a.seed, shard_bytes=a.shard_bytes,
          tokenizer_dir=Path(a.tokenizer) if a.tokenizer else None, log=lambda s: print(s, flush=True))
    return 0


def cmd_table(a) -> int:
    print(publish(Path(a.work), table(load_results(Path(a.work))), not a.no_docs))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    sp = ap.add_subparsers(dest="cmd", required=True)
    b = sp.add_parser("build", help="write one random model dir")
    b.add_argument("--shape", choices=sorted(SHAPES), required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="max bytes per shard (2e9)")
    b.add_argument("--tokenizer", help="dir with tokenizer.json (default: SmolLM2's from the llmkiln cache)")
    r = sp.add_parser("run", help="build + run the steps under the meter, write results and the table")
    r.add_argument("--shapes", default="1b")
    r.add_argument("--work", default="/tmp/scale")
    r.add_argument("--steps", default="", help=f"comma-separated subset of: {','.join(STEP_NAMES)}")
    r.add_argument("--code", action="append", help="[LABEL=]DIR of a checkout to run the steps with "
                                                   "(repeatable; default: this checkout)")
    r.add_argument("--max-rss-gib", type=float, default=20.0, help="kill a step past this RSS")
    r.add_argument("--timeout-min", type=float, default=180.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES)
    t = sp.add_parser("table", help="re-render the table from WORK/results.json")
    t.add_argument("--work", default="/tmp/scale")
    for p in (r, t):
        p.add_argument("--no-docs", action="store_true", help="write WORK/table.md only, not docs/BENCHMARKS.md")
    from .scale_decode import add_decode_parser

    add_decode_parser(sp)
    a = ap.parse_args(argv)
    return {"build": cmd_build, "run": cmd_run, "table": cmd_table}.get(a.cmd, lambda a: a.func(a))(a)


if __name__ == "__main__":
    sys.exit(main())
