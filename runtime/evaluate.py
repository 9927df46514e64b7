"""Perplexity of a runtime artifact with exactly the protocol of compress/evaluate.py (no torch):
the corpus tokenized once without special tokens, the first ``windows`` non-overlapping windows of
``seq_len`` tokens, log-softmax in float64 over every position of each window."""
from __future__ import annotations

import numpy as np

from .corpus import BUILTIN, DEFAULT_EVAL_WINDOWS, corpus_name, eval_windows, load_text
from .scoring import PerplexityResult, combine, window_nll


def corpus_ids(engine, text_spec: str = BUILTIN) -> list[int]:
    return engine.tokenizer.encode(load_text(text_spec), add_special_tokens=False)


def perplexity(engine, text: str = BUILTIN, seq_len: int = 512, windows: int | None = DEFAULT_EVAL_WINDOWS,
               progress: bool = False, ids: list[int] | None = None) -> PerplexityResult:
    ids = corpus_ids(engine, text) if ids is None else ids
    wins = eval_windows(ids, seq_len, windows)
    bar = None
    if progress:
        from .progress import bar as make_bar

        bar = make_bar(len(wins), "perplexity")
    nll = 0.0
    try:
        for w in wins:
            logits = engine.score(w)  # [S, V]
            nll += window_nll(logits, np.asarray(w))
            if bar:
                bar.advance()
    finally:
        if bar:
            bar.close()
    return combine(nll, len(wins) * (seq_len - 1), len(wins), seq_len, corpus_name(text))
