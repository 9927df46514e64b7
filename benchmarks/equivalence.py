"""Old-vs-new equivalence on SmolLM2: perplexity of every scheme's checkpoint and artifacts, export validation,
decode speed, made by two versions of llmkiln in the same run (the gate of a refactor: "within 0.01%").

    git -C . worktree add --detach /tmp/base17 8bfd788     # the old code, outside the repo
    git -C . worktree add --detach /tmp/new17 REV          # the new code, pinned (optional, see --new-src)
    .venv/bin/python -m benchmarks.equivalence --baseline-src /tmp/base17 [--new-src /tmp/new17] --work /tmp/equiv \
        [--schemes int8-wo,int4,...] [--windows 8]

Every step is a child process of this Python: `-m kiln.cli ...` (or a `-c` script where the old CLI lacks an
option) with PYTHONPATH set to the old worktree or to this checkout first and the working directory set to
--work, so the side's packages shadow the editable install (checked once per side by printing
``compress.__file__``). Per variant, old then new: `kiln compress quantize` (its JSON has the checkpoint's
perplexity on the first --windows x 512 windows of builtin:pydoc, calibration on 16 windows from the end),
`kiln export onnx` (portable, self-validated) and, where ONNX Runtime's form takes the scheme, `--form ort`,
then `kiln eval ppl` on each artifact. Speed: `kiln bench ART --runs 3` on the int8-wo and int4 ORT-form
artifacts, old and new alternating for --bench-rounds rounds, each artifact run by the code that made it.
Also `check_onnx` (TensorRT constraints) on the fp8 portable artifacts.

--new-src defaults to this checkout; a working tree that others keep committing to (or editing) changes
under a run of an hour or more, so pin it with a worktree of one commit. Each side's revision (and whether
its tree is dirty) is recorded; checkpoints and artifacts go to WORK/<side>@<rev>/<variant>/, each step's
JSON to WORK/steps/<side>@<rev>-<step>.json and is reused on a rerun with the same revisions (delete it, or
--fresh, to redo a step; a dirty tree's steps are never reused); stdout/stderr of each step under WORK/logs/. Writes WORK/equivalence.md and WORK/equivalence.json.
Relative differences are (new - old) / old; any |rel| > 1e-4 (0.01%) is flagged.
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

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
FLAG = 1e-4

# Variant -> scheme, how each side quantizes it, whether the ORT form takes it, and what it is compared with.
# ("cli", [extra args]) runs `kiln compress quantize`; ("py", {config kwargs}) calls quantize_checkpoint with
# config_for(scheme, **kwargs) (same arguments as the CLI passes). side None: this variant has no such side.
VARIANTS = {
    "int8-wo": {"scheme": "int8-wo", "old": ("cli", []), "new": ("cli", []), "ort": True},
    "int8-wo-rtn": {
        "scheme": "int8-wo",
        "old": ("py", {"method": "rtn"}),
        "new": ("cli", ["--method", "rtn"]),
        "ort": True,
    },
    "int8-dyn": {"scheme": "int8-dyn", "old": ("cli", []), "new": ("cli", []), "ort": True},
    "int4": {"scheme": "int4", "old": ("cli", []), "new": ("cli", []), "ort": True},
    # the new fp8 / int8-sq presets keep the tied lm_head float; ignore=() is the old preset's behaviour
    "fp8": {"scheme": "fp8", "old": ("cli", []), "new": ("py", {"ignore": []}), "ort": False},
    "int8-sq": {"scheme": "int8-sq", "old": ("cli", []), "new": ("py", {"ignore": []}), "ort": False},
    # the new defaults (intended change), reported separately against the old default
    "fp8-default": {"scheme": "fp8", "old": None, "new": ("cli", []), "ort": False, "versus": "fp8"},
    "int8-sq-default": {
        "scheme": "int8-sq",
        "old": None,
        "new": ("cli", []),
        "ort": False,
        "versus": "int8-sq",
    },
}
BENCH = ("int8-wo", "int4")  # ORT-form artifacts timed old vs new

PY_QUANTIZE = """
import json, sys
from compress.quant.config import config_for
from compress.quant.entry import quantize_checkpoint
scheme, kw, out, windows = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
res = quantize_checkpoint(MODEL_ALIAS, config_for(scheme, **kw), out, eval_windows=windows or None, force=True)
print(json.dumps(res, default=str))
""".replace("MODEL_ALIAS", repr(MODEL))

PY_CHECK = """
import json, sys
from export.tensorrt.check import check_onnx
try:
    r = check_onnx(sys.argv[1])
    print(json.dumps({"passed": True, "summary": r}, default=str))
except Exception as e:
    print(json.dumps({"passed": False, "error": f"{type(e).__name__}: {e}"}))
"""

PY_WHERE = (
    "import json, compress, export, runtime, kiln; "
    "print(json.dumps({m.__name__: m.__file__ for m in (compress, export, runtime, kiln)}))"
)


class Runner:
    def __init__(self, work: Path, srcs: dict, fresh: bool):
        self.work, self.srcs, self.fresh = work, srcs, fresh
        self.revs = {side: _rev(src) for side, src in srcs.items()}
        (work / "steps").mkdir(parents=True, exist_ok=True)
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def env(self, side: str) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.srcs[side])
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def step(self, side: str, tag: str, args: list[str], cache: bool = True) -> dict:
        """Run ``python ARGS`` for ``side``; the last stdout line is its JSON. Cached under steps/ when ``cache``."""
        label = self.label(side)
        f = self.work / "steps" / f"{label}-{tag}.json"
        if cache and f.is_file() and not self.fresh and not self.revs[side].endswith("+dirty"):
            return json.loads(f.read_text())
        cmd = [sys.executable, *args]
        t0 = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {label} {tag} ...", end="", flush=True)
        p = subprocess.run(
            cmd, cwd=self.work, env=self.env(side), capture_output=True, text=True, check=False
        )
        wall = round(time.perf_counter() - t0, 1)
        log = self.work / "logs" / f"{label}-{tag}.log"
        log.write_text(
            f"$ PYTHONPATH={self.srcs[side]} {' '.join(cmd)}\n# rc {p.returncode}, {wall} s\n"
            f"--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
        )
        print(f" {wall} s (rc {p.returncode})", flush=True)
        if p.returncode:
            res = {"error": f"rc {p.returncode}: {p.stderr.strip()[-800:]}", "wall_s": wall}
        else:
            lines = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("{")]
            res = json.loads(lines[-1]) if lines else {"error": "no JSON on stdout"}
            res["wall_s"] = wall
        res["command"] = f"PYTHONPATH={self.srcs[side]} {' '.join(cmd)}"
        res["rev"] = self.revs[side]
        if cache and "error" not in res:
            f.write_text(json.dumps(res, indent=1, default=str))
        return res

    def label(self, side: str) -> str:
        return f"{side}@{self.revs[side]}"


def _rel(old, new):
    if old is None or new is None:
        return None
    return (new - old) / old


def _sha(dirpath: Path, name: str):
    try:
        return json.loads((dirpath / "kiln.json").read_text())["files"][name]["sha256"]
    except (OSError, KeyError, TypeError, ValueError):
        return None


def run_variant(r: Runner, name: str, v: dict, windows: int) -> dict:
    out = {"variant": name, "scheme": v["scheme"]}
    for side in ("old", "new"):
        how = v[side]
        if how is None:
            continue
        d = r.work / r.label(side) / name
        d.mkdir(parents=True, exist_ok=True)
        ckpt, res = d / "ckpt", {}
        if how[0] == "cli":
            q = r.step(
                side,
                f"{name}-quantize",
                [
                    "-m",
                    "kiln.cli",
                    "compress",
                    "quantize",
                    MODEL,
                    "--scheme",
                    v["scheme"],
                    *how[1],
                    "-o",
                    str(ckpt),
                    "--eval-windows",
                    str(windows),
                    "--force",
                    "--json",
                ],
            )
        else:
            q = r.step(
                side,
                f"{name}-quantize",
                ["-c", PY_QUANTIZE, v["scheme"], json.dumps(how[1]), str(ckpt), str(windows)],
            )
        res["quantize"] = q
        res["ckpt_ppl"] = (q.get("perplexity") or {}).get("ppl")
        res["ppl_float"] = (q.get("perplexity") or {}).get("ppl_float")
        res["ckpt_sha"] = _sha(ckpt, "model.safetensors")
        for form in ("portable", "ort") if v["ort"] else ("portable",):
            art = d / f"onnx-{form}"
            if "error" in q:
                res[form] = {"error": "no checkpoint"}
                continue
            e = r.step(
                side,
                f"{name}-export-{form}",
                [
                    "-m",
                    "kiln.cli",
                    "export",
                    "onnx",
                    str(ckpt),
                    "-o",
                    str(art),
                    "--form",
                    form,
                    "--force",
                    "--json",
                ],
            )
            p = (
                r.step(
                    side,
                    f"{name}-ppl-{form}",
                    ["-m", "kiln.cli", "eval", "ppl", str(art), "--windows", str(windows), "--json"],
                )
                if "error" not in e
                else {"error": "no artifact"}
            )
            val = e.get("validation") or {}
            res[form] = {
                "art": str(art),
                "export": e,
                "ppl_result": p,
                "ppl": p.get("ppl"),
                "tokens": p.get("tokens"),
                "validation": val.get("value"),
                "validation_passed": val.get("passed"),
                "greedy": f"{val.get('greedy_identical_prefix')}/{val.get('greedy_tokens')}",
                "data_sha": _sha(art, "model.onnx.data"),
            }
        out[side] = res
    if "old" in out and "new" in out:
        o, n = out["old"], out["new"]
        out["rel"] = {
            "ckpt": _rel(o["ckpt_ppl"], n["ckpt_ppl"]),
            "ppl_float": _rel(o["ppl_float"], n["ppl_float"]),
        }
        out["same_bytes"] = {"ckpt_weights": o["ckpt_sha"] is not None and o["ckpt_sha"] == n["ckpt_sha"]}
        for form in ("portable", "ort"):
            if form in o and form in n:
                out["rel"][form] = _rel(o[form].get("ppl"), n[form].get("ppl"))
                out["same_bytes"][f"{form}_data"] = o[form].get("data_sha") is not None and o[form].get(
                    "data_sha"
                ) == n[form].get("data_sha")
        out["flags"] = [k for k, x in out["rel"].items() if x is not None and abs(x) > FLAG]
    return out


def check_fp8(r: Runner, results: dict) -> list[dict]:
    """check_onnx on the fp8 portable artifacts: new default (must pass), old default (failed before)."""
    rows = []
    plan = [
        ("new", "new", "fp8-default"),
        ("new", "new", "fp8"),
        ("old", "old", "fp8"),
        ("new", "old", "fp8"),
    ]
    for code, made_by, variant in plan:
        art = r.work / r.label(made_by) / variant / "onnx-portable"
        if made_by not in results.get(variant, {}) or not art.is_dir():
            continue
        c = r.step(code, f"check-{made_by}-{variant}", ["-c", PY_CHECK, str(art)], cache=False)
        rows.append(
            {
                "artifact": f"{variant} portable made by {made_by} code",
                "checked_by": f"{code} check_onnx",
                "passed": c.get("passed"),
                "detail": c.get("error") or c.get("summary"),
            }
        )
    return rows


def _load() -> dict:
    la = Path("/proc/loadavg").read_text().split()[:3]
    return {"loadavg": [float(x) for x in la], "time": time.strftime("%H:%M:%S")}


def _top() -> str:
    try:
        return subprocess.run(
            ["top", "-bn1"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[:15]
    except OSError:
        return []


def bench(r: Runner, results: dict, rounds: int, runs: int) -> dict:
    out = {"before": {"uptime": _load(), "top": _top()}, "rows": {}}
    for name in BENCH:
        if name not in results or any("ort" not in results[name].get(s, {}) for s in ("old", "new")):
            continue
        samples = {"old": [], "new": [], "loads": []}
        for i in range(rounds):
            for side in ("old", "new"):
                art = results[name][side]["ort"]["art"]
                ld = _load()
                b = r.step(
                    side,
                    f"bench-{name}-ort-{i}",
                    ["-m", "kiln.cli", "bench", art, "--runs", str(runs), "--json"],
                    cache=False,
                )
                samples["loads"].append({"side": side, "round": i, **ld})
                samples[side].append(
                    {
                        k: b.get(k)
                        for k in ("decode_tokens_per_s", "prefill_ms", "ttft_ms", "peak_rss_mb", "error")
                    }
                )
        med = {
            s: statistics.median(x["decode_tokens_per_s"] for x in samples[s] if x.get("decode_tokens_per_s"))
            if any(x.get("decode_tokens_per_s") for x in samples[s])
            else None
            for s in ("old", "new")
        }
        pre = {
            s: statistics.median(x["prefill_ms"] for x in samples[s] if x.get("prefill_ms"))
            if any(x.get("prefill_ms") for x in samples[s])
            else None
            for s in ("old", "new")
        }
        out["rows"][name] = {
            "samples": samples,
            "decode_median": med,
            "prefill_ms_median": pre,
            "ratio_new_old": med["new"] / med["old"] if med["old"] and med["new"] else None,
        }
    out["after"] = {"uptime": _load(), "top": _top()}
    return out


def _f(x, nd=4):
    return "–" if x is None else f"{x:.{nd}f}"


def _r(x):
    if x is None:
        return "–"
    s = f"{x:+.1e}"
    return f"**{s}**" if abs(x) > FLAG else s


def markdown(doc: dict) -> str:
    res = doc["variants"]
    L = [
        f"# Old ({doc['baseline']['rev']}) vs new ({doc['new']['rev']}) on SmolLM2-135M",
        "",
        f"`{doc['command']}`",
        "",
        (
            f"Perplexity: first {doc['windows']} x 512 windows of builtin:pydoc; rel = (new - old) / old, "
            f"**bold** when |rel| > 1e-4 (0.01%). Validation: export's max |Δlogits| / logit range (old / new)."
        ),
        "",
        (
            "| variant | ckpt old | ckpt new | rel | portable old | portable new | rel | ort old | ort new | rel | "
            "valid. portable old / new | valid. ort old / new | same bytes (ckpt, portable, ort data) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, x in res.items():
        if "old" not in x or "new" not in x:
            continue
        o, n, rel, sb = x["old"], x["new"], x["rel"], x["same_bytes"]
        cells = [name, _f(o["ckpt_ppl"]), _f(n["ckpt_ppl"]), _r(rel["ckpt"])]
        for form in ("portable", "ort"):
            if form in o:
                cells += [_f(o[form].get("ppl"), 5), _f(n[form].get("ppl"), 5), _r(rel.get(form))]
            else:
                cells += ["–", "–", "–"]
        for form in ("portable", "ort"):
            cells.append(
                f"{_f(o[form].get('validation'), 6)} / {_f(n[form].get('validation'), 6)}"
                if form in o
                else "–"
            )
        cells.append(
            ", ".join(
                "yes" if sb.get(k) else "no" for k in ("ckpt_weights", "portable_data", "ort_data") if k in sb
            )
        )
        L.append("| " + " | ".join(cells) + " |")
    L += [
        "",
        "New defaults (intended change: tied lm_head kept float), against the old default:",
        "",
        "| variant | ckpt new | vs old default | portable new | vs old default | valid. portable new |",
        "|---|---|---|---|---|---|",
    ]
    for name, x in res.items():
        if "old" in x or "new" not in x:
            continue
        n, old = x["new"], res.get(VARIANTS[name].get("versus", ""), {}).get("old", {})
        L.append(
            f"| {name} | {_f(n['ckpt_ppl'])} | {_r(_rel(old.get('ckpt_ppl'), n['ckpt_ppl']))} | "
            f"{_f(n['portable'].get('ppl'), 5)} | "
            f"{_r(_rel(old.get('portable', {}).get('ppl'), n['portable'].get('ppl')))} | "
            f"{_f(n['portable'].get('validation'), 6)} |"
        )
    flags = [(name, k, x["rel"][k]) for name, x in res.items() for k in x.get("flags", [])]
    L += ["", "Over 0.01%: " + ("none" if not flags else "; ".join(f"{n} {k} {v:+.2e}" for n, k, v in flags))]
    errs = [
        (name, s, k)
        for name, x in res.items()
        for s in ("old", "new")
        if s in x
        for k, st in [("quantize", x[s]["quantize"])]
        + [(f, x[s][f]) for f in ("portable", "ort") if f in x[s]]
        if "error" in st
    ]
    if errs:
        L.append("Failed steps: " + "; ".join(f"{n} {s} {k}" for n, s, k in errs) + " (see logs/)")
    if doc.get("check_onnx"):
        L += ["", "check_onnx (TensorRT constraints) on fp8 portable artifacts:", ""]
        for c in doc["check_onnx"]:
            d = c["detail"] if isinstance(c["detail"], str) else json.dumps(c["detail"], default=str)
            L.append(f"- {c['artifact']}, {c['checked_by']}: {'pass' if c['passed'] else 'FAIL'} — {d[:300]}")
    if doc.get("bench"):
        b = doc["bench"]
        L += [
            "",
            (
                f"Decode speed (`kiln bench ART --runs {doc['bench_runs']}`, ORT form, old/new alternating, "
                f"each by its own code), load average before {b['before']['uptime']['loadavg']}, "
                f"after {b['after']['uptime']['loadavg']}:"
            ),
            "",
            (
                "| artifact | decode tok/s old (median) | new (median) | new/old | samples old | samples new | "
                "prefill ms old / new |"
            ),
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in b["rows"].items():
            m, s = row["decode_median"], row["samples"]
            L.append(
                f"| {name} ort | {_f(m['old'], 1)} | {_f(m['new'], 1)} | {_f(row['ratio_new_old'], 3)} | "
                f"{', '.join(_f(x.get('decode_tokens_per_s'), 1) for x in s['old'])} | "
                f"{', '.join(_f(x.get('decode_tokens_per_s'), 1) for x in s['new'])} | "
                f"{_f(row['prefill_ms_median']['old'], 0)} / {_f(row['prefill_ms_median']['new'], 0)} |"
            )
    return "\n".join(L) + "\n"


def _rev(src: Path) -> str:
    p = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return p.stdout.strip() + ("+dirty" if dirty else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-src", type=Path, required=True, help="a git worktree of the old code")
    ap.add_argument("--new-src", type=Path, default=ROOT, help="the new code (default: this checkout)")
    ap.add_argument(
        "--work", type=Path, required=True, help="outside both checkouts; checkpoints, artifacts, logs"
    )
    ap.add_argument("--schemes", default=",".join(VARIANTS), help=f"variants, of: {', '.join(VARIANTS)}")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--bench-rounds", type=int, default=3, help="0 skips the speed runs")
    ap.add_argument("--bench-runs", type=int, default=3)
    ap.add_argument("--fresh", action="store_true", help="redo every step instead of reusing WORK/steps/")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.schemes.split(",") if s.strip()]
    unknown = [s for s in names if s not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
    base, new, work = args.baseline_src.resolve(), args.new_src.resolve(), args.work.resolve()
    for src in (base, new, ROOT):
        if work == src or src in work.parents:
            ap.error(f"--work must be outside {src} (the working directory would shadow PYTHONPATH)")
    for src in (base, new):
        if not (src / "compress" / "__init__.py").is_file():
            ap.error(f"{src} has no compress/ package: not a checkout of llmkiln")
    work.mkdir(parents=True, exist_ok=True)
    r = Runner(work, {"old": base, "new": new}, args.fresh)
    for side, rev in r.revs.items():
        if rev.endswith("+dirty"):
            print(
                f"WARNING: the {side} code ({r.srcs[side]}) has uncommitted changes; its results belong to no "
                "commit and its steps are not reused",
                flush=True,
            )

    where = {}
    for side in ("old", "new"):
        w = r.step(side, "where", ["-c", PY_WHERE], cache=False)
        bad = {
            m: f
            for m, f in w.items()
            if m in ("compress", "export", "runtime", "kiln")
            and not Path(f).resolve().is_relative_to(r.srcs[side])
        }
        if "error" in w or bad:
            raise SystemExit(f"{side} code does not shadow the install: {w}")
        where[side] = {m: w[m] for m in ("compress", "export", "runtime", "kiln")}
        print(f"  {side}: compress from {where[side]['compress']}")

    t0 = time.perf_counter()
    results = {}
    for name in names:
        results[name] = run_variant(r, name, VARIANTS[name], args.windows)
    if "fp8-default" in VARIANTS and any(n in results for n in ("fp8", "fp8-default")):
        checks = check_fp8(r, results)
    else:
        checks = []
    speed = bench(r, results, args.bench_rounds, args.bench_runs) if args.bench_rounds else None
    doc = {
        "command": " ".join([".venv/bin/python -m benchmarks.equivalence", *(argv or sys.argv[1:])]),
        "baseline": {"src": str(base), "rev": r.revs["old"]},
        "new": {"src": str(new), "rev": r.revs["new"]},
        "where": where,
        "windows": args.windows,
        "bench_runs": args.bench_runs,
        "flag_threshold": FLAG,
        "variants": results,
        "check_onnx": checks,
        "bench": speed,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    (work / "equivalence.json").write_text(json.dumps(doc, indent=1, default=str))
    md = markdown(doc)
    (work / "equivalence.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
