"""Export time: `kiln export onnx` (graph written from the weights) vs `optimum-cli export onnx` on SmolLM2-135M.

Both are run as fresh processes on the same HF dir (the alias's converted safetensors), fp32, with KV cache,
median of --repeats wall-clock runs, alternating so background load hits both alike. kiln is timed with its
default self-validation and with --no-validate; optimum with its defaults (it validates its outputs too).
optimum lives in a separate venv (/work/peers-venv, or $KILN_PEERS_VENV).

    KILN_CACHE=/tmp/kc .venv/bin/python benchmarks/export_time.py            # prints one JSON object last
    KILN_CACHE=/tmp/kc .venv/bin/python benchmarks/export_time.py --skip-peer
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_VENV = Path(os.environ.get("KILN_PEERS_VENV", "/work/peers-venv"))


def hf_dir(source: str) -> Path:
    """The HF safetensors dir both exporters read (an alias/GGUF is converted once and cached)."""
    sys.path.insert(0, str(ROOT))
    from compress.loading import load_model

    _, _, info = load_model(source, quiet=True)
    return Path(info.extra.get("converted") or info.path)


def timed(cmd: list[str], env=None) -> tuple[float, int, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t, p.returncode, (p.stderr or "")[-2000:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-peer", action="store_true", help="time kiln only")
    args = ap.parse_args()

    src = hf_dir(args.source)
    kiln = [str(ROOT / ".venv/bin/kiln"), "export", "onnx", str(src)]
    optimum = PEER_VENV / "bin" / "optimum-cli"
    run_peer = not args.skip_peer and optimum.is_file()
    runs: dict[str, list[float]] = {"kiln": [], "kiln_no_validate": []}
    if run_peer:
        runs["optimum"] = []
    errors = {}
    with tempfile.TemporaryDirectory(prefix="kiln-export-time-") as tmp:
        for r in range(args.repeats):
            jobs = [("kiln", kiln + ["-o", f"{tmp}/k{r}", "--json"]),
                    ("kiln_no_validate", kiln + ["-o", f"{tmp}/kn{r}", "--no-validate", "--json"])]
            if run_peer:
                jobs.append(("optimum", [str(optimum), "export", "onnx", "--model", str(src), "--task",
                                         "text-generation-with-past", f"{tmp}/o{r}"]))
            for name, cmd in jobs:
                secs, rc, err = timed(cmd)
                if rc != 0:
                    errors[name] = err
                    continue
                runs[name].append(secs)
            for d in Path(tmp).iterdir():
                shutil.rmtree(d, ignore_errors=True)
    med = {k: round(statistics.median(v), 2) for k, v in runs.items() if v}
    out = {"source": args.source, "hf_dir": str(src), "repeats": args.repeats, "seconds_median": med,
           "seconds_all": {k: [round(x, 2) for x in v] for k, v in runs.items()}}
    if "optimum" in med:
        out["ratio_kiln_to_optimum"] = round(med.get("kiln", float("nan")) / med["optimum"], 3)
        out["ratio_kiln_no_validate_to_optimum"] = round(med.get("kiln_no_validate", float("nan")) / med["optimum"], 3)
    elif not args.skip_peer:
        out["peer"] = f"optimum-cli not found at {optimum}; install optimum[onnxruntime] into {PEER_VENV}"
    if errors:
        out["errors"] = errors
    for k, v in med.items():
        print(f"{k:18s} {v:7.2f} s (median of {len(runs[k])})", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
