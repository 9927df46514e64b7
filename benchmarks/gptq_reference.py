"""Does the layer-sequential quantizer reproduce the whole-model path of 8bfd788 bit for bit, given that path's
GPTQ arithmetic?

    .venv/bin/python -m benchmarks.gptq_reference --scheme int4 --out /tmp/ref-int4 [--compare OLD_CKPT]

Runs ``quantize_checkpoint`` (the streamed, layer-by-layer path every command uses) with two functions swapped
for the arithmetic of 8bfd788: the Hessian accumulated per calibration window as float32 xᵀx added in float64,
and per Linear one Cholesky → cholesky_inverse → upper Cholesky in float64 with GPTQ's column loop on the
[out, block] layout. Everything else (capture, streams, layer forward, scale search, writing) is today's code.
Prints one JSON line: perplexity and, with ``--compare``, how many tensors differ from that checkpoint.

Today's arithmetic (float32 Hessian, one factorisation per group of Linears by a triangular inverse, the loop on
the transposed layout) gives other round-off, and GPTQ int4 amplifies round-off: docs/BENCHMARKS.md, "Same
results as the whole-model path".
"""
from __future__ import annotations

import argparse
import glob
import json

import numpy as np
import torch

from compress.quant import gptq as G
from compress.quant import primitives as P
from compress.quant import schemes as S


def reference_factor(hess: torch.Tensor, damp: float) -> G.Factor:
    """8bfd788's factor: float64, permuted, damped by the mean diagonal, chol -> cholesky_inverse -> chol."""
    h = hess.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    d = torch.diag(h).clone()
    perm = torch.argsort(d, descending=True)
    h = h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return G.Factor(perm=perm, hinv=hinv.float(), diag=d.float(), dead=dead)


@torch.no_grad()
def reference_gptq(w: torch.Tensor, f: G.Factor, fmt: str, group: int, block: int = 128):
    """8bfd788's column loop ([out, block] layout, explicit rank-1 updates); int4 and per-channel int8."""
    w = w.detach().float().clone()
    n = w.shape[1]
    zero = w == 0
    w[:, f.dead] = 0.0
    if fmt == "int4":
        scale, lo, hi = G.int4_scale_search(w, group, f.diag), P.INT4_MIN, P.INT4_MAX
    elif fmt == "int8" and not group:
        scale, group, lo, hi = P.int8_weight_scale(w)[:, None], n, -P.INT8_MAX, P.INT8_MAX
    else:
        raise SystemExit(f"the reference covers int4 and per-channel int8, not {fmt} / group {group}")
    perm, hinv = f.perm, f.hinv
    w, zero = w[:, perm], zero[:, perm]
    col_scale = scale[:, perm // group]
    codes = torch.zeros_like(w)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, d, s = w1[:, i], hinv1[i, i], col_scale[:, i1 + i]
            q = torch.clamp(torch.round(col / s), lo, hi).masked_fill(zero[:, i1 + i], 0.0)
            codes[:, i1 + i] = q
            e = (col - q * s) / d
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)].to(torch.int8).contiguous()
    return codes, (scale if fmt == "int4" else scale[:, 0].contiguous())


def reference_gptq_layer(job, config, names, extra=lambda n: (None, None)) -> None:
    hess = job.hessians(names, dtype=torch.float64)
    for n in [n for g in job.groups for n in g.linears if n in hess]:
        spec = S._spec(job, config, n)
        codes, s = reference_gptq(job.get_submodule(n).weight, reference_factor(hess[n], config.damp), spec.weight,
                                  spec.group_size or 0)
        S.replace_linear(job, n, codes, s, spec, *extra(n))


def reference_accumulate(self, _mod, args) -> None:
    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
    if self.h is None:
        with torch.inference_mode(False):
            self.h = torch.zeros(self.n, self.n, dtype=self.dtype, device=x.device)
    self.h += (x.T @ x).to(self.h.dtype)
    self.tokens += x.shape[0]


def _tensors(d: str) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(glob.glob(f"{d}/*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--scheme", default="int4", choices=["int4", "int8-wo"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", help="a checkpoint to compare every tensor with (e.g. 8bfd788's)")
    ap.add_argument("--eval-windows", type=int, default=8)
    a = ap.parse_args()
    from compress.quant.config import config_for
    from compress.quant.entry import quantize_checkpoint

    S.gptq_layer = reference_gptq_layer
    G.HessianAccumulator.__call__ = reference_accumulate
    res = quantize_checkpoint(a.source, config_for(a.scheme), a.out, eval_windows=a.eval_windows or None, force=True)
    row = {"scheme": a.scheme, "out": a.out, "perplexity": res.get("perplexity")}
    if a.compare:
        mine, theirs = _tensors(a.out), _tensors(a.compare)
        row["compare"] = a.compare
        row["tensors"] = len(mine)
        row["missing_or_extra"] = sorted(set(mine) ^ set(theirs))
        row["differing"] = sorted(k for k in set(mine) & set(theirs) if not np.array_equal(mine[k], theirs[k]))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
