"""Checks a request passes before any of its content is used: Host and Content-Type headers, a body size
limit and read timeout, and a JSON parser that refuses what Python's own would accept or choke on (nesting
past ``MAX_DEPTH``, NaN / Infinity, numbers that overflow, integers past 64 bits, lone surrogates, invalid
UTF-8, more than ``MAX_CONTAINERS`` objects and arrays)."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import re

import numpy as np

from .errors import EngineError

MAX_DEPTH = 32  # nesting of JSON arrays/objects an OpenAI request needs is 4 or 5
MAX_CONTAINERS = 20_000  # objects + arrays in one body: a chat of thousands of messages fits
MAX_INT_DIGITS = 20  # 2**64 has 20 digits
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a \ud800-\udfff escape may be in the body
_SURROGATE = re.compile("[\ud800-\udfff]")
_LOOPBACK_NAMES = ("localhost",)


class HttpError(EngineError):
    """A request refused with ``status``; the server answers an OpenAI-style JSON error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.param, self.type, self.headers = status, code, param, type_, headers or {}


# ---- headers ---------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether a bind address or Host name is this machine only (127.0.0.0/8, ::1, localhost)."""
    h = host.strip().lower().rstrip(".")
    if h in _LOOPBACK_NAMES or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name part of a Host header ("[::1]:8000" -> "[::1]", "localhost:80" -> "localhost")."""
    h = header.strip()
    if h.startswith("["):
        return h[:h.find("]") + 1] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def check_host(headers, loopback_only: bool) -> None:
    """Bound to loopback, only loopback Host values pass: a page whose name was rebound to 127.0.0.1 sends
    its own name and is refused."""
    if not loopback_only:
        return
    h = headers.get("host")
    if h is not None and not is_loopback(host_name(h)):
        raise HttpError(400, f"Host {h[:100]!r} is not allowed: this server listens on loopback only",
                        "invalid_host")


def check_content_type(headers) -> None:
    """A POST body must be declared application/json (a cross-site form or text/plain POST is refused)."""
    ct = headers.get("content-type", "")
    if ct.split(";", 1)[0].strip().lower() != "application/json":
        raise HttpError(415, f"Content-Type must be application/json, got {ct[:100]!r}",
                        "unsupported_media_type")


# ---- body --------------------------------------------------------------------------------------------
async def read_body(request, limit: int, timeout: float) -> bytes:
    """The request body, at most ``limit`` bytes (413 beyond, before reading it when Content-Length says
    so), read within ``timeout`` seconds (408 after)."""
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.strip().isdigit():
            raise HttpError(400, "Content-Length is not a number", "invalid_content_length")
        if int(cl) > limit:
            raise HttpError(413, f"the request body has {int(cl)} bytes; this server takes at most {limit}",
                            "body_too_large")

    async def read():
        parts, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise HttpError(413, f"the request body is over {limit} bytes, the most this server takes",
                                "body_too_large")
            parts.append(chunk)
        return b"".join(parts)

    from starlette.requests import ClientDisconnect

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise HttpError(408, f"the request body did not arrive within {timeout:g} s", "body_timeout") from None
    except ClientDisconnect:
        raise HttpError(499, "the client closed the request while sending it", "cancelled") from None


# ---- JSON --------------------------------------------------------------------------------------------
def json_shape(raw: bytes) -> tuple[int, int]:
    """(deepest nesting, number of arrays and objects) of the JSON in ``raw``; brackets inside strings do not
    count. In numpy over the quote and bracket positions only: no Python loop over the body, no regex holding
    the GIL, no body-sized integer arrays."""
    a = np.frombuffer(raw, dtype=np.uint8)
    quotes = np.flatnonzero(a == ord('"'))
    escaped = quotes[(quotes > 0) & (a[np.maximum(quotes - 1, 0)] == ord("\\"))]
    if escaped.size:  # a quote after an odd number of backslashes is part of a string
        bs = np.flatnonzero(a == ord("\\"))
        # start of the backslash run before each escaped quote: the first of a block of consecutive positions
        starts = np.r_[True, np.diff(bs) != 1]
        run_start = bs[starts][np.searchsorted(bs[starts], escaped - 1, side="right") - 1]
        odd = (escaped - run_start) % 2 == 1
        quotes = np.setdiff1d(quotes, escaped[odd], assume_unique=True)
    brackets = np.flatnonzero((a == ord("[")) | (a == ord("{")) | (a == ord("]")) | (a == ord("}")))
    outside = brackets[np.searchsorted(quotes, brackets) % 2 == 0]  # an even number of quotes before it
    opens = (a[outside] == ord("[")) | (a[outside] == ord("{"))
    depth = np.cumsum(np.where(opens, 1, -1), dtype=np.int64)
    return int(depth.max(initial=0)), int(np.count_nonzero(opens))


def _bad(message: str):
    raise HttpError(400, message, "invalid_json")


def _int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        _bad(f"the request body has an integer of {len(s.lstrip('-'))} digits; at most {MAX_INT_DIGITS}")
    return int(s)


def _float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        _bad(f"the request body has a number out of range ({s[:40]})")
    return v


def _constant(s: str):
    _bad(f"the request body has {s}, which is not JSON")


def _check_strings(x, path="body") -> None:
    if isinstance(x, str):
        if _SURROGATE.search(x):
            _bad(f"{path} has a lone surrogate (\\ud800-\\udfff), which is not valid Unicode")
    elif isinstance(x, dict):
        for k, v in x.items():
            _check_strings(k, path)
            _check_strings(v, f"{path}.{k}" if len(path) < 200 else path)
    elif isinstance(x, list):
        for v in x:
            _check_strings(v, path)


def parse_json(raw: bytes, max_depth: int = MAX_DEPTH, max_containers: int = MAX_CONTAINERS):
    """Parse a request body strictly; ``HttpError`` 400 (code ``invalid_json``) with one line otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _bad(f"the request body is not UTF-8 ({e.reason} at byte {e.start})")
    depth, containers = json_shape(raw)
    if depth > max_depth:
        _bad(f"the request body nests {depth} levels deep; at most {max_depth}")
    if containers > max_containers:  # each is a Python object the garbage collector then walks, GIL held
        _bad(f"the request body has {containers} JSON objects and arrays; at most {max_containers}")
    try:
        obj = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except HttpError:
        raise
    except json.JSONDecodeError as e:
        _bad(f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    except (ValueError, RecursionError) as e:
        _bad(f"the request body is not valid JSON ({' '.join(str(e).split())[:100]})")
    if _SURROGATE_ESCAPE.search(raw):  # only then can a parsed string hold a lone surrogate (raw UTF-8 cannot)
        _check_strings(obj)
    return obj
