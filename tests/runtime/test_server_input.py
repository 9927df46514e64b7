"""Hostile or careless request bodies and headers (issue 15, items 1, 5, 6, 7): each is a JSON error with an
OpenAI-style body, counted in /metrics; what already held is pinned."""
import json

import pytest

from tests.runtime.server_live import Live

OK = {"prompt": "hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def live(tiny_engine):
    srv = Live(tiny_engine, max_batch=4, max_queue=8)
    yield srv
    srv.close()


def _raw(text: str) -> bytes:
    return text.encode()


BAD_400 = [
    # (id, body, param, code)
    ("nested 100000 deep", b"[" * 100_000 + b"]" * 100_000, None, "invalid_json"),
    ("nested in a field", _raw('{"prompt": "hi", "x": ' + "[" * 50 + "]" * 50 + "}"), None, "invalid_json"),
    ("20001 objects", _raw('{"prompt": "hi", "x": [' + ",".join(["{}"] * 20_000) + "]}"), None, "invalid_json"),
    ("5000-digit max_tokens", _raw('{"prompt": "hi", "max_tokens": ' + "9" * 5000 + "}"), None, "invalid_json"),
    ("21-digit seed", _raw('{"prompt": "hi", "seed": ' + "1" * 21 + "}"), None, "invalid_json"),
    ("seed -1", {"prompt": "hi", "seed": -1}, "seed", "invalid_value"),
    ("seed 2**63", {"prompt": "hi", "seed": 2 ** 63}, "seed", "invalid_value"),
    ("lone surrogate in model", _raw('{"model": "\\ud800", "prompt": "hi"}'), None, "invalid_json"),
    ("lone surrogate in prompt", _raw('{"prompt": "a\\udc00b"}'), None, "invalid_json"),
    ("repetition_penalty 1e400", _raw('{"prompt": "hi", "repetition_penalty": 1e400}'), None, "invalid_json"),
    ("repetition_penalty Infinity", _raw('{"prompt": "hi", "repetition_penalty": Infinity}'), None,
     "invalid_json"),
    ("temperature -Infinity", _raw('{"prompt": "hi", "temperature": -Infinity}'), None, "invalid_json"),
    ("NaN", _raw('{"prompt": "hi", "top_p": NaN}'), None, "invalid_json"),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', None, "invalid_json"),
    ("not JSON", b"{not json", None, "invalid_json"),
    ("ignore_eos string", {"prompt": "hi", "ignore_eos": "false"}, "ignore_eos", "invalid_type"),
    ("ignore_eos 0", {"prompt": "hi", "ignore_eos": 0}, "ignore_eos", "invalid_type"),
    ("echo string", {"prompt": "hi", "echo": "true"}, "echo", "invalid_type"),
    ("stream 1", {"prompt": "hi", "stream": 1}, "stream", "invalid_type"),
    ("include_usage string", {"prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}},
     "include_usage", "invalid_type"),
    ("stop of 100000 chars", {"prompt": "hi", "stop": "x" * 100_000}, "stop", "invalid_value"),
    ("stop of 257 chars", {"prompt": "hi", "stop": ["a", "y" * 257]}, "stop", "invalid_value"),
    ("five stop strings", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_type"),
    ("top_p 0", {"prompt": "hi", "top_p": 0}, "top_p", "invalid_value"),
    ("top_p 1.5", {"prompt": "hi", "top_p": 1.5}, "top_p", "invalid_value"),
    ("n 2", {"prompt": "hi", "n": 2}, "n", "invalid_value"),
    ("max_tokens -5", {"prompt": "hi", "max_tokens": -5}, "max_tokens", "invalid_value"),
    ("two prompts", {"prompt": ["a", "b"]}, "prompt", "unsupported"),
]


@pytest.mark.parametrize("body,param,code", [b[1:] for b in BAD_400], ids=[b[0] for b in BAD_400])
def test_refused_with_json_400_and_counted(live, body, param, code):
    before = live.requests("completions", 400)
    status, err = live.error(body)
    assert (status, err["param"], err["code"], err["type"]) == (400, param, code, "invalid_request_error")
    assert live.requests("completions", 400) == before + 1


def test_lone_surrogate_in_chat_content(live):
    body = _raw('{"messages": [{"role": "user", "content": "hi \\ud83d"}]}')
    status, err = live.error(body, "/v1/chat/completions")
    assert (status, err["code"]) == (400, "invalid_json")


def test_valid_surrogate_pair_is_fine(live):
    status, data, _ = live.post("/v1/completions", _raw('{"prompt": "hi \\ud83d\\ude00", "max_tokens": 1}'))
    assert status == 200


def test_stop_of_256_chars_is_accepted(live):
    status, data, _ = live.post("/v1/completions", {**OK, "stop": ["z" * 256, "a", "b", "c"]})
    assert status == 200 and json.loads(data)["choices"][0]["finish_reason"] in ("stop", "length")


def test_unknown_model_is_404_and_not_echoed(live):
    before = live.requests("completions", 404)
    status, err = live.error({**OK, "model": "gpt-4o"})
    assert (status, err["code"], err["param"]) == (404, "model_not_found", "model")
    status, data, _ = live.post("/v1/completions", {**OK, "model": "m" * 1_000_000})
    assert status == 404 and len(data) < 1000  # a 1 MB name is not sent back
    status, err = live.error({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
                             "/v1/chat/completions")
    assert status == 404 and err["code"] == "model_not_found"
    assert live.requests("completions", 404) == before + 2


def test_served_model_name_and_missing_model_are_fine(live):
    assert live.post("/v1/completions", {**OK, "model": live.model})[0] == 200
    assert live.post("/v1/completions", OK)[0] == 200


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                   None])
def test_content_type_must_be_json(live, ctype):
    headers = {"Content-Type": ctype} if ctype else {}
    before = live.requests("completions", 415)
    status, data, _ = live.raw("POST", "/v1/completions", json.dumps(OK).encode(), headers)
    assert status == 415 and json.loads(data)["error"]["code"] == "unsupported_media_type"
    assert live.requests("completions", 415) == before + 1


def test_json_with_charset_is_fine(live):
    status, _, _ = live.raw("POST", "/v1/completions", json.dumps(OK).encode(),
                            {"Content-Type": "Application/JSON; charset=utf-8"})
    assert status == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "10.0.0.1"])
def test_foreign_host_is_refused_on_loopback(live, host):
    for method, path, body in [("POST", "/v1/completions", json.dumps(OK).encode()), ("GET", "/v1/models", None),
                               ("GET", "/metrics", None)]:
        status, data, _ = live.raw(method, path, body, {"Host": host, "Content-Type": "application/json"})
        assert status == 400 and json.loads(data)["error"]["code"] == "invalid_host"


@pytest.mark.parametrize("host", ["localhost", "localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "127.0.0.2"])
def test_loopback_hosts_pass(live, host):
    status, _, _ = live.raw("GET", "/v1/models", None, {"Host": host.format(port=live.port)})
    assert status == 200


def test_host_open_when_not_bound_to_loopback(tiny_engine):
    from runtime.server import App, ServerConfig

    app = App(tiny_engine, ServerConfig(host="0.0.0.0", port=0))
    try:
        assert app.loopback is False
    finally:
        app.close()
