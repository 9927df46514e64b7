"""The request checks that run before a body is parsed: JSON shape (depth, containers) against a character-by-
character reference, and loopback Host names."""
import json
import random

import pytest

from runtime.http_guard import HttpError, host_name, is_loopback, json_shape, parse_json


def _reference(raw: bytes) -> tuple[int, int]:
    depth = deepest = n = 0
    inside = escaped = False
    for c in raw.decode():
        if inside:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                inside = False
        elif c == '"':
            inside = True
        elif c in "[{":
            depth, n = depth + 1, n + 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest, n


def _random_value(rng, depth=0):
    r = rng.random()
    if depth > 5 or r < 0.3:  # strings full of the characters that could fool the scan
        return "".join(rng.choice('ab\\"[]{}') for _ in range(rng.randint(0, 6)))
    if r < 0.6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice('k\\"[{'): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def test_json_shape_matches_a_reference_scan():
    rng = random.Random(0)
    for _ in range(2000):
        raw = json.dumps(_random_value(rng)).encode()
        assert json_shape(raw) == _reference(raw), raw


@pytest.mark.parametrize("raw,shape", [(b"", (0, 0)), (b'"[[["', (0, 0)), (b'["\\\\", ["x"]]', (2, 2)),
                                       (b'{"a": "\\"[[["}', (1, 1)), (b"[{},{}]", (2, 3))])
def test_json_shape_cases(raw, shape):
    assert json_shape(raw) == shape


def test_parse_json_limits():
    assert parse_json(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    for raw in (b"[" * 33 + b"]" * 33, b"[" + b",".join([b"[]"] * 20_000) + b"]", b'{"a": 1e999}',
                b'{"a": -Infinity}', b'{"a": "\\udfff"}', b"\xef\xbb\xbf{}", b'{"a": ' + b"1" * 21 + b"}"):
        with pytest.raises(HttpError) as e:
            parse_json(raw)
        assert e.value.status == 400 and e.value.code == "invalid_json" and "\n" not in str(e.value)


@pytest.mark.parametrize("header,ok", [("localhost", True), ("LOCALHOST:8000", True), ("127.0.0.1:1", True),
                                       ("127.8.9.10", True), ("[::1]:8000", True), ("app.localhost", True),
                                       ("localhost.", True), ("evil.example", False), ("localhost.evil", False),
                                       ("0.0.0.0", False), ("[::]:80", False), ("10.0.0.1:8000", False)])
def test_loopback_host_names(header, ok):
    assert is_loopback(host_name(header)) is ok
