"""Pruning primitives against ten-line references: exact counts, N:M pattern, deterministic ties, SparseGPT."""
import math

import pytest
import torch

from compress.errors import CompressError
from compress.prune import NM, Depth, Magnitude, Recover, SparseGPT, StructuredWidth, Wanda
from compress.prune.masks import nm_mask, prune_count, row_mask, sparsegpt_prune, wanda_scores


def ref_row_mask(s, sparsity):
    keep = torch.ones_like(s, dtype=torch.bool)
    k = math.floor(sparsity * s.shape[1] + 0.5)
    for r in range(s.shape[0]):
        order = sorted(range(s.shape[1]), key=lambda j: (float(s[r, j]), j))  # ties: lower index pruned first
        keep[r, order[:k]] = False
    return keep


def ref_nm_mask(s, n, m):
    keep = torch.ones_like(s, dtype=torch.bool)
    for r in range(s.shape[0]):
        for g in range(0, s.shape[1], m):
            order = sorted(range(g, g + m), key=lambda j: (float(s[r, j]), j))
            keep[r, order[: m - n]] = False
    return keep


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.7, 0.01])
def test_row_mask_matches_reference_with_ties(sparsity):
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 4, (7, 40), generator=g).float()  # many ties
    keep = row_mask(s, sparsity)
    assert torch.equal(keep, ref_row_mask(s, sparsity))
    assert (~keep).sum(1).tolist() == [prune_count(40, sparsity)] * 7


def test_nm_mask_matches_reference_and_pattern():
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 3, (5, 32), generator=g).float()
    for n, m in [(2, 4), (1, 4), (4, 8)]:
        keep = nm_mask(s, NM(n, m))
        assert torch.equal(keep, ref_nm_mask(s, n, m))
        assert (keep.reshape(5, -1, m).sum(-1) == n).all()


def test_ties_are_deterministic():
    s = torch.ones(3, 8)
    assert row_mask(s, 0.5)[:, :4].logical_not().all() and row_mask(s, 0.5)[:, 4:].all()
    assert nm_mask(s, NM(2, 4)).tolist() == [[False, False, True, True] * 2] * 3


def test_pattern_must_divide_inputs():
    with pytest.raises(CompressError, match="multiple of 4"):
        nm_mask(torch.ones(2, 10), NM(2, 4))


def _layer_problem(seed=0, n=512, din=64, dout=32):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(din, din, generator=g) / din ** 0.5 + 0.3 * torch.eye(din)  # correlated features
    x = torch.randn(n, din, generator=g) @ mix * (torch.rand(din, generator=g) * 3 + 0.1)  # correlated inputs
    w = torch.randn(dout, din, generator=g)
    return x, w


@pytest.mark.parametrize("sparsity", [0.5, NM(2, 4)])
def test_sparsegpt_reconstructs_better_than_wanda(sparsity):
    x, w = _layer_problem()
    h = x.t() @ x
    w_sg, keep = sparsegpt_prune(w, h, sparsity, blocksize=16)
    w_wa = w * (row_mask(wanda_scores(w, (x ** 2).sum(0)), sparsity) if not isinstance(sparsity, NM)
                else nm_mask(wanda_scores(w, (x ** 2).sum(0)), sparsity))
    err_sg = ((x @ (w - w_sg).t()) ** 2).sum()
    err_wa = ((x @ (w - w_wa).t()) ** 2).sum()
    assert err_sg < 0.9 * err_wa, (float(err_sg), float(err_wa))
    assert torch.equal(w_sg == 0, ~keep)
    if isinstance(sparsity, NM):
        assert ((w_sg.reshape(32, -1, 4) == 0).sum(-1) >= 2).all()
    else:
        assert ((w_sg == 0).sum(1) == 32).all()


def test_sparsegpt_exact_counts_with_partial_blocks():
    x, w = _layer_problem(seed=2, din=40)
    _, keep = sparsegpt_prune(w, x.t() @ x, 0.3, blocksize=16)
    assert ((~keep).sum(1) == prune_count(40, 0.3)).all()


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, float("nan"), "0.5", True])
def test_bad_sparsity_is_clear(bad):
    with pytest.raises(CompressError, match="strictly between 0 and 1"):
        Wanda(sparsity=bad)


@pytest.mark.parametrize("make,msg", [
    (lambda: NM(4, 4), "0 < N < M"),
    (lambda: NM.parse("2-4"), "N:M"),
    (lambda: SparseGPT(NM(2, 4), blocksize=6), "multiple of M"),
    (lambda: StructuredWidth(), "--mlp"),
    (lambda: StructuredWidth(mlp=1.0), "fraction"),
    (lambda: StructuredWidth(kv_groups=-1), "non-negative"),
    (lambda: Depth(layers=0), "positive"),
    (lambda: Recover(steps=0), "positive"),
    (lambda: Recover(lr=5.0), "between 0 and 1"),
    (lambda: Magnitude(0.5, targets=("re:(",)), "regular expression"),
])
def test_bad_configs_are_clear(make, msg):
    with pytest.raises(CompressError, match=msg):
        make()


def test_config_serialization():
    assert Wanda(NM(2, 4)).to_dict() == {"method": "wanda", "pattern": "2:4"}
    assert SparseGPT(0.5).to_dict() == {"method": "sparsegpt", "sparsity": 0.5, "blocksize": 128, "damp": 0.01}
    assert StructuredWidth(mlp=0.25).to_dict() == {"method": "width", "mlp": 0.25, "kv_groups": 0}
    assert Depth(layers=4).to_dict() == {"method": "depth", "layers": 4}
