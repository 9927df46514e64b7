"""SmoothQuant migration and static activation scale search (pure tensor functions on calibration samples).

For a group of Linears reading the same input X [R, in] with concatenated weights W [out, in]:
  s = amax_x^alpha / amax_w^(1 - alpha)    (per input channel, GQA-tied for o_proj)
  X' = X / s  (folded into the op producing X),  W' = W * s   so that X' W'^T == X W^T.
alpha (or no smoothing) and the activation clip are chosen to minimize the group's output error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import primitives as P

EPS = 1e-5


def quantize_weight(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, per-channel scale) of w [out, in] for int8 or fp8, scale from the row max."""
    if fmt == "int8":
        s = P.int8_weight_scale(w)
        return P.quantize_int8(w, s), s
    if fmt == "fp8":
        s = P.fp8_weight_scale(w)
        return P.quantize_fp8(w, s), s
    raise ValueError(fmt)


def fake_act(x: torch.Tensor, act: str, scale: torch.Tensor | None) -> torch.Tensor:
    if act == "int8-dyn":
        return P.fake_quant_int8_dynamic(x)
    return P.ACT_FAKE_QUANT[act](x, scale)


def smooth_factors(amax_x: torch.Tensor, amax_w: torch.Tensor, alpha: float, repeat: int = 1,
                   head_dim: int = 0) -> torch.Tensor:
    """Per input channel factor [in]. With repeat > 1 (o_proj under GQA) channels of query heads sharing a KV
    head get one factor, so it can be folded into the v_proj rows."""
    ax, aw = amax_x.clamp(min=EPS), amax_w.clamp(min=EPS)
    if repeat > 1:
        ax, aw = (_kv_reduce(t, repeat, head_dim) for t in (ax, aw))
    s = (ax.pow(alpha) / aw.pow(1.0 - alpha)).clamp(min=EPS)
    return kv_expand(s, repeat, head_dim) if repeat > 1 else s


def _kv_reduce(t: torch.Tensor, repeat: int, head_dim: int) -> torch.Tensor:
    # t: [kv * repeat * head_dim] (query-head order) -> [kv * head_dim], max over the heads sharing a KV head
    return t.reshape(-1, repeat, head_dim).amax(dim=1).reshape(-1)


def kv_expand(s_kv: torch.Tensor, repeat: int, head_dim: int) -> torch.Tensor:
    # [kv * head_dim] -> [kv * repeat * head_dim]
    return s_kv.reshape(-1, 1, head_dim).expand(-1, repeat, head_dim).reshape(-1)


def kv_part(s: torch.Tensor, repeat: int, head_dim: int) -> torch.Tensor:
    """The [kv * head_dim] factors of an expanded (GQA-tied) factor vector."""
    return s.reshape(-1, repeat, head_dim)[:, 0].reshape(-1) if repeat > 1 else s


@dataclass
class Choice:
    alpha: float | None  # None: no smoothing
    clip: float
    smooth: torch.Tensor | None  # [in]
    input_scale: torch.Tensor | None  # [] (static schemes)
    err: float  # relative output MSE on the sample
    base_err: float  # the same for alpha=None, clip=1 (reference point)


def _clip_scale(x_amax: float, xs: torch.Tensor, wq: torch.Tensor, act: str, clips) -> tuple[float, torch.Tensor]:
    """Best static clip by the diagonal estimate sum_c |dx_c|^2 |w_c|^2 of the output error."""
    col = (wq * wq).sum(dim=0)  # [in]
    best = None
    for c in clips:
        sc = P.static_scale(x_amax * c, act)
        d = fake_act(xs, act, sc) - xs
        e = float(((d * d).sum(dim=0) * col).sum())
        if best is None or e < best[0]:
            best = (e, c, sc)
    return best[1], best[2]


def search(x: torch.Tensor, amax_x: torch.Tensor, w: torch.Tensor, weight_fmt: str, act: str, alphas, clips,
           smooth: bool = True, repeat: int = 1, head_dim: int = 0, headroom: float = 1.0) -> Choice:
    """Choose smoothing alpha and activation clip for one group.  x: [R, in] sample, amax_x: [in] over all
    calibration tokens, w: [out, in] the group's concatenated float weights."""
    y_ref = x @ w.T  # [R, out]
    denom = float((y_ref * y_ref).mean()) or 1.0
    amax_w = w.abs().amax(dim=0)
    cands = [None] + (list(alphas) if smooth else [])
    best, base = None, None
    for a in cands:
        s = None if a is None else smooth_factors(amax_x, amax_w, a, repeat, head_dim)
        xs, ws, ax = (x, w, amax_x) if s is None else (x / s, w * s, amax_x / s)
        codes, wsc = quantize_weight(ws, weight_fmt)
        wq = P.dequantize(codes, wsc)
        if act == "int8-dyn":
            clip, sc = 1.0, None
        else:
            clip, sc = _clip_scale(float(ax.max()) * headroom, xs, wq, act, clips)
        y = fake_act(xs, act, sc) @ wq.T
        err = float(((y - y_ref) ** 2).mean()) / denom
        if a is None:
            if act == "int8-dyn":
                base = err
            else:
                yb = fake_act(xs, act, P.static_scale(float(ax.max()) * headroom, act)) @ wq.T
                base = float(((yb - y_ref) ** 2).mean()) / denom
        if best is None or err < best.err:
            best = Choice(a, clip, s, sc, err, 0.0)
    best.base_err = base
    return best
