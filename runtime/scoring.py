"""Perplexity from logits, float64, one protocol for every backend (no torch)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


LSE_ROWS = 64  # rows converted to float64 at once: [64, vocab] temporaries, not [S, vocab]


def log_sum_exp(x: np.ndarray) -> np.ndarray:
    """x [n, V] (any float dtype) -> [n] log-sum-exp in float64, LSE_ROWS rows at a time (each row's result
    is the same whatever the blocking)."""
    out = np.empty(x.shape[0], dtype=np.float64)
    for i in range(0, x.shape[0], LSE_ROWS):
        r = x[i:i + LSE_ROWS].astype(np.float64)
        m = r.max(axis=-1, keepdims=True)
        out[i:i + LSE_ROWS] = m[:, 0] + np.log(np.exp(r - m).sum(axis=-1))
    return out


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Sum of -log p(ids[t+1] | ids[..t]) over a window.

    logits: [S, vocab] (any float dtype), ids: [S]. Returns the sum over S-1 predictions,
    computed with log-softmax in float64 (row blocks: at a 128k vocabulary and 512 positions, a whole-window
    float64 copy and its temporaries were about 1.6 GB).
    """
    x = np.asarray(logits[:-1])  # [S-1, V]
    target = np.asarray(ids[1:], dtype=np.int64)  # [S-1]
    picked = x[np.arange(len(target)), target].astype(np.float64)
    return float((log_sum_exp(x) - picked).sum())


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    corpus: str
    chunk: int | None = None  # artifacts: tokens fed through the KV cache per forward (None: one pass a window)

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "windows": self.windows,
                "seq_len": self.seq_len, "corpus": self.corpus, **({"chunk": self.chunk} if self.chunk else {})}


def combine(nll_sum: float, tokens: int, windows: int, seq_len: int, corpus: str) -> PerplexityResult:
    mean = nll_sum / tokens
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=tokens, windows=windows,
                            seq_len=seq_len, corpus=corpus)
