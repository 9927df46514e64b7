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


def perplexity_streamed(lazy, tokenizer, text: str = BUILTIN, seq_len: int = 512,
                        windows: int | None = DEFAULT_EVAL_WINDOWS, progress: bool = False,
                        ids: list[int] | None = None, head_chunk: int = 8192) -> PerplexityResult:
    """The same protocol on a ``compress.lazy.LazyModel``: the windows go through the decoder one layer at a
    time (one layer's weights in memory), then the final norm and the lm_head a block of vocabulary rows at a
    time, with the log-softmax accumulated in float64 (memory: the windows' hidden states and one block)."""
    import torch

    from .calib import forward_loop
    from .sequential import Streamed

    ids = corpus_ids(tokenizer, text) if ids is None else ids
    wins = eval_windows(ids, seq_len, windows)
    src = Streamed(lazy)
    with torch.no_grad():
        inputs = src.capture(forward_loop([torch.tensor([w], dtype=torch.long) for w in wins]))
        bar = None
        if progress:
            from runtime.progress import bar as make_bar

            bar = make_bar(src.num_layers, "perplexity (layer by layer)")
        for i in range(src.num_layers):
            layer = src.layer(i)
            inputs = [(layer(h, **kw), kw) for h, kw in inputs]
            src.release(i)
            if bar:
                bar.advance()
        if bar:
            bar.close()
        norm = lazy.norm()
        hidden = torch.cat([norm(h)[0, :-1] for h, _ in inputs]).float().cpu()  # [N, H]: every predicting position
    target = torch.tensor([t for w in wins for t in w[1:]], dtype=torch.long)
    vocab = lazy.files.shape("lm_head.weight" if lazy.has("lm_head.weight") else "model.embed_tokens.weight")[0]
    m = torch.full((hidden.shape[0],), -float("inf"), dtype=torch.float64)
    s = torch.zeros(hidden.shape[0], dtype=torch.float64)
    picked = torch.zeros(hidden.shape[0], dtype=torch.float64)
    for lo in range(0, vocab, head_chunk):
        hi = min(lo + head_chunk, vocab)
        logits = (hidden @ lazy.head_rows(lo, hi).T).double()  # [N, block] float32 products, float64 after
        new_m = torch.maximum(m, logits.max(dim=1).values)
        s = s * torch.exp(m - new_m) + torch.exp(logits - new_m[:, None]).sum(dim=1)
        m = new_m
        inside = (target >= lo) & (target < hi)
        picked[inside] = logits[inside, target[inside] - lo]
    nll = float((m + torch.log(s) - picked).sum())
    return combine(nll, len(wins) * (seq_len - 1), len(wins), seq_len, corpus_name(text))
