"""The HTTP front end of `kiln serve --replicas`: an ASGI app in the `kiln serve` process that hands each
request to a Ray Serve replica (``runtime.ray_replica``) through a DeploymentHandle and relays the replica's
ASGI messages back, so routes, auth, limits and SSE are the plain server's own. It answers two things itself:
GET /health (the live replicas) and GET /metrics (every replica's figures added up); and it ends a request
whose replica died: before the response started it is sent to another replica (twice at most), after it
started a stream ends with an error event.

The figures come from each replica's ``record_routing_stats`` (Serve's per-replica stats hook), called on the
replica actors directly: a request through the handle would wait behind a busy replica's max_ongoing_requests.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging

from .http_guard import HttpError, check_host, is_loopback
from .openai_shapes import error_body
from .ray_replica import SCOPE_KEYS

log = logging.getLogger("kiln.ray")
ENDPOINTS = {"/v1/models": "models", "/v1/completions": "completions", "/v1/chat/completions": "chat",
             "/health": "health", "/metrics": "metrics"}
RETRIES = 2  # a request whose replica died before answering goes to another one this many times
SUMMED = ("kiln_active_requests", "kiln_queued_requests", "kiln_kv_reserved_bytes", "kiln_kv_budget_bytes",
          "kiln_worker_alive")
SCRAPE_TIMEOUT_S = 5.0


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _dumps(obj) -> bytes:
    """JSON bytes as starlette's JSONResponse (the replicas' answers) writes them."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _is_sse(start_message) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
               for k, v in start_message.get("headers", ()))


def _reason(e: BaseException) -> str:
    return f"the replica serving this request stopped ({type(e).__name__})"


class Front:
    """``handle``: the replicas' DeploymentHandle; ``config``: the ServerConfig every replica runs;
    ``replicas``: a blocking callable returning Serve's list of the deployment's replicas (dicts with
    replica_id, state, actor_name), from the controller."""

    def __init__(self, handle, config, replicas):
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        self.handle, self.config, self.replicas = handle, config, replicas
        self._actors: dict = {}  # actor name -> handle
        self.stream = handle.options(stream=True)
        self.loopback = is_loopback(config.host)
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) answered here
        self.failed = 0  # requests ended because their replica died
        self._lost = (RayActorError, ActorUnavailableError, DeploymentUnavailableError)
        self._backpressure = BackPressureError

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path in ("/health", "/metrics") and method in ("GET", "HEAD"):
            await self._local(path, scope, receive, send)
        else:
            await self._relay(scope, receive, send)

    # ---- relaying ------------------------------------------------------------------------------------
    async def _read(self, scope, receive) -> tuple[bytes, str]:
        """The body as the replica's App will read it: (bytes, how it ended). A body the App refuses by its
        headers alone (Content-Length past the limit or not a number) is not read."""
        limit = int(self.config.max_body_mb * 2 ** 20)
        cl = _header(scope, b"content-length")
        if cl is not None and (not cl.strip().isdigit() or int(cl) > limit or int(cl) == 0):
            return b"", "end"
        if cl is None and _header(scope, b"transfer-encoding") is None:
            return b"", "end"
        parts, n = [], 0

        async def read() -> str:
            nonlocal n
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return "disconnect"
                chunk = msg.get("body", b"")
                n += len(chunk)
                parts.append(chunk)
                if n > limit:
                    return "over"
                if not msg.get("more_body", False):
                    return "end"

        try:
            end = await asyncio.wait_for(read(), self.config.body_timeout_s)
        except asyncio.TimeoutError:
            end = "timeout"
        body = b"".join(parts)
        return (body[:limit + 1] if end == "over" else body), end

    async def _relay(self, scope, receive, send):
        endpoint = ENDPOINTS.get(scope["path"], "other")
        body, end = await self._read(scope, receive)
        req = {k: scope[k] for k in SCOPE_KEYS if k in scope}
        gone = asyncio.Event()
        current: list = []

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if current:
                current[-1].cancel()

        watcher = asyncio.ensure_future(watch()) if end != "disconnect" else None
        started = sse = False
        try:
            for attempt in range(RETRIES + 1):
                gen = self.stream.http.remote(req, body, end)
                current.append(gen)
                try:
                    async for batch in gen:
                        for msg in batch:
                            if msg["type"] == "http.response.start":
                                started, sse = True, _is_sse(msg)
                            await send(msg)
                    return
                except asyncio.CancelledError:  # the server stops, or (behind Serve's proxy) the client left
                    gen.cancel()
                    raise
                except Exception as e:
                    if gone.is_set():  # the client left; the replica counted it (or never got it)
                        return
                    if isinstance(e, self._backpressure) and not started:
                        await self._answer(send, endpoint, HttpError(
                            429, f"the queue is full ({self.config.max_queue} requests waiting); retry later",
                            "queue_full", type_="rate_limit_error", headers={"Retry-After": "1"}))
                        return
                    lost = isinstance(e, self._lost)
                    if lost and not started and attempt < RETRIES:
                        log.warning("%s; sending the request to another replica", _reason(e))
                        continue
                    await self._fail(send, endpoint, started, sse, e, lost)
                    return
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _fail(self, send, endpoint, started, sse, e, lost):
        self.failed += 1
        reason = _reason(e) if lost else f"internal error ({type(e).__name__})"
        if not lost:
            log.error("a replica failed a request: %s", " ".join(str(e).split())[:500])
        try:
            if not started:
                await self._answer(send, endpoint, HttpError(
                    503, f"{reason}; retry", "replica_unavailable", type_="server_error",
                    headers={"Retry-After": "1"}))
                return
            self.requests[(endpoint, 500)] += 1
            tail = b""
            if sse:
                err = error_body(f"generation failed: {reason}", "server_error", None, "replica_failed")
                tail = b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n"
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        except OSError:  # the client is gone as well
            pass

    async def _answer(self, send, endpoint, e: HttpError, count=True):
        body = _dumps(error_body(str(e), e.type, e.param, e.code))
        await self._send_json(send, e.status, body, e.headers)
        if count:
            self.requests[(endpoint, e.status)] += 1

    @staticmethod
    async def _send_json(send, status, body: bytes, headers=None, ctype=b"application/json"):
        hs = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
        hs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": hs})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # ---- /health and /metrics ------------------------------------------------------------------------
    async def _local(self, path, scope, receive, send):
        endpoint = ENDPOINTS[path]
        try:
            check_host({"host": _header(scope, b"host")} if _header(scope, b"host") is not None else {},
                       self.loopback)
            if path == "/health":
                status, body = await self.health()
                await self._send_json(send, status, _dumps(body))
            else:
                text = (await self.prometheus()).encode()
                status = 200
                await self._send_json(send, 200, text, ctype=b"text/plain; version=0.0.4; charset=utf-8")
        except HttpError as e:
            status = e.status
            await self._answer(send, endpoint, e, count=False)
        except Exception as e:
            log.exception("%s failed", path)
            status = 500
            await self._answer(send, endpoint, HttpError(500, f"internal error ({type(e).__name__})",
                                                         "internal_error", type_="server_error"), count=False)
        self.requests[(endpoint, status)] += 1

    def _list(self) -> tuple[dict, list]:
        """(replica states {state: n}, actor handles of the running replicas); blocking."""
        import ray

        from .ray_replica import SERVE_NAMESPACE

        reps = self.replicas()
        states = dict(collections.Counter(str(r["state"]).rsplit(".", 1)[-1] for r in reps))
        handles = []
        for r in reps:
            name = r.get("actor_name")
            if str(r["state"]).endswith("RUNNING") and name:
                if name not in self._actors:
                    try:
                        self._actors[name] = ray.get_actor(name, namespace=SERVE_NAMESPACE)
                    except ValueError:  # gone since the controller listed it
                        continue
                handles.append(self._actors[name])
        live = {r.get("actor_name") for r in reps}
        self._actors = {k: v for k, v in self._actors.items() if k in live}
        return states, handles

    async def scrape(self) -> tuple[list[dict], dict | None]:
        """(every running replica's snapshot, Serve's replica states); a replica that does not answer in time
        is left out."""
        loop = asyncio.get_running_loop()
        try:
            states, handles = await asyncio.wait_for(loop.run_in_executor(None, self._list), SCRAPE_TIMEOUT_S)
        except Exception as e:
            log.warning("could not list the replicas (%s)", type(e).__name__)
            return [], None

        async def one(h):
            try:
                return await asyncio.wait_for(h.record_routing_stats.remote(), SCRAPE_TIMEOUT_S)
            except Exception:
                return None

        got = await asyncio.gather(*(one(h) for h in handles))
        return [r for r in got if isinstance(r, dict) and "metrics" in r], states

    async def health(self) -> tuple[int, dict]:
        snaps, states = await self.scrape()
        live = [s for s in snaps if s["alive"]]
        body = {"status": "ok" if live else "unavailable", "worker": "alive" if live else "stopped",
                "model": snaps[0]["model"] if snaps else self.config.model_name,
                "active": sum(s["active"] for s in snaps),
                "queued": sum(s["queued"] for s in snaps), **(snaps[0]["backend"] if snaps else {}),
                "replicas": len(live), "replica_states": states,
                "replica_list": [self._replica_row(s) for s in snaps]}
        return (200 if live else 503), body

    @staticmethod
    def _replica_row(s: dict) -> dict:
        row = {k: s[k] for k in ("replica", "pid", "node", "alive", "active", "queued")}
        row["generated_tokens"] = s["metrics"]["counters"]["kiln_generated_tokens_total"]
        if s["crash"]:
            row["error"] = s["crash"]
        return row

    async def prometheus(self) -> str:
        from .server import METRICS_HELP, prometheus_text

        snaps, _ = await self.scrape()
        requests = collections.Counter(self.requests)
        counters = collections.Counter({n: 0 for n, (typ, _) in METRICS_HELP.items() if typ == "counter"})
        counters["kiln_requests_failed_total"] += self.failed
        gauges = {n: 0 for n, (typ, _) in METRICS_HELP.items() if typ == "gauge"}
        for s in snaps:
            m = s["metrics"]
            requests.update({(ep, st): n for ep, st, n in m["requests"]})
            counters.update(m["counters"])
            for name in SUMMED:
                gauges[name] += m["gauges"][name]
            gauges["kiln_kv_bytes_per_token"] = max(gauges["kiln_kv_bytes_per_token"],
                                                    m["gauges"]["kiln_kv_bytes_per_token"])
        help_ = "Replicas that answered this scrape (the figures above are their sums)."
        extra = (("kiln_replicas", "gauge", help_, len(snaps)),)
        snap = {"requests": dict(requests), "counters": dict(counters), "gauges": gauges}
        return prometheus_text(snap, extra)


class FrontDeployment:
    """The front end as a Serve deployment behind Ray's own HTTP proxy, for Serve config files and KubeRay
    RayService (``runtime.ray_serve:build_app``); wrapped with ``serve.ingress()`` there."""

    def __init__(self, replicas_handle, config: dict, deployment: str):
        import ray
        from ray import serve

        from .ray_replica import keep_grpc_on_loopback, replica_details
        from .server import ServerConfig

        if is_loopback(ray.util.get_node_ip_address()):
            keep_grpc_on_loopback()

        app = serve.get_replica_context().app_name
        self.front = Front(replicas_handle, ServerConfig(**config), lambda: replica_details(app, deployment))

    def __serve_build_asgi_app__(self):
        return self.front
