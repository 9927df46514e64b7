"""Log-probabilities of tokens from raw logits (the model's own distribution: before repetition penalty,
temperature, top-k or top-p), log-softmax in float64.

A ``TokenLogprob`` is one position: the token, its logprob and the ``k`` most likely tokens with theirs.
``prompt_logprobs`` scores a whole prompt in chunks, so logits never exceed [chunk, vocab] at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scoring import log_sum_exp

SCORE_CHUNK = 256  # prompt positions per forward when scoring a prompt


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


def _top(row: np.ndarray, lse: float, k: int) -> tuple[tuple[int, float], ...]:
    if k <= 0:
        return ()
    k = min(k, row.shape[0])
    idx = np.argpartition(row, row.shape[0] - k)[row.shape[0] - k:]
    idx = idx[np.lexsort((idx, -row[idx]))]  # by logit, descending; ties by id
    return tuple((int(i), float(row[i]) - lse) for i in idx)


def rows_logprobs(logits: np.ndarray, targets, k: int) -> list[TokenLogprob]:
    """logits [n, V] (float32), targets [n] token ids: each target's logprob and the top ``k`` per row."""
    lse = log_sum_exp(logits)
    return [TokenLogprob(int(t), float(logits[i, int(t)]) - float(lse[i]), _top(logits[i], float(lse[i]), k))
            for i, t in enumerate(targets)]


class RowScorer:
    """Logprob of the token a row will sample, and its top ``k``, from the raw logits before sampling edits
    them: ``before(row)`` keeps what is needed, ``after(token)`` returns the ``TokenLogprob``."""

    def __init__(self, row: np.ndarray, k: int):
        self.lse = float(log_sum_exp(row[None])[0])
        self.top = _top(row, self.lse, k)
        self.row = row.copy()  # sampling overwrites the backend's buffer

    def after(self, token: int) -> TokenLogprob:
        return TokenLogprob(int(token), float(self.row[int(token)]) - self.lse, self.top)


def prompt_logprobs(backend, ids: list[int], k: int, cache=None, chunk: int = SCORE_CHUNK):
    """Score ``ids`` from an empty cache in chunks: (entries, last_logits, cache).

    entries[0] is None (the first token has no context), entries[i] the logprob of ids[i] given ids[:i];
    last_logits [V] (a copy) predicts the token after the prompt; the cache holds the prompt's keys/values.
    """
    n = len(ids)
    arr = np.asarray(ids, dtype=np.int64)
    cache = cache if cache is not None else backend.allocate(1, n)
    entries: list[TokenLogprob | None] = [None]
    last = None
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        logits = backend.forward(cache, arr[None, c0:c1], np.ones((1, c1), dtype=np.int64),
                                 np.arange(c0, c1, dtype=np.int64)[None], last_only=False)[0]  # [c, V]
        m = min(c1, n - 1) - c0  # rows that predict a prompt token
        if m > 0:
            entries += rows_logprobs(logits[:m], arr[c0 + 1:c0 + 1 + m], k)
        if c1 == n:
            last = np.array(logits[-1])
    return entries, last, cache
