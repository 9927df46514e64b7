"""GPTQ (error-compensating rounding, act-order) for INT4 (symmetric, zero point 0, static groups chosen by
weighted MSE) and INT8 per output channel, run layer by layer: each decoder layer sees the outputs of the
already-quantized layers before it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import primitives as P

GROUP_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65)


def int4_scale_search(w: torch.Tensor, group: int, h: torch.Tensor, clips=GROUP_CLIPS,
                      rows: int = 256) -> torch.Tensor:
    """Per (row, group) scale minimizing sum_j h_j (w_ij - q(w_ij))^2.  w: [out, in], h: [in] -> [out, in/group].
    Runs ``rows`` rows at a time, so every clip's trial stays in cache (the same arithmetic per element)."""
    out, inn = w.shape
    hw = h.reshape(1, inn // group, group)

    def err(wg, s):  # clamp(round(w / s)) * s - w as P.quantize_int4 / P.dequantize, in place, no int8 trip
        d = torch.clamp(torch.round(wg / s[:, :, None]), P.INT4_MIN, P.INT4_MAX).mul_(s[:, :, None]).sub_(wg)
        return d.square_().mul_(hw).sum(dim=2)  # [rows, G]

    def search(wr):
        wg, base = wr.reshape(wr.shape[0], -1, group), P.int4_scale(wr, group)
        return P.pick_lowest_error((base * c, err(wg, base * c)) for c in clips)

    return torch.cat([search(w[r:r + rows]) for r in range(0, out, rows)]) if out > rows else search(w)


@dataclass
class Factor:
    """What GPTQ needs of a Hessian, computed once per group of Linears that share an input: the act-order
    permutation, the upper Cholesky factor of the damped inverse (permuted), the diagonal (for int4's scale
    search) and the dead (never active) inputs."""

    perm: torch.Tensor
    hinv: torch.Tensor  # float32 [n, n]
    diag: torch.Tensor  # float32 [n], before damping, unpermuted
    dead: torch.Tensor  # bool [n]


@torch.no_grad()
def factor(hess: torch.Tensor, damp: float = 0.01) -> Factor:
    """Factor H = E[x x^T] [in, in] (float32 or float64, consumed: the caller's tensor is modified and
    dropped). At most two [in, in] matrices are alive at once.

    GPTQ needs the upper Cholesky factor U of the damped inverse (U^T U = H^-1). With J the reversal,
    J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J) and J L^-1 J is upper triangular: one Cholesky and
    one triangular inverse, instead of a Cholesky, an inverse from it and a second Cholesky (13x faster
    in float64 at in = 2048, the same factor; tests/compress/test_quant_primitives.py)."""
    h = hess.detach()
    n = h.shape[0]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    d = torch.diag(h).clone()
    perm = torch.argsort(d, descending=True)
    rev = perm.flip(0)
    h = h[rev[:, None], rev[None, :]]  # J P H P^T J, one copy
    h.diagonal().add_(damp * torch.mean(d))
    low = torch.linalg.cholesky(h)
    del h
    eye = torch.eye(n, dtype=low.dtype, device=low.device)
    inv = torch.linalg.solve_triangular(low, eye, upper=False, out=eye)  # L^-1, in place of the identity
    del low
    hinv = inv.flip(0, 1)
    del inv
    return Factor(perm=perm, hinv=hinv.float(), diag=d.float(), dead=dead)


@torch.no_grad()
def gptq(w: torch.Tensor, hess: torch.Tensor | Factor, fmt: str = "int4", group: int = 128, damp: float = 0.01,
         block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ for w [out, in] given H = E[x x^T] [in, in] or its ``factor``.
    int4: (codes int8 [out, in] in [-8, 7], scale [out, in/group]); int8: (codes in [-127, 127], scale [out],
    or [out, in/group] with a group); fp8: (codes float8_e4m3fn, scale [out]).  Codes are exactly the primitives' rounding of the updated weights."""
    f = hess if isinstance(hess, Factor) else factor(hess.detach().double().clone(), damp)
    w = w.detach().float().clone()
    n = w.shape[1]
    zero = w == 0  # exact zeros (an earlier prune pass) stay zero: their error is compensated like any other
    w[:, f.dead] = 0.0
    grouped = fmt == "int4" or (fmt == "int8" and 0 < group < n)
    if fmt == "int4":
        scale = int4_scale_search(w, group, f.diag)
        lo, hi = P.INT4_MIN, P.INT4_MAX
    elif fmt == "int8":
        if grouped:
            scale = P.int8_group_scale(w, group)
        else:
            scale, group = P.int8_weight_scale(w)[:, None], n  # one "group" spanning the row
        lo, hi = -P.INT8_MAX, P.INT8_MAX
    else:
        scale, group = P.fp8_weight_scale(w)[:, None], n
        lo = hi = None
    perm, hinv = f.perm, f.hinv
    # Work on the transpose: one input column is one contiguous row of wt, and the rank-1 update of the
    # block's remaining columns is one in-place BLAS ger (addr_), with no temporary [out, block] product.
    wt = w[:, perm].T.contiguous()  # [in, out], permuted
    zt = zero[:, perm].T.contiguous()
    st = scale[:, perm // group].T.contiguous()  # [in, out] scale of each (permuted) column
    codes = torch.empty_like(wt)  # code values, float, [in, out]
    threads = torch.get_num_threads()
    try:
        for i1 in range(0, n, block):
            i2 = min(i1 + block, n)
            w1 = wt[i1:i2]  # a view: updated in place
            err1 = torch.empty_like(w1)
            hinv1 = hinv[i1:i2, i1:i2]
            # the column loop is thousands of small ops: on one thread, with no hand-offs between cores
            # (with two threads on a busy 2-core box it ran 4-10x slower); the block's update uses them all
            torch.set_num_threads(1)
            for i in range(i2 - i1):
                col, d, s = w1[i], hinv1[i, i], st[i1 + i]
                q = P.to_fp8(col / s).float() if lo is None else torch.clamp(torch.round(col / s), lo, hi)
                q.masked_fill_(zt[i1 + i], 0.0)
                codes[i1 + i] = q
                e = err1[i]
                torch.div(col - q * s, d, out=e)
                if i + 1 < i2 - i1:
                    w1[i + 1:].addr_(hinv1[i, i + 1:], e, alpha=-1.0)
            torch.set_num_threads(threads)
            if i2 < n:
                wt[i2:].addmm_(hinv[i1:i2, i2:].T, err1, alpha=-1.0)
    finally:
        torch.set_num_threads(threads)
    codes = codes.T
    inv = torch.argsort(perm)
    codes = codes[:, inv].to(P.FP8 if fmt == "fp8" else torch.int8).contiguous()
    return codes, (scale if grouped else scale[:, 0].contiguous())


class HessianAccumulator:
    """H = mean over tokens of x x^T for one Linear input, filled by a forward pre-hook. float32 by default:
    float64 doubles the memory of the biggest matrices (a 14336-input down_proj: 1.6 GB) for no code that the
    tests see change beyond round-off (tests/compress/test_quant_primitives.py)."""

    def __init__(self, n: int, dtype=torch.float32):
        self.n, self.dtype = n, dtype
        self.h = None  # made on the device of the first input
        self.tokens = 0

    def __call__(self, _mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [T, in]
        if self.h is None:
            with torch.inference_mode(False):  # a normal tensor, so it can be divided in place later
                self.h = torch.zeros(self.n, self.n, dtype=self.dtype, device=x.device)
        self.h.addmm_(x.T.to(self.h.dtype), x.to(self.h.dtype))
        self.tokens += x.shape[0]

    def get(self) -> torch.Tensor:
        """The mean (the accumulator's own matrix, divided in place)."""
        if self.h is None:
            return torch.zeros(self.n, self.n, dtype=self.dtype)
        return self.h.div_(max(self.tokens, 1))


class HeadFactor:
    """GPTQ's factor for the lm_head, made when the quant stream after the last decoder layer passes by (the
    sequential runner's ``last`` callback): the Hessian of the head's input, the final ``norm`` of that stream
    (every calibration position), mean x x^T in float32. ``factor`` stays None until then."""

    def __init__(self, norm, hidden: int, damp: float):
        self.norm, self.hidden, self.damp = norm, hidden, damp
        self.factor: Factor | None = None

    def __call__(self, stream) -> None:
        acc = HessianAccumulator(self.hidden)
        with torch.inference_mode():
            for h, _ in stream:
                acc(None, (self.norm(h),))
        self.factor = factor(acc.get(), self.damp)

    @staticmethod
    def wanted(config, head: bool) -> bool:
        """Whether a pass of ``config`` that quantizes the head (``head``) takes it by GPTQ."""
        return head and config.needs_calibration and getattr(config, "gptq_head", False)
