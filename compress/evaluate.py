"""Perplexity of a torch model with the protocol in docs/BENCHMARKS.md (windows of seq_len, stride seq_len, float64)."""
from __future__ import annotations

import numpy as np

from runtime.corpus import BUILTIN, DEFAULT_EVAL_WINDOWS, corpus_name, eval_windows, load_text
from runtime.scoring import PerplexityResult, combine, window_nll


def corpus_ids(tokenizer, text_spec: str = BUILTIN) -> list[int]:
    """Tokenize the whole corpus once, without special tokens."""
    text = load_text(text_spec)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def perplexity(model, tokenizer, text: str = BUILTIN, seq_len: int = 512, windows: int | None = DEFAULT_EVAL_WINDOWS,
               progress: bool = False, ids: list[int] | None = None) -> PerplexityResult:
    import torch

    ids = corpus_ids(tokenizer, text) if ids is None else ids
    wins = eval_windows(ids, seq_len, windows)
    nll = 0.0
    bar = None
    if progress:
        from runtime.progress import bar as make_bar

        bar = make_bar(len(wins), "perplexity")
    with torch.inference_mode():
        for w in wins:
            x = torch.tensor([w], dtype=torch.long)
            logits = model(input_ids=x).logits[0].float().numpy()  # [S, V]
            nll += window_nll(logits, np.asarray(w))
            if bar:
                bar.advance()
    if bar:
        bar.close()
    return combine(nll, len(wins) * (seq_len - 1), len(wins), seq_len, corpus_name(text))
