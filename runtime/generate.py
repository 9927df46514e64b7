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
from .logprobs import RowScorer, TokenLogprob, prompt_logprobs
from .sampling import SamplingParams, sample
from .textstream import Detokenizer, StopText


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128  # 0: only the prompt is read (with prompt_logprobs, scored)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: each generated token's logprob and its top k
    prompt_logprobs: int | None = None  # the same for every prompt token (the first gets None)

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 0:
            raise EngineError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise EngineError(f"{name} must be None or a non-negative integer, got {v!r}")
        if not all(isinstance(s, str) for s in self.stop):
            raise EngineError("stop must be a list of strings")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise EngineError(f"seed must be an integer, got {self.seed!r}")


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length" | "cancelled" | "error"
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
        self.logprobs: list[TokenLogprob] = []  # one per generated token when config.logprobs is set
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # when config.prompt_logprobs is set
        self.finish_reason: str | None = None
        self.error: str | None = None
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
        if reason not in ("cancelled", "error") and not self.stopper.stopped:
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

    def fail(self, e: BaseException | str) -> None:
        """End this sequence alone with an error (one line)."""
        if not self.done:
            self.error = " ".join(str(e).split())[:300] or type(e).__name__
            self._finish("error")

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
    """Running sequences sharing one KV cache (see the module docstring).

    A failure is kept to the sequences it belongs to: sampling or text handling that raises for one row ends
    that row with ``finish_reason == "error"``; a prefill that fails for several new rows is retried row by
    row; a decode step that fails is redone row by row from a fresh cache each (prompt + tokens so far), so
    only the rows that fail alone end with an error and the others go on.
    """

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

    def _accept(self, logits: np.ndarray, seqs: list[Sequence]) -> None:
        """Choose and accept one token per row of logits [n, 1, V]; a row that raises fails alone."""
        if all(s.config.sampling.greedy and s._seen is None and s.config.logprobs is None for s in seqs):
            toks = np.argmax(logits[:, -1, :], axis=-1).tolist()
            for s, tok in zip(seqs, toks):
                try:
                    s.accept(int(tok))
                except Exception as e:
                    s.fail(e)
            return
        for i, s in enumerate(seqs):
            try:
                row = logits[i, -1]
                scorer = RowScorer(row, s.config.logprobs) if s.config.logprobs is not None else None
                tok = sample(row, s.config.sampling, s.rng, s.seen())
                if scorer is not None:
                    s.logprobs.append(scorer.after(tok))
                s.accept(int(tok))
            except Exception as e:
                s.fail(e)

    def add(self, seqs: list[Sequence]) -> None:
        """Prefill ``seqs``, sample their first tokens and join them to the running rows."""
        seqs = [s for s in seqs if not s.cancelled and not s.done]
        plain = []
        for s in seqs:
            try:
                if s.config.prompt_logprobs is not None:
                    self._join_scored(s)
                elif s.config.max_new_tokens == 0:
                    s._finish("length")
                else:
                    plain.append(s)
            except Exception as e:
                s.fail(e)
        if plain:
            self._join_each(plain, resume=False)
        self._retire()

    def _join_each(self, seqs: list[Sequence], resume: bool) -> None:
        try:
            self._join(seqs, resume)
        except Exception as e:
            if len(seqs) == 1:
                seqs[0].fail(e)
                return
            for s in seqs:  # find the rows that fail alone (one that already took a token goes on from it)
                if s.done:
                    continue
                try:
                    self._join([s], resume or bool(s.out))
                except Exception as e1:
                    s.fail(e1)

    def _join(self, seqs: list[Sequence], resume: bool) -> None:
        """Prefill ``seqs`` in a new cache (left-padded), accept one token each and merge the rows in. With
        ``resume`` the prompt is prompt + the tokens generated so far (rebuilding rows after a failed step)."""
        prompts = [s.prompt + s.out if resume else s.prompt for s in seqs]
        ids, mask, pos = _left_pad(prompts)
        # room for the prompt and the first tokens; the cache grows geometrically if a row runs longer
        longest = max(len(p) + min(s.config.max_new_tokens - len(s.out), 512) for p, s in zip(prompts, seqs))
        cache = self.backend.allocate(len(seqs), longest)
        logits = self.backend.forward(cache, ids, mask, pos, last_only=True)  # [n, 1, V]
        self._accept(logits, seqs)
        self._merge(cache, mask, seqs, [len(p) for p in prompts])

    def _join_scored(self, s: Sequence) -> None:
        """Score the prompt of ``s`` in chunks (prompt logprobs), then sample its first token from the last
        position and merge its row in, unless it asks for no tokens."""
        k = s.config.prompt_logprobs
        cache = self.backend.allocate(1, len(s.prompt) + min(s.config.max_new_tokens, 512))
        entries, last, cache = prompt_logprobs(self.backend, s.prompt, k, cache)
        s.prompt_logprobs = entries
        if s.config.max_new_tokens == 0:
            s._finish("length")
            return
        self._accept(last[None, None], [s])
        self._merge(cache, np.ones((1, len(s.prompt)), dtype=np.int64), [s], [len(s.prompt)])

    def _merge(self, cache, mask: np.ndarray, seqs: list[Sequence], lengths: list[int]) -> None:
        if self.cache is None or not self.seqs:
            self.cache, self.seqs = cache, list(seqs)
            self._set_mask(mask)
            self.pos = np.array(lengths, dtype=np.int64)
            self.last = np.array([s.out[-1] if s.out else 0 for s in seqs], dtype=np.int64)
            return
        b, n = len(self.seqs), len(seqs)
        shift = self.cache.extend(cache)
        t = self.cache.length
        merged = np.zeros((b + n, t), dtype=np.int64)
        merged[:b, shift:] = self.mask
        merged[b:, t - mask.shape[1]:] = mask
        self._set_mask(merged)
        self.seqs += seqs
        self.pos = np.concatenate([self.pos, lengths]).astype(np.int64)
        self.last = np.concatenate([self.last, [s.out[-1] if s.out else 0 for s in seqs]]).astype(np.int64)

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
        mask = self._mbuf[:b, :t + 1]
        try:
            logits = self.backend.forward(self.cache, self.last[:, None], mask, self.pos[:, None])
        except Exception:
            self._mbuf[:b, t] = 0
            self._rebuild()
            return
        self.mask = mask
        self._accept(logits, self.seqs)
        self.pos += 1
        for i, s in enumerate(self.seqs):
            if s.out:
                self.last[i] = s.out[-1]
        self._retire()

    def _rebuild(self) -> None:
        """The batched step failed: redo it for each row alone from a fresh cache."""
        seqs = [s for s in self.seqs if not s.done and not s.cancelled]
        for s in self.seqs:
            if s.cancelled and not s.done:
                s._finish("cancelled")
        self.seqs, self.cache = [], None
        self.mask = self._mbuf[:0, :0]
        self.pos, self.last = self.pos[:0], self.last[:0]
        for s in seqs:
            self._join_each([s], resume=True)
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
