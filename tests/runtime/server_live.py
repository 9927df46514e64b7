"""A real server on 127.0.0.1 (a free port) in a thread, and raw-HTTP helpers for the server tests."""
from __future__ import annotations

import http.client
import json
import re
import threading
import time

import openai

from runtime.server import ServerConfig, make_server

JSON = {"Content-Type": "application/json"}


class Live:
    def __init__(self, engine, scheduler=None, **kw):
        self.server, self.app, sock = make_server(engine, ServerConfig(port=0, **kw), scheduler=scheduler)
        self.port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(250):
            if self.server.started:
                break
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = self.app.model

    def client(self, key="none", timeout=60):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=timeout)

    def raw(self, method, path, body=None, headers=None, timeout=30):
        """(status, body bytes, headers dict) of one request."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
        finally:
            c.close()

    def post(self, path, body, headers=None, timeout=30):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.raw("POST", path, data, {**JSON, **(headers or {})}, timeout)

    def error(self, body, path="/v1/completions", headers=None):
        """(status, error object) of a request that must be refused with an OpenAI-style body."""
        status, data, _ = self.post(path, body, headers)
        err = json.loads(data)["error"]
        assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"]
        return status, err

    def metrics(self) -> str:
        return self.raw("GET", "/metrics")[1].decode()

    def metric(self, name, labels: str | None = None) -> float:
        key = re.escape(name + (f"{{{labels}}}" if labels else ""))
        m = re.search(rf"^{key} (\S+)$", self.metrics(), re.M)
        return float(m.group(1)) if m else 0.0

    def requests(self, endpoint, status) -> float:
        return self.metric("kiln_requests_total", f'endpoint="{endpoint}",status="{status}"')

    def wait_metric(self, name, value, timeout=5.0) -> float:
        end = time.monotonic() + timeout
        while True:
            v = self.metric(name)
            if v == value or time.monotonic() > end:
                return v
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.app.close()
