"""Body size and read time, text that cannot fit, CPU work off the event loop, KV-byte admission, the
max_tokens cap, and cancelled requests leaving the queue (issue 15, items 2, 3, 8)."""
import json
import socket
import threading
import time

import openai
import pytest

from tests.runtime.server_live import Live

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def live(tiny_engine):
    srv = Live(tiny_engine, max_batch=4, max_queue=8, max_body_mb=0.25, body_timeout_s=1.0)
    yield srv
    srv.close()


def test_body_over_the_limit_is_413_before_reading(live):
    before = live.requests("completions", 413)
    body = json.dumps({"prompt": "x" * 300_000}).encode()
    status, data, _ = live.post("/v1/completions", body)
    assert status == 413 and json.loads(data)["error"]["code"] == "body_too_large"
    assert live.requests("completions", 413) == before + 1


def test_chunked_body_over_the_limit_is_413(live):
    def chunks():
        for _ in range(40):  # 40 x 10 kB > 0.25 MB
            yield b" " * 10_000

    c = __import__("http.client").client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    c.request("POST", "/v1/completions", body=chunks(), headers={"Content-Type": "application/json"},
              encode_chunked=True)
    r = c.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "body_too_large"
    c.close()


def test_slow_body_times_out_with_408(live):
    s = socket.create_connection(("127.0.0.1", live.port), timeout=10)
    t0 = time.monotonic()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"prompt\":")
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        part = s.recv(65536)
        if not part:
            break
        data += part
    s.close()
    assert data.startswith(b"HTTP/1.1 408") and b"body_timeout" in data
    assert 0.9 < time.monotonic() - t0 < 5.0  # the 1 s read timeout, not the client's 10 s


def test_client_gone_mid_body_is_counted_as_499(live):
    before, errors = live.requests("completions", 499), live.requests("completions", 500)
    s = socket.create_connection(("127.0.0.1", live.port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"prompt\":")
    time.sleep(0.2)
    s.close()
    end = time.monotonic() + 5
    while live.requests("completions", 499) == before and time.monotonic() < end:
        time.sleep(0.02)
    assert live.requests("completions", 499) == before + 1 and live.requests("completions", 500) == errors


def test_text_that_cannot_fit_is_refused_before_tokenizing(live, tiny_engine):
    limit = live.app.limits.max_prompt_chars
    assert limit < 200_000  # the body limit lets a longer text through to this check
    status, err = live.error({"prompt": "ab" * (limit // 2 + 1)})
    assert (status, err["code"]) == (400, "context_length_exceeded") and "characters" in err["message"]
    msgs = [{"role": "user", "content": "c" * (limit // 4 + 1)} for _ in range(4)]
    status, err = live.error({"messages": msgs}, "/v1/chat/completions")
    assert (status, err["code"]) == (400, "context_length_exceeded") and "characters" in err["message"]
    # under the character bound the prompt is tokenized and measured in tokens
    status, err = live.error({"prompt": "word " * 1100})
    assert (status, err["code"]) == (400, "context_length_exceeded") and "tokens" in err["message"]


def test_event_loop_stays_free_while_a_body_is_parsed(tiny_engine):
    # 2.4 million token ids: parsing and checking them is CPU work for the pool, not the loop
    srv = Live(tiny_engine, max_body_mb=16)
    body = json.dumps({"prompt": [5] * 2_400_000, "max_tokens": 1}).encode()
    result = {}

    def heavy():
        t0 = time.monotonic()
        result["status"] = srv.post("/v1/completions", body)[0]
        result["s"] = time.monotonic() - t0

    try:
        th = threading.Thread(target=heavy)
        th.start()
        lat = []
        while th.is_alive() and len(lat) < 500:
            t0 = time.monotonic()
            assert srv.raw("GET", "/health")[0] == 200
            lat.append(time.monotonic() - t0)
            time.sleep(0.01)
        th.join(30)
    finally:
        srv.close()
    assert result["status"] == 400  # 2.4 million tokens do not fit 1024
    assert len(lat) >= 3  # /health was probed while the body was worked on
    # on the loop, one /health would wait the whole parse (seconds); off it, only for the GIL on a shared box
    assert max(lat) < 0.5, (max(lat), result["s"])


def test_max_tokens_cap(tiny_engine):
    srv = Live(tiny_engine, max_tokens_cap=8)
    try:
        status, err = srv.error({"prompt": "hi", "max_tokens": 9})
        assert (status, err["code"], err["param"]) == (400, "max_tokens_exceeded", "max_tokens")
        r = srv.client().chat.completions.create(model=srv.model, messages=[{"role": "user", "content": "x"}],
                                                 **GREEDY)
        assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"  # the cap, not 256
    finally:
        srv.close()


def test_kv_budget_admits_by_bytes(tiny_engine):
    per_token = 2 * 2 * 2 * 16 * 4 * 2  # layers x (k, v) x kv_heads x head_dim x float32 x two buffers
    budget_mb = 700 * per_token / 2 ** 20  # one request of 600 positions fits, two do not
    srv = Live(tiny_engine, max_batch=4, max_queue=4, kv_budget_mb=budget_mb)
    try:
        assert srv.app.scheduler.kv_per_token == per_token
        assert srv.metric("kiln_kv_budget_bytes") == int(budget_mb * 2 ** 20)
        status, err = srv.error({"prompt": "hi", "max_tokens": 800})  # 801 positions alone exceed it
        assert (status, err["code"]) == (400, "kv_budget_exceeded") and "MiB" in err["message"]
        c = srv.client()
        first = c.completions.create(model=srv.model, prompt="The module", max_tokens=597, stream=True, **GREEDY)
        it = iter(first)
        next(it)  # decoding
        second = {}
        th = threading.Thread(target=lambda: second.update(r=c.completions.create(
            model=srv.model, prompt="The module", max_tokens=597, **GREEDY)))
        th.start()
        assert srv.wait_metric("kiln_queued_requests", 1) == 1  # it waits for room instead of running
        assert srv.metric("kiln_active_requests") == 1
        assert srv.metric("kiln_kv_reserved_bytes") <= srv.metric("kiln_kv_budget_bytes")
        text = "".join(ch.choices[0].text for ch in it)
        th.join(120)
        assert second["r"].choices[0].text == "The module"[:0] + second["r"].choices[0].text
        assert second["r"].usage.completion_tokens == 597 and len(text) > 0
        assert srv.metric("kiln_active_requests") == 0 and srv.metric("kiln_queued_requests") == 0
    finally:
        srv.close()


def test_cancelled_queued_request_frees_its_place(tiny_engine):
    srv = Live(tiny_engine, max_batch=1, max_queue=1)
    try:
        c = srv.client()
        running = c.completions.create(model=srv.model, prompt="The module", max_tokens=1000, stream=True,
                                       **GREEDY)
        it = iter(running)
        next(it)  # holds the only batch slot
        body = json.dumps({"prompt": "hi", "max_tokens": 5, "stream": True}).encode()
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert srv.wait_metric("kiln_queued_requests", 1) == 1
        s.close()  # the queued client goes away
        assert srv.wait_metric("kiln_queued_requests", 0) == 0
        # its place is free: the next request queues instead of getting 429
        third = {}
        th = threading.Thread(target=lambda: third.update(r=c.completions.create(
            model=srv.model, prompt="hi", max_tokens=3, **GREEDY)))
        th.start()
        assert srv.wait_metric("kiln_queued_requests", 1) == 1
        running.close()
        th.join(60)
        assert third["r"].usage.completion_tokens == 3
    finally:
        srv.close()


def test_full_queue_429_has_retry_after(tiny_engine):
    srv = Live(tiny_engine, max_batch=1, max_queue=0)
    try:
        stream = srv.client().completions.create(model=srv.model, prompt="The module", max_tokens=1000,
                                                 stream=True, **GREEDY)
        next(iter(stream))
        status, data, headers = srv.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 429 and headers["retry-after"] == "1"
        assert json.loads(data)["error"]["type"] == "rate_limit_error"
        stream.close()
    finally:
        srv.close()


def test_openai_client_sees_413(live):
    with pytest.raises(openai.APIStatusError) as e:
        live.client().completions.create(model=live.model, prompt="y" * 300_000, max_tokens=1)
    assert e.value.status_code == 413
