"""Perplexity from logits, float64, one protocol for every backend (no torch)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Sum of -log p(ids[t+1] | ids[..t]) over a window.

    logits: [S, vocab] (any float dtype), ids: [S]. Returns the sum over S-1 predictions,
    computed with log-softmax in float64.
    """
    x = np.asarray(logits[:-1], dtype=np.float64)  # [S-1, V]
    target = np.asarray(ids[1:], dtype=np.int64)  # [S-1]
    m = x.max(axis=-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(axis=-1)))
    picked = x[np.arange(len(target)), target]
    return float((lse - picked).sum())


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    corpus: str

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "windows": self.windows,
                "seq_len": self.seq_len, "corpus": self.corpus}


def combine(nll_sum: float, tokens: int, windows: int, seq_len: int, corpus: str) -> PerplexityResult:
    mean = nll_sum / tokens
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=tokens, windows=windows,
                            seq_len=seq_len, corpus=corpus)
