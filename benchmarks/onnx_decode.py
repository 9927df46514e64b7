"""Decode speed of ONNX artifacts on ONNX Runtime CPU, with plain onnxruntime (no llmkiln runtime in the loop).

Used to choose between the fused opset-23 graph (Attention/RotaryEmbedding/RMSNormalization) and the same math
in plain opset-21 ops, and to see what the quantized graphs cost. Artifacts are measured interleaved
(round-robin, median of --repeats) so background load hits all of them alike.

    KILN_CACHE=/tmp/kc .venv/bin/python benchmarks/onnx_decode.py                 # exports smollm2 fp32 at 21 and 23
    .venv/bin/python benchmarks/onnx_decode.py --art A --art B --threads 2        # existing artifact dirs
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _session(art: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(art / "model.onnx"), so, providers=["CPUExecutionProvider"])


def _feeds(arch, ids, past):
    B, S = ids.shape
    P = 0 if past is None else past[0].shape[2]
    f = {"input_ids": ids, "attention_mask": np.ones((B, P + S), np.int64),
         "position_ids": np.arange(P, P + S, dtype=np.int64)[None].repeat(B, 0)}
    for i in range(arch.layers):
        for j, k in enumerate(("key", "value")):
            f[f"past_key_values.{i}.{k}"] = (np.zeros((B, arch.kv_heads, 0, arch.head_dim), np.float32)
                                             if past is None else past[2 * i + j])
    return f


def decode_run(sess, arch, prompt: int, new: int) -> tuple[float, float]:
    """(prefill ms for the prompt, decode tokens/s for ``new`` greedy tokens), batch 1."""
    ids = (np.arange(prompt, dtype=np.int64)[None] * 7 + 11) % arch.vocab
    t = time.perf_counter()
    out = sess.run(None, _feeds(arch, ids, None))
    prefill = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    for _ in range(new):
        nxt = out[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        out = sess.run(None, _feeds(arch, nxt, out[1:]))
    return prefill, new / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--art", action="append", type=Path, help="artifact dir (repeatable)")
    ap.add_argument("--source", default="smollm2-135m", help="exported at opset 21 and 23 when no --art")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from runtime.manifest import read_manifest

    arts = args.art
    tmp = None
    if not arts:
        from export.onnx import export_onnx

        tmp = tempfile.TemporaryDirectory(prefix="kiln-onnx-bench-")
        arts = []
        for opset in (21, 23):
            out = Path(tmp.name) / f"opset{opset}"
            export_onnx(args.source, out, opset=opset, validate=False)
            arts.append(out)
    sessions = [(a, _session(a, args.threads), read_manifest(a).architecture) for a in arts]
    res = {str(a): {"prefill_ms": [], "tok_s": []} for a in arts}
    for s in sessions:  # warm-up
        decode_run(s[1], s[2], args.prompt, 4)
    for _ in range(args.repeats):
        for a, sess, arch in sessions:
            p, tps = decode_run(sess, arch, args.prompt, args.new)
            res[str(a)]["prefill_ms"].append(p)
            res[str(a)]["tok_s"].append(tps)
    summary = {}
    for a, _, _ in sessions:
        m = read_manifest(a)
        r = res[str(a)]
        summary[str(a)] = {"preset": m.preset(), "opset": m.io.opset,
                           "prefill_ms_median": round(statistics.median(r["prefill_ms"]), 1),
                           "decode_tok_s_median": round(statistics.median(r["tok_s"]), 1),
                           "decode_tok_s_all": [round(x, 1) for x in r["tok_s"]]}
        print(f"{a}: {m.preset()} opset {m.io.opset}: prefill {args.prompt} tok "
              f"{summary[str(a)]['prefill_ms_median']} ms, decode {summary[str(a)]['decode_tok_s_median']} tok/s",
              file=sys.stderr)
    print(json.dumps({"threads": args.threads, "prompt": args.prompt, "new": args.new, "results": summary}))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
