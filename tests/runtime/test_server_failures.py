"""An error in one request's prefill or decode step fails that request only; a dead worker makes /health
answer 503 and new requests 503 (issue 15, item 4). The failures are real exceptions raised by a test-side
subclass of the real ONNX Runtime backend for chosen inputs."""
import json
import threading

import numpy as np
import pytest

from runtime import Engine
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.generate import Batch
from runtime.scheduler import Scheduler
from tests.runtime.server_live import Live

POISON = 7  # a prompt holding this token id fails in prefill
POISON_POS = 300  # a decode step feeding this position fails


class PoisonBackend(OnnxRuntimeBackend):
    def forward(self, cache, input_ids, attention_mask, position_ids, last_only=True):
        ids, pos = np.asarray(input_ids), np.asarray(position_ids)
        if (ids == POISON).any():
            raise RuntimeError("poisoned prompt token")
        if ids.shape[1] == 1 and (pos == POISON_POS).any() or ids.shape[1] > 1 and (pos[:, -1] >= POISON_POS).any():
            raise RuntimeError("poisoned position")
        return super().forward(cache, input_ids, attention_mask, position_ids, last_only)


@pytest.fixture(scope="module")
def poison_engine(tiny_onnx, tiny_engine):
    be = PoisonBackend(tiny_onnx, tiny_engine.manifest, threads=1)
    return Engine(tiny_onnx, tiny_engine.manifest, be, tiny_engine.tokenizer)


@pytest.fixture(scope="module")
def live(poison_engine):
    srv = Live(poison_engine, max_batch=4, max_queue=8)
    yield srv
    srv.close()


def _ids(engine, text):
    return [t for t in engine.tokenizer.encode(text) if t != POISON]


def _run(live, body, out, key):
    status, data, _ = live.post("/v1/completions", body, timeout=120)
    out[key] = (status, json.loads(data))


def test_failed_prefill_fails_only_that_request(live, poison_engine):
    good = _ids(poison_engine, "The module of the text")
    ref = poison_engine.generate(good, max_new_tokens=40, ignore_eos=True).text
    failed0 = live.metric("kiln_requests_failed_total")
    out = {}
    threads = [threading.Thread(target=_run, args=(live, {"prompt": good, "max_tokens": 40, "temperature": 0,
                                                           "ignore_eos": True}, out, "good")),
               threading.Thread(target=_run, args=(live, {"prompt": good[:3] + [POISON] + good[3:],
                                                           "max_tokens": 40, "ignore_eos": True}, out, "bad"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out["good"][0] == 200 and out["good"][1]["choices"][0]["text"] == ref
    status, body = out["bad"]
    assert status == 500 and body["error"]["code"] == "generation_failed"
    assert "poisoned prompt token" in body["error"]["message"]
    assert live.metric("kiln_requests_failed_total") == failed0 + 1
    assert json.loads(live.raw("GET", "/health")[1])["worker"] == "alive"


def test_failed_step_fails_only_that_row(live, poison_engine):
    """A row reaching POISON_POS fails at that decode step; the rows decoding with it carry on, token for
    token as they would alone."""
    short = _ids(poison_engine, "The module")
    long = _ids(poison_engine, "word " * 400)[:POISON_POS - 10]  # reaches POISON_POS after 10 tokens
    refs = [poison_engine.generate(short, max_new_tokens=60, ignore_eos=True).text,
            poison_engine.generate(short[:2], max_new_tokens=60, ignore_eos=True).text]
    out = {}
    bodies = {"a": {"prompt": short, "max_tokens": 60, "temperature": 0, "ignore_eos": True},
              "b": {"prompt": short[:2], "max_tokens": 60, "temperature": 0, "ignore_eos": True},
              "bad": {"prompt": long, "max_tokens": 40, "temperature": 0, "ignore_eos": True}}
    threads = [threading.Thread(target=_run, args=(live, b, out, k)) for k, b in bodies.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out["a"][0] == 200 and out["a"][1]["choices"][0]["text"] == refs[0]
    assert out["b"][0] == 200 and out["b"][1]["choices"][0]["text"] == refs[1]
    assert out["bad"][0] == 500 and "poisoned position" in out["bad"][1]["error"]["message"]
    assert live.metric("kiln_active_requests") == 0


def test_failed_stream_ends_with_an_error_event(live, poison_engine):
    long = _ids(poison_engine, "word " * 400)[:POISON_POS - 3]
    status, data, _ = live.post("/v1/completions", {"prompt": long, "max_tokens": 20, "stream": True,
                                                    "ignore_eos": True})
    events = [json.loads(line[6:]) for line in data.decode().split("\n\n") if line.startswith("data: {")]
    assert status == 200 and events[-1]["error"]["code"] == "generation_failed"
    assert data.decode().rstrip().endswith("data: [DONE]")


class Crash(BaseException):
    """Not an Exception: nothing in the worker catches it, as with a bug that kills the thread."""


class CrashingBatch(Batch):
    def step(self):
        raise Crash("worker bug")


class CrashingScheduler(Scheduler):
    def new_batch(self):
        return CrashingBatch(self.engine.backend)


def test_dead_worker_makes_health_503(tiny_engine):
    sched = CrashingScheduler(tiny_engine, max_batch=2, max_queue=2)
    prev = threading.excepthook
    threading.excepthook = lambda args: None  # the thread's death is the point of the test
    srv = Live(tiny_engine, scheduler=sched)
    try:
        assert json.loads(srv.raw("GET", "/health")[1])["worker"] == "alive"
        status, data, _ = srv.post("/v1/completions", {"prompt": "hi", "max_tokens": 4}, timeout=30)
        assert status == 500 and "worker stopped" in json.loads(data)["error"]["message"]
        status, data, _ = srv.raw("GET", "/health")
        body = json.loads(data)
        assert status == 503 and body["worker"] == "stopped" and "worker bug" in body["error"]
        assert srv.metric("kiln_worker_alive") == 0
        status, data, headers = srv.post("/v1/completions", {"prompt": "hi", "max_tokens": 4})
        assert status == 503 and headers["retry-after"] == "5"
        assert json.loads(data)["error"]["type"] == "server_error"
    finally:
        threading.excepthook = prev
        srv.close()


class BrokenSubmit(Scheduler):
    def submit(self, seq, on_done):
        raise RuntimeError("a bug on the HTTP side")


def test_unexpected_exception_is_a_json_500(tiny_engine):
    srv = Live(tiny_engine, scheduler=BrokenSubmit(tiny_engine))
    try:
        status, data, _ = srv.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
        err = json.loads(data)["error"]
        assert status == 500 and err["type"] == "server_error" and err["code"] == "internal_error"
        assert "RuntimeError" in err["message"] and "bug" not in err["message"]  # no internals leak out
        assert srv.requests("completions", 500) == 1
        assert srv.raw("GET", "/health")[0] == 200
    finally:
        srv.close()
