"""Speed of an Engine at batch 1: decode tokens/s as (N-1)/(T_N - T_1) from token arrival times, time to
first token, prefill time of a long prompt, peak RSS; medians over runs (greedy, EOS ignored)."""
from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass

from .errors import EngineError
from .generate import Batch, GenerationConfig, Sequence


@dataclass(frozen=True)
class BenchConfig:
    prompt_len: int = 32
    new_tokens: int = 128
    runs: int = 5
    prefill_len: int = 512
    warmup: int = 1

    def __post_init__(self):
        for name in ("prompt_len", "new_tokens", "runs", "prefill_len"):
            if getattr(self, name) < 1:
                raise EngineError(f"{name.replace('_', '-')} must be at least 1")
        if self.new_tokens < 2:
            raise EngineError("new-tokens must be at least 2 (decode speed needs two tokens)")


def _prompt(engine, n: int) -> list[int]:
    from .corpus import load_text

    text = load_text("builtin:pydoc")
    ids = engine.tokenizer.encode(text[: n * 16 + 1000], add_special_tokens=False)
    if len(ids) < n:
        raise EngineError(f"could not build a {n}-token prompt")
    return ids[:n]


def token_times(engine, prompt: list[int], new_tokens: int) -> tuple[float, list[float]]:
    """(start, arrival time of each generated token) for one greedy generation."""
    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    seq = Sequence(prompt, cfg, engine.tokenizer, engine.eos_ids, context=engine.context_length)
    batch = Batch(engine.backend)
    times = []
    t0 = time.perf_counter()
    batch.add([seq])
    times.append(time.perf_counter())
    while len(batch):
        batch.step()
        times.append(time.perf_counter())
    if len(seq.out) != new_tokens:
        raise EngineError(f"expected {new_tokens} tokens, got {len(seq.out)}")
    return t0, times


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def benchmark(engine, cfg: BenchConfig = BenchConfig(), progress=None) -> dict:
    if cfg.prompt_len + cfg.new_tokens > engine.context_length or cfg.prefill_len + 1 > engine.context_length:
        raise EngineError(f"the model's context is {engine.context_length} tokens; lower the lengths")
    prompt = _prompt(engine, cfg.prompt_len)
    long_prompt = _prompt(engine, cfg.prefill_len)
    decode, ttft, prefill = [], [], []
    for i in range(cfg.warmup + cfg.runs):
        t0, ts = token_times(engine, prompt, cfg.new_tokens)
        t0p, tsp = token_times(engine, long_prompt, 2)
        if i >= cfg.warmup:
            decode.append((len(ts) - 1) / (ts[-1] - ts[0]))
            ttft.append(ts[0] - t0)
            prefill.append(tsp[0] - t0p)
        if progress:
            progress()
    med = statistics.median
    return {"decode_tokens_per_s": med(decode), "ttft_ms": 1e3 * med(ttft),
            "prefill_ms": 1e3 * med(prefill), "peak_rss_mb": peak_rss_bytes() / 2**20,
            "runs": cfg.runs, "prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens,
            "prefill_len": cfg.prefill_len, "decode_tokens_per_s_all": decode, "ttft_ms_all": [1e3 * t for t in ttft],
            "prefill_ms_all": [1e3 * t for t in prefill], **engine.describe()}
