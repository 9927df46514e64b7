"""Perplexity of a runtime artifact with exactly the protocol of compress/evaluate.py (no torch):
the corpus tokenized once without special tokens, the first ``windows`` non-overlapping windows of
``seq_len`` tokens, log-softmax in float64 over every position of each window.

``chunk``: feed each window through the KV cache ``chunk`` tokens at a time, so attention reads the keys and
values the cache stored (a quantized cache's codes and scales) instead of one pass over the window; None or
``seq_len`` is one pass (``Engine.score``). On a float cache every chunk gives the same perplexity within
float round-off (tests/runtime/test_kv_quant.py), so there, without a ``chunk``, a window whose float32 logits
would pass ``LOGITS_BUDGET`` is fed as many tokens at a time as fit in it (``auto_chunk``): at Llama-3's
vocabulary of 128256, one 512-token window's logits are 263 MB. A quantized cache keeps one pass unless asked,
since chunking changes what its attention reads."""
from __future__ import annotations

import dataclasses

import numpy as np

from .corpus import BUILTIN, DEFAULT_EVAL_WINDOWS, corpus_name, eval_windows, load_text
from .errors import EngineError
from .scoring import PerplexityResult, combine, window_nll

LOGITS_BUDGET = 64 << 20  # bytes of float32 logits one forward returns when perplexity picks the chunk


def corpus_ids(engine, text_spec: str = BUILTIN) -> list[int]:
    return engine.tokenizer.encode(load_text(text_spec), add_special_tokens=False)


def chunked_nll(engine, ids, chunk: int) -> float:
    """Sum of -log p over one window (``window_nll``'s S-1 predictions), the window fed ``chunk`` tokens a
    step into one cache; logits stay [chunk, vocab] at a time."""
    ids = np.asarray(ids, dtype=np.int64)
    s = len(ids)
    if not 0 < s <= engine.context_length:
        raise EngineError(f"perplexity needs windows of 1..{engine.context_length} tokens, got {s}")
    be, nll, prev = engine.backend, 0.0, None
    with engine._lock:
        cache = be.allocate(1, s)
        for a in range(0, s, chunk):
            e = min(a + chunk, s)
            out = be.forward(cache, ids[None, a:e], np.ones((1, e), np.int64), np.arange(a, e, dtype=np.int64)[None],
                             last_only=False)[0]  # [e-a, vocab]: row r predicts ids[a+r+1]
            # the previous chunk's last row predicts ids[a]; this chunk's last row waits for the next chunk
            rows = out if prev is None else np.concatenate([prev, out])
            nll += window_nll(rows, ids[a - (prev is not None):e])
            prev = np.array(out[-1:])
    return nll


def auto_chunk(engine, seq_len: int) -> int | None:
    """Tokens per forward for a window of ``seq_len``: None (one pass) unless the cache is float and the
    window's logits pass LOGITS_BUDGET."""
    io, vocab = engine.manifest.io, engine.manifest.architecture.vocab
    if io is None or io.kv_quantized or seq_len * vocab * 4 <= LOGITS_BUDGET:
        return None
    return max(1, LOGITS_BUDGET // (vocab * 4))


def perplexity(engine, text: str = BUILTIN, seq_len: int = 512, windows: int | None = DEFAULT_EVAL_WINDOWS,
               progress: bool = False, ids: list[int] | None = None, chunk: int | None = None) -> PerplexityResult:
    if chunk is not None and chunk < 1:
        raise EngineError(f"chunk must be at least 1 token, got {chunk}")
    if chunk is None:
        chunk = auto_chunk(engine, seq_len)
    ids = corpus_ids(engine, text) if ids is None else ids
    wins = eval_windows(ids, seq_len, windows)
    bar = None
    if progress:
        from .progress import bar as make_bar

        bar = make_bar(len(wins), "perplexity")
    nll = 0.0
    try:
        for w in wins:
            if chunk is None or chunk >= len(w):
                logits = engine.score(w)  # [S, V]
                nll += window_nll(logits, np.asarray(w))
            else:
                nll += chunked_nll(engine, w, chunk)
            if bar:
                bar.advance()
    finally:
        if bar:
            bar.close()
    res = combine(nll, len(wins) * (seq_len - 1), len(wins), seq_len, corpus_name(text))
    return dataclasses.replace(res, chunk=min(chunk, seq_len)) if chunk is not None and chunk < seq_len else res
