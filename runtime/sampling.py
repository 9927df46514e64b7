"""Next-token choice from one row of logits, in numpy, in the order transformers applies them:
repetition penalty -> temperature -> top-k -> top-p -> draw. Temperature 0 is greedy.

The row passed in is the backend's logits buffer for this step and is used as scratch: the penalty edits it
in place and, without top-k, it is turned into probabilities in place (no vocab-sized copies). Top-k / top-p
work on a small candidate set picked with ``argpartition`` instead of sorting the whole vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import EngineError

_NUCLEUS_CANDIDATES = 256  # top-p first looks for the nucleus among this many best tokens


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise EngineError(f"{name} must be a number, got {v!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise EngineError(f"top_k must be an integer, got {self.top_k!r}")
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise EngineError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise EngineError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


# ---- primitives ----------------------------------------------------------------------------------------
def apply_repetition_penalty_(row: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    """In place on row [V]: logits of ``seen`` token ids are divided by penalty when positive, multiplied when
    negative (the CTRL rule transformers uses)."""
    if penalty == 1.0 or seen.size == 0:
        return
    v = row[seen]
    row[seen] = np.where(v < 0, v * penalty, v / penalty)


def top_k_candidates(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits (any order)."""
    if k >= row.shape[0]:
        return np.arange(row.shape[0])
    return np.argpartition(row, row.shape[0] - k)[row.shape[0] - k:]


def nucleus(probs_desc: np.ndarray, top_p: float) -> int:
    """How many of the probabilities (sorted descending, summing to 1) the top-p rule keeps: a token stays while
    the mass strictly before it is below top_p; at least one stays."""
    if top_p >= 1.0:
        return probs_desc.shape[0]
    csum = np.cumsum(probs_desc)
    # mass strictly before token i is csum[i-1]; the count of i with csum[i-1] < top_p, plus token 0
    return min(probs_desc.shape[0], 1 + int(np.count_nonzero(csum[:-1] < top_p)))


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(probs, dtype=np.float64)
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), probs.shape[0] - 1)


def sample(row: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           seen: np.ndarray | None = None) -> int:
    """One token id from logits row [V] float32 (overwritten: pass a copy if you need it afterwards)."""
    if seen is not None:
        apply_repetition_penalty_(row, seen, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(row))
    vocab = row.shape[0]
    k = params.top_k if 0 < params.top_k < vocab else vocab
    if k < vocab:
        idx = top_k_candidates(row, k)  # [k]
        z = row[idx].astype(np.float64) / params.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        idx, p = idx[order], p[order]
    else:
        # the row becomes unnormalized probabilities in place: no vocab-sized copy
        np.subtract(row, row.max(), out=row)
        if params.temperature != 1.0:
            np.multiply(row, 1.0 / params.temperature, out=row)
        np.exp(row, out=row)
        total = float(row.sum(dtype=np.float64))
        if params.top_p >= 1.0:
            return _draw(row, rng)
        c = min(_NUCLEUS_CANDIDATES, vocab)
        idx = top_k_candidates(row, c)
        p = row[idx].astype(np.float64) / total
        if p.sum() < params.top_p and c < vocab:  # the nucleus is wider than the candidates: sort all
            idx = np.arange(vocab)
            p = row.astype(np.float64) / total
        order = np.argsort(-p, kind="stable")
        idx, p = idx[order], p[order]
    n = nucleus(p, params.top_p)
    return int(idx[_draw(p[:n], rng)])
