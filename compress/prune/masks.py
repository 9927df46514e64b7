"""Pure tensor primitives for pruning: masks, Wanda scores, SparseGPT. No modules, no disk.

Masks are boolean ``keep`` tensors shaped like the weight ``[out, in]``. Counts are exact: an unstructured
mask prunes ``prune_count(in, sparsity)`` weights of every output row; an N:M mask prunes ``m - n`` of every
``m`` consecutive input weights of every row. Ties are broken deterministically: among equal scores the
lower input index is pruned first (a stable ascending sort).
"""
from __future__ import annotations

from ..errors import CompressError
from .config import NM


def prune_count(cols: int, sparsity: float) -> int:
    """Weights pruned per row of ``cols`` inputs: sparsity * cols rounded half up."""
    return int(sparsity * cols + 0.5)


def row_mask(scores, sparsity: float):
    """keep-mask [out, in]: per row, drop the ``prune_count`` lowest scores (ties: lower index first)."""
    import torch

    rows, cols = scores.shape
    k = prune_count(cols, sparsity)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    if k:
        idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]  # [out, k]
        keep.scatter_(1, idx, False)
    return keep


def nm_mask(scores, pattern: NM):
    """keep-mask [out, in]: in each group of ``m`` consecutive inputs keep the ``n`` highest scores."""
    import torch

    rows, cols = scores.shape
    if cols % pattern.m:
        raise CompressError(f"pattern {pattern} needs the input dimension to be a multiple of {pattern.m}, "
                            f"but a weight has {cols} inputs")
    g = scores.reshape(rows, cols // pattern.m, pattern.m)  # [out, in/m, m]
    idx = torch.sort(g, dim=2, stable=True).indices[:, :, : pattern.m - pattern.n]
    keep = torch.ones_like(g, dtype=torch.bool)
    keep.scatter_(2, idx, False)
    return keep.reshape(rows, cols)


def mask_for(scores, sparsity):
    """``row_mask`` for a fraction, ``nm_mask`` for an NM pattern."""
    return nm_mask(scores, sparsity) if isinstance(sparsity, NM) else row_mask(scores, sparsity)


def check_divisible(cols: int, sparsity, name: str) -> None:
    if isinstance(sparsity, NM) and cols % sparsity.m:
        raise CompressError(f"pattern {sparsity} needs the input dimension to be a multiple of {sparsity.m}, "
                            f"but {name} has {cols} inputs")


def magnitude_scores(w):
    return w.abs().float()


def wanda_scores(w, sq_norm):
    """|W_ij| * ||X_j||_2.  w: [out, in]; sq_norm: [in], the sum over calibration tokens of x_j^2."""
    return w.abs().float() * sq_norm.float().sqrt().unsqueeze(0)


def _inverse_hessian_chol(h, damp: float):
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising the damping until it succeeds."""
    import torch

    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    diag_mean = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(h + (damp * 10 ** attempt) * diag_mean * eye)
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True).float()
        except torch.linalg.LinAlgError:
            continue
    raise CompressError("SparseGPT: the calibration Hessian is singular even with heavy damping; "
                        "use more calibration samples")


def sparsegpt_prune(w, h, sparsity, blocksize: int = 128, damp: float = 0.01):
    """SparseGPT on one weight. w: [out, in]; h: [in, in] = sum over tokens of x^T x.

    Returns (new weight [out, in] float32 with exact zeros, keep-mask [out, in]). Columns are processed
    left to right in blocks; the error of each pruned column is pushed onto the columns not yet processed
    through the inverse Hessian. Per-row counts match ``row_mask`` / ``nm_mask`` exactly: block b prunes
    ``prune_count(end_b) - prune_count(start_b)`` weights of each row, the ones with the lowest w^2 / Hinv_jj^2.
    """
    import torch

    rows, cols = w.shape
    check_divisible(cols, sparsity, "the weight")
    w = w.detach().float().clone()
    hinv = _inverse_hessian_chol(h, damp)  # [in, in] upper
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()  # [out, B]
        hinv1 = hinv[i1:i2, i1:i2]  # [B, B]
        d = torch.diagonal(hinv1)  # [B]
        err1 = torch.zeros_like(w1)
        if not isinstance(sparsity, NM):
            k = prune_count(i2, sparsity) - prune_count(i1, sparsity)
            keep1 = torch.ones_like(w1, dtype=torch.bool)
            if k:
                idx = torch.sort(w1 ** 2 / d.unsqueeze(0) ** 2, dim=1, stable=True).indices[:, :k]
                keep1.scatter_(1, idx, False)
        else:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if isinstance(sparsity, NM) and i % sparsity.m == 0:
                sc = w1[:, i:i + sparsity.m] ** 2 / d[i:i + sparsity.m].unsqueeze(0) ** 2  # [out, m]
                idx = torch.sort(sc, dim=1, stable=True).indices[:, : sparsity.m - sparsity.n]
                keep1[:, i:i + sparsity.m].scatter_(1, idx, False)
            col = w1[:, i]
            q = torch.where(keep1[:, i], col, torch.zeros_like(col))
            e = (col - q) / d[i]  # [out]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w[~keep] = 0.0
    return w, keep
