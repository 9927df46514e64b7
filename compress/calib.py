"""Calibration data: token windows from the END of a corpus (evaluation reads from its start).

The library owns no dataset download: callers pass a corpus spec (``builtin:pydoc``, a text or JSONL file),
token windows, or their own ``forward_loop(model)`` callable.
"""
from __future__ import annotations

from typing import Callable

from runtime.corpus import BUILTIN, EVAL_RESERVE_WINDOWS, CorpusError, calibration_windows, load_text

from .errors import CompressError

ForwardLoop = Callable[[object], None]


def calibration_batches(tokenizer, text: str = BUILTIN, samples: int = 64, seq_len: int = 512,
                        ids: list[int] | None = None, cap: bool = False):
    """``samples`` tensors of shape [1, seq_len] (int64) from the end of the corpus.

    ``ids``: the corpus already tokenized (without special tokens), to tokenize it once per process.
    ``cap``: lower ``samples`` to what fits after the evaluation windows instead of refusing.
    """
    import torch

    try:
        if ids is None:
            ids = list(tokenizer(load_text(text), add_special_tokens=False)["input_ids"])
        if cap:
            samples = max(1, min(samples, len(ids) // seq_len - EVAL_RESERVE_WINDOWS))
        wins = calibration_windows(ids, seq_len, samples)
    except CorpusError as e:
        raise CompressError(str(e)) from None
    return [torch.tensor([w], dtype=torch.long) for w in wins]


def forward_loop(batches, progress: str | None = None) -> ForwardLoop:
    """A ``forward_loop(model)`` that runs the model on each batch (no grad), with an optional progress bar."""

    def loop(model) -> None:
        import torch

        bar = None
        if progress:
            from runtime.progress import bar as make_bar

            bar = make_bar(len(batches), progress)
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b)
                if bar:
                    bar.advance()
        if bar:
            bar.close()

    return loop
