"""Accuracy gates of the quantization schemes on SmolLM2-135M (a quality benchmark, not a timed test).

    KILN_CACHE=/tmp/kc .venv/bin/python -m benchmarks.quant_gates [--schemes int8-wo,fp8,...] [--json OUT]

For each scheme: quantize the fp32 model calibrated on windows from the END of builtin:pydoc
(--calib-samples x --seq-len tokens), then perplexity on the first 8 windows x 512 of two corpora:
builtin:pydoc (evaluation reads its start, calibration its end; they never overlap) and a held-out English
text never used for calibration (benchmarks/corpora.py: CPython's IDLE guide, README, HISTORY and license).
Prints a markdown table of perplexity ratios to the fp32 model on the same corpus, with the gates.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

GATES = {"int8-wo": 1.004, "fp8": 1.015, "int8-sq": 1.03, "int8-dyn": 1.01, "int4": 1.15}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemes", default=",".join(GATES))
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import copy

    from benchmarks.corpora import describe, heldout_english
    from compress.calib import calibration_batches, forward_loop
    from compress.evaluate import corpus_ids, perplexity
    from compress.loading import load_model
    from compress.quant import config_for, quantize_

    schemes = [s for s in args.schemes.split(",") if s]
    held = heldout_english()
    corpora = {"builtin:pydoc": "builtin:pydoc", "heldout-english": str(held)}
    model, tok, _ = load_model(args.model)
    ids = {k: corpus_ids(tok, v) for k, v in corpora.items()}
    base = {k: perplexity(model, tok, seq_len=args.seq_len, windows=args.windows, ids=i).ppl for k, i in ids.items()}
    print("fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in base.items()), file=sys.stderr, flush=True)
    batches = calibration_batches(tok, "builtin:pydoc", args.calib_samples, args.seq_len)
    rows = []
    for s in schemes:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        quantize_(m, config_for(s), calib=forward_loop(batches))
        secs = time.perf_counter() - t0
        row = {"scheme": s, "gate": GATES.get(s), "quantize_seconds": round(secs, 1)}
        for k, i in ids.items():
            p = perplexity(m, tok, seq_len=args.seq_len, windows=args.windows, ids=i).ppl
            row[k] = {"ppl": round(p, 4), "ratio": round(p / base[k], 4)}
        row["pass"] = all(row[k]["ratio"] <= row["gate"] for k in ids) if row["gate"] else None
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del m
    out = {"model": args.model, "calibration": {"text": "builtin:pydoc (end)", "samples": args.calib_samples,
                                                "seq_len": args.seq_len},
           "eval": {"windows": args.windows, "seq_len": args.seq_len}, "fp32": base, "heldout": describe(held),
           "rows": rows}
    names = list(corpora)
    print(f"| scheme | gate | {' | '.join(n + ' ratio' for n in names)} | pass |")
    print("|---|---|" + "---|" * len(names) + "---|")
    print(f"| fp32 | | {' | '.join(f'{base[n]:.4f} (ppl)' for n in names)} | |")
    for r in rows:
        cells = " | ".join(f"{r[n]['ratio']:.4f}" for n in names)
        print(f"| {r['scheme']} | {r['gate']} | {cells} | {'yes' if r['pass'] else 'NO'} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if all(r["pass"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
