"""The generation loop: sequences, and a batch that admits new sequences while others decode.

``Batch.add(seqs)`` prefills the new prompts together (left-padded) and merges their KV rows into the running
batch right-aligned; ``Batch.step()`` decodes one token for every running row. Finished or cancelled rows
leave the cache at once and columns every remaining row masks are trimmed, so the cache stays as long as the
longest live sequence. ``Engine.generate`` and the server both drive a ``Batch``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import EngineError
from .sampling import SamplingParams, sample
from .textstream import Detokenizer, StopText


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not all(isinstance(s, str) for s in self.stop):
            raise EngineError("stop must be a list of strings")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise EngineError(f"seed must be an integer, got {self.seed!r}")


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length" | "cancelled"
    timings: dict


class Sequence:
    """One prompt being continued. ``on_text(delta)`` receives text as it becomes final (whole characters,
    stop strings cut off); the deltas concatenate to ``text``."""

    def __init__(self, prompt_ids: list[int], config: GenerationConfig, tokenizer, eos_ids,
                 on_text: Callable[[str], None] | None = None, context: int | None = None):
        if not prompt_ids:
            raise EngineError("the prompt is empty: give at least one token")
        if context is not None and len(prompt_ids) + config.max_new_tokens > context:
            raise EngineError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({config.max_new_tokens}) "
                              f"exceeds the model's context of {context} tokens")
        self.prompt = [int(t) for t in prompt_ids]
        self.config = config
        self.eos = frozenset() if config.ignore_eos else frozenset(eos_ids)
        self.on_text = on_text
        self.rng = np.random.default_rng(config.seed)
        self.detok = Detokenizer(tokenizer)
        self.stopper = StopText(config.stop)
        self.out: list[int] = []
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.cancelled = False
        self._seen = set(self.prompt) if config.sampling.repetition_penalty != 1.0 else None
        self._seen_arr: np.ndarray | None = None
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_end: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def seen(self) -> np.ndarray | None:
        if self._seen is None:
            return None
        if self._seen_arr is None:
            self._seen_arr = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))
        return self._seen_arr

    def _emit(self, s: str) -> None:
        if s:
            self.pieces.append(s)
            if self.on_text is not None:
                self.on_text(s)

    def _finish(self, reason: str) -> None:
        if reason != "cancelled" and not self.stopper.stopped:
            self._emit(self.stopper.feed(self.detok.flush()))
            if not self.stopper.stopped:
                self._emit(self.stopper.finish())
        self.finish_reason = reason
        self.t_end = time.perf_counter()

    def accept(self, tok: int) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.out.append(tok)
        if self._seen is not None and tok not in self._seen:
            self._seen.add(tok)
            self._seen_arr = None
        if tok in self.eos:
            return self._finish("stop")
        self._emit(self.stopper.feed(self.detok.push(tok)))
        if self.stopper.stopped:
            self.finish_reason, self.t_end = "stop", time.perf_counter()
        elif len(self.out) >= self.config.max_new_tokens:
            self._finish("length")

    def cancel(self) -> None:
        self.cancelled = True

    def result(self) -> Result:
        end = self.t_end or time.perf_counter()
        n = len(self.out)
        t = {"prompt_tokens": len(self.prompt), "completion_tokens": n,
             "ttft_s": None if self.t_first is None else self.t_first - self.t_submit,
             "total_s": end - self.t_submit}
        if n > 1 and self.t_first is not None and end > self.t_first:
            t["decode_tokens_per_s"] = (n - 1) / (end - self.t_first)
        return Result(self.text, list(self.out), self.finish_reason or "cancelled", t)


def _left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, length = len(prompts), max(len(p) for p in prompts)
    ids = np.zeros((n, length), dtype=np.int64)  # [n, L]
    mask = np.zeros((n, length), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = p
        mask[i, length - len(p):] = 1
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, pos


class Batch:
    """Running sequences sharing one KV cache (see the module docstring)."""

    def __init__(self, backend):
        self.backend = backend
        self.cache = None
        self.seqs: list[Sequence] = []
        self._mbuf = np.zeros((1, 64), dtype=np.int64)  # attention mask storage, reused
        self.mask = self._mbuf[:0, :0]  # [B, T]
        self.pos = np.zeros(0, dtype=np.int64)  # next position per row
        self.last = np.zeros(0, dtype=np.int64)  # last sampled token per row

    def __len__(self) -> int:
        return len(self.seqs)

    def _set_mask(self, m: np.ndarray) -> None:
        b, t = m.shape
        if self._mbuf.shape[0] < b or self._mbuf.shape[1] < t + 1:
            self._mbuf = np.zeros((max(b, self._mbuf.shape[0]), max(2 * (t + 1), self._mbuf.shape[1])),
                                  dtype=np.int64)
        self._mbuf[:b, :t] = m
        self.mask = self._mbuf[:b, :t]

    def _choose(self, logits: np.ndarray, seqs: list[Sequence]) -> list[int]:
        # logits: [n, 1, V]
        if all(s.config.sampling.greedy and s._seen is None for s in seqs):
            return np.argmax(logits[:, -1, :], axis=-1).tolist()
        return [sample(logits[i, -1], s.config.sampling, s.rng, s.seen()) for i, s in enumerate(seqs)]

    def add(self, seqs: list[Sequence]) -> None:
        """Prefill ``seqs`` together, sample their first tokens and join them to the running rows."""
        seqs = [s for s in seqs if not s.cancelled]
        if not seqs:
            return
        ids, mask, pos = _left_pad([s.prompt for s in seqs])
        # room for the prompt and the first tokens; the cache grows geometrically if a row runs longer
        longest = max(len(s.prompt) + min(s.config.max_new_tokens, 512) for s in seqs)
        cache = self.backend.allocate(len(seqs), longest)
        logits = self.backend.forward(cache, ids, mask, pos, last_only=True)  # [n, 1, V]
        for s, tok in zip(seqs, self._choose(logits, seqs)):
            s.accept(int(tok))
        if self.cache is None or not self.seqs:
            self.cache, self.seqs = cache, list(seqs)
            self._set_mask(mask)
            self.pos = np.array([len(s.prompt) for s in seqs], dtype=np.int64)
            self.last = np.array([s.out[-1] for s in seqs], dtype=np.int64)
        else:
            b, n = len(self.seqs), len(seqs)
            shift = self.cache.extend(cache)
            t = self.cache.length
            merged = np.zeros((b + n, t), dtype=np.int64)
            merged[:b, shift:] = self.mask
            merged[b:, t - mask.shape[1]:] = mask
            self._set_mask(merged)
            self.seqs += seqs
            self.pos = np.concatenate([self.pos, [len(s.prompt) for s in seqs]]).astype(np.int64)
            self.last = np.concatenate([self.last, [s.out[-1] for s in seqs]]).astype(np.int64)
        self._retire()

    def step(self) -> None:
        """Decode one token for every running row."""
        if not self.seqs:
            return
        self._retire()
        if not self.seqs:
            return
        b, t = self.mask.shape
        if t + 1 > self._mbuf.shape[1]:
            self._set_mask(np.array(self.mask))
        self._mbuf[:b, t] = 1
        self.mask = self._mbuf[:b, :t + 1]
        logits = self.backend.forward(self.cache, self.last[:, None], self.mask, self.pos[:, None])
        toks = self._choose(logits, self.seqs)
        self.pos += 1
        for i, (s, tok) in enumerate(zip(self.seqs, toks)):
            s.accept(int(tok))
            self.last[i] = tok
        self._retire()

    def _retire(self) -> None:
        for s in self.seqs:
            if s.cancelled and not s.done:
                s._finish("cancelled")
        keep = [i for i, s in enumerate(self.seqs) if not s.done]
        if len(keep) == len(self.seqs):
            return
        if not keep:
            self.seqs, self.cache = [], None
            self.mask = self._mbuf[:0, :0]
            self.pos, self.last = self.pos[:0], self.last[:0]
            return
        self.cache.select(keep)
        m = self.mask[keep]
        lead = int(np.argmax(m.any(axis=0)))  # columns no remaining row attends to
        if lead:
            self.cache.trim_left(lead)
            m = m[:, lead:]
        self._set_mask(m)
        self.seqs = [self.seqs[i] for i in keep]
        self.pos, self.last = self.pos[keep], self.last[keep]


def run_to_end(backend, seqs: list[Sequence]) -> list[Result]:
    """Generate for all ``seqs`` as one batch until each finishes."""
    batch = Batch(backend)
    batch.add(seqs)
    while len(batch):
        batch.step()
    return [s.result() for s in seqs]
