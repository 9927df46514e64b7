"""Sampling primitives against references: transformers' logits processors and ten-line numpy versions."""
import numpy as np
import pytest

from runtime.errors import EngineError
from runtime.sampling import SamplingParams, apply_repetition_penalty_, nucleus, sample, top_k_candidates

V = 1000


def _logits(seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(V) * scale).astype(np.float32)


def _hf_kept(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The token ids transformers' warpers leave finite (temperature -> top-k -> top-p)."""
    import torch
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    x = torch.tensor(logits)[None].float()
    ids = torch.zeros((1, 1), dtype=torch.long)
    x = TemperatureLogitsWarper(temperature)(ids, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(ids, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(ids, x)
    return set(torch.nonzero(torch.isfinite(x[0])).flatten().tolist())


def _support(logits, params, draws=3000):
    rng = np.random.default_rng(0)
    return {sample(logits.copy(), params, rng) for _ in range(draws)}


@pytest.mark.parametrize("top_k,top_p,temp", [(0, 0.5, 1.0), (0, 0.9, 0.7), (20, 1.0, 1.0), (50, 0.8, 1.3),
                                              (5, 0.3, 0.5)])
def test_support_matches_transformers_warpers(top_k, top_p, temp):
    logits = _logits(1)
    kept = _hf_kept(logits, temp, top_k, top_p)
    got = _support(logits, SamplingParams(temperature=temp, top_k=top_k, top_p=top_p))
    assert got <= kept  # never outside the nucleus / top-k set
    # every kept token with a visible share of the mass was drawn
    p = np.exp((logits - logits.max()) / temp)
    p /= p.sum()
    assert {i for i in kept if p[i] > 0.01} <= got


def test_top_p_mass_rule():
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    assert nucleus(p, 0.5) == 1  # the first token alone reaches 0.5
    assert nucleus(p, 0.51) == 2
    assert nucleus(p, 0.85) == 3
    assert nucleus(p, 0.86) == 4
    assert nucleus(p, 1.0) == 5
    assert nucleus(np.array([1.0]), 0.1) == 1


def test_wide_nucleus_falls_back_to_full_sort():
    logits = np.zeros(V, dtype=np.float32)  # flat: the nucleus of 0.9 needs 900 tokens, beyond the candidates
    got = _support(logits, SamplingParams(temperature=1.0, top_p=0.9), draws=5000)
    assert len(got) > 600 and max(got) > 256


def test_top_k_candidates_are_the_k_largest():
    x = _logits(2)
    for k in (1, 7, 100, V):
        assert set(top_k_candidates(x, k).tolist()) == set(np.argsort(-x)[:k].tolist())


def test_repetition_penalty_matches_transformers():
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    x = _logits(3)
    seen = np.array([0, 5, 17, 999, 400])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(seen)[None], torch.tensor(x)[None].clone())[0].numpy()
    got = x.copy()
    apply_repetition_penalty_(got, seen, 1.3)
    np.testing.assert_array_equal(got, ref)


def test_greedy_is_argmax_after_penalty():
    x = _logits(4)
    top = int(np.argmax(x))
    assert sample(x.copy(), SamplingParams(), np.random.default_rng()) == top
    assert sample(x.copy(), SamplingParams(temperature=0.8, top_k=1), np.random.default_rng()) == top
    y = x.copy()
    y[top] = abs(y[top]) + 1e-3  # barely first; a strong penalty moves the choice
    second = int(np.argsort(-y)[1])
    y[second] = y[top] - 1e-3
    assert sample(y, SamplingParams(repetition_penalty=2.0), np.random.default_rng(), np.array([top])) == second


def test_seeded_draws_are_deterministic_and_follow_the_distribution():
    x = np.log(np.array([0.6, 0.3, 0.1], dtype=np.float32))
    params = SamplingParams(temperature=1.0)
    a = [sample(x.copy(), params, np.random.default_rng(42)) for _ in range(5)]
    assert len(set(a)) == 1
    rng = np.random.default_rng(7)
    draws = np.array([sample(x.copy(), params, rng) for _ in range(20000)])
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.015)


@pytest.mark.parametrize("kw,msg", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                    ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
                                    ({"top_k": 2.5}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"),
                                    ({"temperature": "hot"}, "temperature")])
def test_params_validated(kw, msg):
    with pytest.raises(EngineError, match=msg):
        SamplingParams(**kw)
