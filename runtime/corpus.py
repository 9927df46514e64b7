"""Text corpora and token windows for perplexity and calibration (no torch).

``builtin:pydoc`` is the CPython documentation text shipped with every Python:
``"\\n\\n".join(topics[k] for k in sorted(topics))`` from ``pydoc_data.topics``.
Evaluation takes windows from the start of the corpus, calibration from the end,
so the two never overlap on the same corpus.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import EngineError

BUILTIN = "builtin:pydoc"
DEFAULT_EVAL_WINDOWS = 8
# Calibration refuses to reach into the first this-many windows, the region evaluation reads.
EVAL_RESERVE_WINDOWS = 32


class CorpusError(EngineError):
    """A corpus that cannot be read or is too short for what was asked."""


def load_text(spec: str = BUILTIN) -> str:
    """Return the corpus text for ``builtin:pydoc``, a .txt/.md file, or a JSONL file with a "text" field."""
    if spec == BUILTIN:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    if spec.startswith("builtin:"):
        raise CorpusError(f"unknown builtin corpus {spec!r}; the builtin corpus is {BUILTIN}")
    path = Path(spec)
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {spec}")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CorpusError(f"{spec}: not UTF-8 text") from None
    if path.suffix == ".jsonl":
        parts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise CorpusError(f"{spec}:{n}: not valid JSON") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise CorpusError(f"{spec}:{n}: each JSONL line needs a string field 'text'")
            parts.append(rec["text"])
        raw = "\n\n".join(parts)
    if not raw.strip():
        raise CorpusError(f"{spec}: the corpus is empty")
    return raw


def corpus_name(spec: str) -> str:
    return spec if spec.startswith("builtin:") else Path(spec).name


def eval_windows(ids: list[int], seq_len: int, windows: int | None) -> list[list[int]]:
    """The first ``windows`` consecutive non-overlapping windows of ``seq_len`` tokens (None: all)."""
    if seq_len < 2:
        raise CorpusError(f"seq-len must be at least 2, got {seq_len}")
    available = len(ids) // seq_len
    if available == 0:
        raise CorpusError(f"the corpus has {len(ids)} tokens, shorter than one window of {seq_len}")
    if windows is None:
        windows = available
    if windows < 1:
        raise CorpusError(f"windows must be at least 1, got {windows}")
    if windows > available:
        raise CorpusError(
            f"asked for {windows} windows of {seq_len} tokens but the corpus has {len(ids)} tokens "
            f"({available} windows); lower --windows or supply a longer text"
        )
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(windows)]


def calibration_windows(ids: list[int], seq_len: int, samples: int,
                        reserve_windows: int = EVAL_RESERVE_WINDOWS) -> list[list[int]]:
    """``samples`` windows of ``seq_len`` tokens taken from the end of the corpus, last first.

    The first ``reserve_windows`` windows (where evaluation reads) are never used.
    """
    if samples < 1:
        raise CorpusError(f"calibration samples must be at least 1, got {samples}")
    if seq_len < 2:
        raise CorpusError(f"seq-len must be at least 2, got {seq_len}")
    need = (samples + reserve_windows) * seq_len
    if len(ids) < need:
        raise CorpusError(
            f"calibration text too short: {samples} samples of {seq_len} tokens after the {reserve_windows} "
            f"evaluation windows need {need} tokens, the corpus has {len(ids)}; "
            "supply a longer text or lower --calib-samples / --seq-len"
        )
    end = len(ids)
    return [ids[end - (k + 1) * seq_len:end - k * seq_len] for k in range(samples)]
