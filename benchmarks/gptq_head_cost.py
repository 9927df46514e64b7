"""What GPTQ of a big lm_head costs: one block of rows at a real hidden size, extrapolated to the vocabulary.

    .venv/bin/python -m benchmarks.gptq_head_cost [--hidden 4096 --vocab 128256 --rows 8192 --fmt int8]

Random weights and a Hessian from random inputs (the time does not depend on the values): the factor once,
GPTQ of one block of ``--rows`` rows (the streamed quantizer's block, compress.quant.entry.ROWS), then the
block time scaled to ``--vocab`` rows. Llama-3.1-8B's head is 128256 x 4096. Prints one line.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from compress.quant.entry import ROWS
from compress.quant.gptq import factor, gptq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--fmt", default="int8", choices=["int8", "int4"])
    a = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(8192, a.hidden)
    t = time.perf_counter()
    f = factor(x.T @ x / x.shape[0], 0.01)
    tf = time.perf_counter() - t
    w = torch.randn(a.rows, a.hidden) * 0.02
    t = time.perf_counter()
    gptq(w, f, a.fmt, 128 if a.fmt == "int4" else 0)
    tb = time.perf_counter() - t
    print(f"hidden {a.hidden}, {a.fmt}, {torch.get_num_threads()} threads: Hessian + factor {tf:.1f} s; one block of "
          f"{a.rows} rows {tb:.1f} s; {a.vocab} rows {tb * a.vocab / a.rows:.0f} s (extrapolated); peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
