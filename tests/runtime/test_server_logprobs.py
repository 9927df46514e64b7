"""What OpenAI clients and evaluation harnesses expect: logprobs (completions 0..5, chat top_logprobs 0..20),
echo with max_tokens 0 (prompt scoring, as lm-evaluation-harness asks), seed, stop, finish_reason, n,
stream_options.include_usage; driven by the official `openai` client."""
import json

import numpy as np
import openai
import pytest

from tests.runtime.server_live import Live

TOL = 2e-5  # float32 logits, log-softmax in float64


@pytest.fixture(scope="module")
def live(tiny_engine):
    srv = Live(tiny_engine, max_batch=4, max_queue=8)
    yield srv
    srv.close()


def _ref_logprobs(engine, ids):
    """log p(ids[i] | ids[:i]) for i >= 1 and the log-softmax rows, from one full-sequence score."""
    x = engine.score(ids).astype(np.float64)  # [S, V]
    m = x.max(-1, keepdims=True)
    ls = x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))
    return ls[np.arange(len(ids) - 1), ids[1:]], ls


def test_echo_max_tokens_0_scores_the_prompt(live, tiny_engine):
    text = "The module of the text corpus"
    ids = tiny_engine.tokenizer.encode(text)
    r = live.client().completions.create(model=live.model, prompt=text, max_tokens=0, echo=True, logprobs=3)
    c = r.choices[0]
    assert c.text == text and c.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = c.logprobs
    ref, ls = _ref_logprobs(tiny_engine, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert np.abs(np.array(lp.token_logprobs[1:]) - ref).max() < TOL
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == text
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
    for i in range(1, len(ids)):
        top = lp.top_logprobs[i]
        best = np.sort(ls[i - 1])[::-1][:3]
        assert 3 <= len(top) <= 4  # the top 3, plus the prompt token when it is not among them
        assert np.abs(np.sort(list(top.values()))[::-1][:3] - best).max() < TOL


def test_token_id_prompt_as_lm_eval_sends_it(live, tiny_engine):
    """lm-eval local-completions: prompt [[ids]], echo, logprobs 1, max_tokens 1, temperature 0."""
    ids = tiny_engine.tokenizer.encode("Question: what is the module? Answer: the text")
    status, data, _ = live.post("/v1/completions", {"model": live.model, "prompt": [ids], "echo": True,
                                                    "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234})
    assert status == 200
    lp = json.loads(data)["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1
    ref, ls = _ref_logprobs(tiny_engine, ids)
    assert np.abs(np.array(lp["token_logprobs"][1:len(ids)]) - ref).max() < TOL
    greedy = int(np.argmax(ls[-1]))
    assert lp["tokens"][-1] == tiny_engine.tokenizer.decode([greedy], skip_special_tokens=False)
    # lm-eval's greedy check: the token's logprob is the largest of its top_logprobs
    for tok_lp, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert max(top.values()) >= tok_lp - 1e-12


def test_generated_logprobs_match_rescoring(live, tiny_engine):
    r = live.client().completions.create(model=live.model, prompt="The module", max_tokens=12, logprobs=5,
                                         temperature=0, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    prompt = tiny_engine.tokenizer.encode("The module")
    gen = tiny_engine.generate("The module", max_new_tokens=12, ignore_eos=True).token_ids
    ref, ls = _ref_logprobs(tiny_engine, prompt + gen)
    assert len(lp.token_logprobs) == 12 and np.abs(np.array(lp.token_logprobs) - ref[len(prompt) - 1:]).max() < 1e-4
    for i, (tok, tok_lp, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        best5 = np.argsort(-ls[len(prompt) - 1 + i])[:5]
        names = {tiny_engine.tokenizer.decode([int(t)], skip_special_tokens=False) for t in best5}
        assert set(top) == names  # the top 5 by their text (two byte tokens may both read as U+FFFD)
        assert top[tok] == tok_lp == max(top.values())  # greedy: the chosen is the best
    assert lp.text_offset[0] == len("The module")


def test_chat_logprobs_and_top_logprobs(live):
    msgs = [{"role": "user", "content": "Say something"}]
    c = live.client()
    r = c.chat.completions.create(model=live.model, messages=msgs, max_tokens=6, logprobs=True, top_logprobs=3,
                                  temperature=0, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6 == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob and e.logprob <= 0
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    r = c.chat.completions.create(model=live.model, messages=msgs, max_tokens=3, logprobs=True)
    assert [len(e.top_logprobs) for e in r.choices[0].logprobs.content] == [0, 0, 0]
    r = c.chat.completions.create(model=live.model, messages=msgs, max_tokens=3)
    assert r.choices[0].logprobs is None


def test_stream_logprobs_equal_non_stream(live):
    c = live.client()
    kw = dict(model=live.model, prompt="The module", max_tokens=16, logprobs=2, temperature=0,
              extra_body={"ignore_eos": True})
    full = c.completions.create(**kw).choices[0].logprobs
    chunks = [ch for ch in c.completions.create(stream=True, **kw) if ch.choices]
    toks = [t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    lps = [t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.token_logprobs]
    offs = [t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.text_offset]
    assert toks == full.tokens and np.allclose(lps, full.token_logprobs, atol=1e-6) and offs == full.text_offset
    msgs = [{"role": "user", "content": "Say something"}]
    kw = dict(model=live.model, messages=msgs, max_tokens=10, logprobs=True, top_logprobs=2, temperature=0,
              extra_body={"ignore_eos": True})
    full = [e.token for e in c.chat.completions.create(**kw).choices[0].logprobs.content]
    streamed = [e.token for ch in c.chat.completions.create(stream=True, **kw)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert streamed == full and len(full) == 10


@pytest.mark.parametrize("body,path,param", [
    ({"prompt": "hi", "logprobs": 6}, "/v1/completions", "logprobs"),
    ({"prompt": "hi", "logprobs": True}, "/v1/completions", "logprobs"),
    ({"prompt": "hi", "logprobs": -1}, "/v1/completions", "logprobs"),
    ({"prompt": "hi", "echo": True, "stream": True}, "/v1/completions", "echo"),
    ({"prompt": "hi", "best_of": 2}, "/v1/completions", "best_of"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "/v1/chat/completions", "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "/v1/chat/completions", "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "/v1/chat/completions", "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "echo": True}, "/v1/chat/completions", "echo"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "/v1/chat/completions", "n"),
])
def test_out_of_range_options_are_400(live, body, path, param):
    status, err = live.error(body, path)
    assert status == 400 and err["param"] == param


def test_seed_reproduces_sampling(live):
    c = live.client()
    kw = dict(model=live.model, prompt="The module", max_tokens=24, temperature=1.0,
              extra_body={"ignore_eos": True})
    a, b = (c.completions.create(seed=7, **kw).choices[0].text for _ in range(2))
    others = {c.completions.create(seed=s, **kw).choices[0].text for s in (8, 9, 10)}
    assert a == b and len(others - {a}) >= 1


def test_stop_and_finish_reasons(live, tiny_engine):
    c = live.client()
    full = c.completions.create(model=live.model, prompt="The module", max_tokens=30, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0]
    assert full.finish_reason == "length"
    stop = full.text[5:9]
    assert len(stop.strip()) > 0
    cut = c.completions.create(model=live.model, prompt="The module", max_tokens=30, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    streamed = [ch.choices[0] for ch in c.completions.create(model=live.model, prompt="The module", max_tokens=30,
                                                             temperature=0, stop=stop, stream=True,
                                                             extra_body={"ignore_eos": True}) if ch.choices]
    assert "".join(ch.text for ch in streamed) == cut.text and streamed[-1].finish_reason == "stop"


def test_include_usage_pinned(live):
    chunks = list(live.client().completions.create(model=live.model, prompt="hi", max_tokens=3, stream=True,
                                                   stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(ch.usage is None for ch in chunks[:-1])


def test_openai_client_errors(live):
    with pytest.raises(openai.NotFoundError) as e:
        live.client().completions.create(model="gpt-4o", prompt="hi", max_tokens=1)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        live.client().completions.create(model=live.model, prompt="hi", max_tokens=1, logprobs=9)
    assert e.value.param == "logprobs"
