"""Pruning gate table: perplexity ratio to the dense model on builtin:pydoc and a held-out English text,
parameters, size on disk and (with --speed) decode tokens/s on ONNX Runtime CPU.

    KILN_CACHE=/tmp/kc .venv/bin/python -m benchmarks.prune_gates                  # every row, quality only
    KILN_CACHE=/tmp/kc .venv/bin/python -m benchmarks.prune_gates --rows sparsegpt-50,wanda-50
    KILN_CACHE=/tmp/kc .venv/bin/python -m benchmarks.prune_gates --speed          # + tokens/s (quiet machine!)

Calibration and distillation read windows from the END of builtin:pydoc; perplexity reads the first 8 x 512
tokens of each corpus, so the two never overlap. The held-out text is benchmarks/corpora.py (CPython's IDLE
guide, README, HISTORY and license), never used for calibration. Speed needs export.onnx.export_onnx and
runtime.Engine: each pruned checkpoint is exported (fp32, portable form) and decoded at batch 1 (prompt 32,
128 new tokens, median of 3 runs), the ratio taken to the dense model exported the same way in the same run.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

DENSE_PPL = 14.7046  # SmolLM2-135M fp32 on builtin:pydoc, 8 x 512

# name -> (config factory, distill? (True: Recover()'s steps; an int: that many steps), gate or None)
def _rows():
    from compress.prune import NM, Depth, Magnitude, SparseGPT, StructuredWidth, Wanda

    return {
        "magnitude-50": (lambda: Magnitude(0.5), False, None),
        "wanda-50": (lambda: Wanda(0.5), False, 1.6),
        "wanda-50+kd": (lambda: Wanda(0.5), True, 1.6),
        "sparsegpt-50": (lambda: SparseGPT(0.5), False, 1.4),
        "sparsegpt-50+kd": (lambda: SparseGPT(0.5), True, 1.4),
        "magnitude-2:4": (lambda: Magnitude(NM(2, 4)), False, None),
        "wanda-2:4": (lambda: Wanda(NM(2, 4)), False, 3.0),
        "sparsegpt-2:4": (lambda: SparseGPT(NM(2, 4)), False, 3.0),
        "sparsegpt-2:4+kd": (lambda: SparseGPT(NM(2, 4)), True, 3.0),
        "width-mlp0.25": (lambda: StructuredWidth(mlp=0.25), False, None),
        "width-mlp0.25+kd": (lambda: StructuredWidth(mlp=0.25), True, 1.25),
        "depth-4": (lambda: Depth(layers=4), False, None),
        "depth-4+kd": (lambda: Depth(layers=4), 192, 1.3),  # 64 steps: 1.284 / held-out 1.353
    }


def decode_speed(ckpt_dir: Path, work: Path, threads: int = 2, runs: int = 3) -> float | None:
    """Decode tokens/s of a checkpoint through the ONNX export and runtime.Engine; None if they are missing."""
    try:
        from export.onnx import export_onnx
        from runtime import Engine
        from runtime.bench import BenchConfig, benchmark
    except ImportError:
        return None
    art = work / (ckpt_dir.name + "-onnx")
    export_onnx(str(ckpt_dir), art, validate=False, force=True)
    with Engine.load(art, threads=threads) as eng:
        res = benchmark(eng, BenchConfig(runs=runs))
    shutil.rmtree(art, ignore_errors=True)
    return res["decode_tokens_per_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(_rows()), help="comma-separated row names")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--recover-steps", type=int, default=None, help="default: Recover()'s")
    ap.add_argument("--recover-lr", type=float, default=None)
    ap.add_argument("--recover-seq-len", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--speed", action="store_true", help="also measure decode tokens/s (needs a quiet machine)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)

    import torch

    from benchmarks.corpora import describe, heldout_english
    from compress.checkpoint import save_checkpoint, source_record
    from compress.evaluate import corpus_ids, perplexity
    from compress.loading import load_model
    from compress.prune import Recover, count_parameters, prune_
    from compress.calib import calibration_batches

    table = _rows()
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(table)}")
    kw = {k: v for k, v in (("steps", args.recover_steps), ("lr", args.recover_lr),
                            ("seq_len", args.recover_seq_len)) if v is not None}
    recover = Recover(seed=args.seed, **kw)
    held = heldout_english()
    dense, tok, info = load_model(args.model)
    ids = {"pydoc": corpus_ids(tok, "builtin:pydoc"), "heldout": corpus_ids(tok, str(held))}

    def ppl(m):
        return {k: perplexity(m, tok, text="builtin:pydoc" if k == "pydoc" else str(held), windows=args.windows,
                              ids=v).ppl for k, v in ids.items()}

    calib = calibration_batches(tok, "builtin:pydoc", args.calib_samples, args.calib_seq_len)
    kd_wins = {}
    work = Path(tempfile.mkdtemp(prefix="prune-gates-"))
    rows = []
    try:
        def finish(name, m, extra):
            out = work / name.replace(":", "of").replace("+", "-")
            man = save_checkpoint(m, tok, out, source=source_record(info), passes=extra.get("passes", []))
            nz = sum(int(p.count_nonzero()) for p in {id(p): p for p in m.parameters()}.values())
            row = {"row": name, **extra, "parameters": count_parameters(m), "nonzero_parameters": nz,
                   "bytes_on_disk": sum(f.size for f in man.files.values())}
            row.pop("passes", None)
            if args.speed:
                row["decode_tokens_per_s"] = decode_speed(out, work)
            shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        base = ppl(dense)
        finish("dense", dense, {"ppl": base, "seconds": round(time.perf_counter() - t0, 1)})
        for name in names:
            make, use_kd, gate = table[name]
            m = copy.deepcopy(dense)
            t0 = time.perf_counter()
            rec = None
            if use_kd:
                rec = recover if use_kd is True or args.recover_steps else dataclasses.replace(recover, steps=use_kd)
                if rec.steps not in kd_wins:
                    kd_wins[rec.steps] = calibration_batches(tok, "builtin:pydoc", rec.steps, rec.seq_len, cap=True)
            rep = prune_(m, make(), calib=calib, recover=rec, recover_data=kd_wins.get(rec.steps) if rec else None,
                         progress=True)
            secs = round(time.perf_counter() - t0, 1)
            p = ppl(m)
            ratio = {k: p[k] / base[k] for k in p}
            finish(name, m, {"ppl": p, "ratio": ratio, "gate": gate,
                             "pass": None if gate is None else all(r <= gate for r in ratio.values()), "seconds": secs,
                             "passes": [rep.to_pass()], "recover": rep.stats.get("recover")})
            del m
    finally:
        shutil.rmtree(work, ignore_errors=True)

    corpus = describe(held)
    print(f"\n{args.model} pruning gates (ppl ratio to dense; {args.windows} x 512; calibration {args.calib_samples} x "
          f"{args.calib_seq_len} from the end of builtin:pydoc; recovery {recover.to_dict()}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"held-out text: {corpus['chars']} chars, sha256 {corpus['sha256'][:12]}, Python {corpus['python']}\n")
    hdr = "| row | ppl pydoc | ratio | ppl held-out | ratio | params | non-zero | size MB | tok/s | gate | pass | s |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    dense_tps = rows[0].get("decode_tokens_per_s")
    for r in rows:
        rat = r.get("ratio", {"pydoc": 1.0, "heldout": 1.0})
        tps = r.get("decode_tokens_per_s")
        tps_s = "n/a" if tps is None else (f"{tps:.1f}" + (f" ({tps / dense_tps:.2f}x)" if dense_tps and r is not rows[0] else ""))
        print(f"| {r['row']} | {r['ppl']['pydoc']:.3f} | {rat['pydoc']:.3f} | {r['ppl']['heldout']:.3f} | "
              f"{rat['heldout']:.3f} | {r['parameters'] / 1e6:.1f}M | {r['nonzero_parameters'] / 1e6:.1f}M | "
              f"{r['bytes_on_disk'] / 2**20:.0f} | {tps_s if args.speed else '-'} | "
              f"{'' if r.get('gate') is None else '<= ' + str(r['gate'])} | "
              f"{'' if r.get('pass') is None else ('yes' if r['pass'] else 'NO')} | {r['seconds']} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "heldout": corpus, "recover": recover.to_dict(),
                                         "calib": [args.calib_samples, args.calib_seq_len]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
