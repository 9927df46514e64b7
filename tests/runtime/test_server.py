"""The OpenAI-compatible server over real HTTP on 127.0.0.1, driven by the official `openai` client."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.runtime.server_live import Live


@pytest.fixture(scope="module")
def live(tiny_engine):
    srv = Live(tiny_engine, max_batch=8, max_queue=16)
    yield srv
    srv.close()


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_models_health_metrics(live):
    assert [m.id for m in live.client().models.list().data] == ["model"]
    status, body, _ = live.raw("GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert live.metric("kiln_active_requests") == 0


def test_completion_equals_engine(live, tiny_engine):
    r = live.client().completions.create(model="model", prompt="The module", max_tokens=12, **GREEDY)
    ref = tiny_engine.generate("The module", max_new_tokens=12, ignore_eos=True)
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == ref.timings["prompt_tokens"]


def test_chat_stream_equals_non_stream(live):
    c = live.client()
    msgs = [{"role": "user", "content": "Say something"}]
    full = c.chat.completions.create(model="model", messages=msgs, max_tokens=20, **GREEDY)
    chunks = list(c.chat.completions.create(model="model", messages=msgs, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content and len(text) > 0
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20


def _error(live, body, path="/v1/completions"):
    return live.error(body, path)


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 5000}, "max_tokens"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "word " * 1100}, "prompt"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "n": 3}, "n"),
    ([1, 2], None),
])
def test_bad_requests_are_400(live, body, param):
    status, err = _error(live, body)
    assert status == 400 and err["type"] == "invalid_request_error" and err["param"] == param


def test_bad_chat_and_client_errors(live):
    status, err = _error(live, {"messages": "hello"}, "/v1/chat/completions")
    assert status == 400 and err["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024"):
        live.client().chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2000)


def test_api_key(tiny_engine, monkeypatch):
    import hmac

    import runtime.server

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(runtime.server.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    srv = Live(tiny_engine, api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").completions.create(model="model", prompt="hi", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):  # same length, one character off
            srv.client("sekrex").completions.create(model="model", prompt="hi", max_tokens=2)
        status, data, _ = srv.post("/v1/completions", b'{"prompt": "hi"}')
        assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
        r = srv.client("sekret").completions.create(model="model", prompt="hi", max_tokens=2)
        assert r.usage.completion_tokens >= 1
        assert srv.raw("GET", "/health")[0] == 200
        assert len(compared) == 4  # every key check went through hmac.compare_digest
    finally:
        srv.close()


def test_full_queue_is_429(tiny_engine):
    srv = Live(tiny_engine, max_batch=1, max_queue=0)
    try:
        c = srv.client()
        stream = c.completions.create(model="model", prompt="The module", max_tokens=1000, stream=True, **GREEDY)
        next(iter(stream))  # admitted and decoding
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="model", prompt="hi", max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1" and e.value.code == "queue_full"
        stream.close()
    finally:
        srv.close()


def test_disconnect_stops_generation(live):
    before = live.metric("kiln_generated_tokens_total")
    cancelled = live.metric("kiln_requests_cancelled_total")
    stream = live.client().completions.create(model="model", prompt="The module", max_tokens=1000, stream=True,
                                              **GREEDY)
    it = iter(stream)
    next(it), next(it)
    stream.close()
    for _ in range(250):
        if live.metric("kiln_requests_cancelled_total") == cancelled + 1 and live.metric("kiln_active_requests") == 0:
            break
        time.sleep(0.02)
    assert live.metric("kiln_requests_cancelled_total") == cancelled + 1
    assert live.metric("kiln_active_requests") == 0
    assert live.metric("kiln_generated_tokens_total") - before < 1000


def test_concurrent_clients_are_batched_and_correct(live, tiny_engine):
    prompts = [f"Prompt number {i} about" + " the module" * i for i in range(8)]
    steps0, rows0 = live.metric("kiln_decode_steps_total"), live.metric("kiln_decode_rows_total")

    def one(p):
        s = live.client().completions.create(model="model", prompt=p, max_tokens=40, stream=True, **GREEDY)
        return "".join(ch.choices[0].text for ch in s if ch.choices)

    with ThreadPoolExecutor(8) as ex:
        texts = list(ex.map(one, prompts))
    assert texts == [tiny_engine.generate(p, max_new_tokens=40, ignore_eos=True).text for p in prompts]
    steps = live.metric("kiln_decode_steps_total") - steps0
    rows = live.metric("kiln_decode_rows_total") - rows0
    assert rows / steps > 1.5  # requests shared decode steps


def test_disconnect_stops_non_streaming_request(live):
    import socket

    cancelled = live.metric("kiln_requests_cancelled_total")
    body = json.dumps({"prompt": "The module", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", live.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    for _ in range(100):  # wait until it is decoding
        if live.metric("kiln_active_requests") == 1:
            break
        time.sleep(0.01)
    s.close()
    for _ in range(250):
        if live.metric("kiln_requests_cancelled_total") == cancelled + 1:
            break
        time.sleep(0.02)
    assert live.metric("kiln_requests_cancelled_total") == cancelled + 1
    assert live.metric("kiln_active_requests") == 0


def test_unknown_route_and_method_are_json(live):
    status, data, _ = live.raw("GET", "/v1/nothing")
    assert status == 404 and json.loads(data)["error"]["code"] == "not_found"
    status, data, _ = live.raw("GET", "/v1/completions")
    assert status == 405 and "error" in json.loads(data)
