"""Does the runtime need ONNX Runtime's private binding objects (runtime/backends/ort_binding.py)?

    python -m benchmarks.ort_binding ART [--rounds 5] [--tokens 128] [--threads 2]

Decodes ``--tokens`` greedy tokens at batch 1 with the C++ binding objects and with the public IOBinding API,
alternating, and prints the median tokens/s of each and their ratio (same process, same artifact).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def decode_rate(eng, tokens: int) -> float:
    t0 = time.perf_counter()
    r = eng.generate("def fibonacci(n):", max_new_tokens=tokens, ignore_eos=True)
    return (len(r.token_ids) - 1) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("art")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from runtime import Engine

    eng = Engine.load(args.art, threads=args.threads)
    be = eng.backend
    private = (be._cdev, be._csess)
    decode_rate(eng, 16)  # warm-up
    rates = {"private": [], "public": []}
    for _ in range(args.rounds):
        for mode in ("private", "public"):
            be._cdev, be._csess = private if mode == "private" else (None, None)
            rates[mode].append(decode_rate(eng, args.tokens))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps({"artifact": args.art, "tokens": args.tokens, "rounds": args.rounds,
                      "tok_s_median": {k: round(v, 2) for k, v in med.items()},
                      "tok_s_all": {k: [round(x, 2) for x in v] for k, v in rates.items()},
                      "private_over_public": round(med["private"] / med["public"], 3)}))


if __name__ == "__main__":
    main()
