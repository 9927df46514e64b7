"""OpenAI-compatible HTTP server (starlette + uvicorn) over a continuously batching ``Scheduler``.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (``stream: true`` answers
server-sent events), GET /health, GET /metrics (Prometheus text). With an API key, /v1/* needs
``Authorization: Bearer KEY``. A client that disconnects cancels its generation.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass

from .errors import EngineError
from .openai_api import BadRequest, chunk, error_body, full_response, new_id, parse
from .scheduler import QueueFull, Scheduler


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    model_name: str | None = None
    default_max_tokens: int = 256  # when a request gives no max_tokens (completions use OpenAI's 16)

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise EngineError(f"port must be in 0..65535, got {self.port}")
        if self.max_batch < 1:
            raise EngineError(f"max-batch must be at least 1, got {self.max_batch}")
        if self.max_queue < 0:
            raise EngineError(f"max-queue must be >= 0, got {self.max_queue}")
        if self.api_key is not None and not self.api_key:
            raise EngineError("the API key must not be empty")


def _json(obj, status=200):
    from starlette.responses import JSONResponse

    return JSONResponse(obj, status_code=status)


def _err(status: int, message: str, type_="invalid_request_error", param=None, code=None):
    return _json(error_body(message, type_, param, code), status)


class _Events:
    """An ASGI response that relays a request's text as server-sent events and cancels it on disconnect."""

    def __init__(self, app_state, seq, queue: asyncio.Queue, rid: str, chat: bool, model: str, usage: bool):
        self.st, self.seq, self.q, self.rid, self.chat, self.model, self.usage = \
            app_state, seq, queue, rid, chat, model, usage

    async def __call__(self, scope, receive, send):
        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.seq.cancel()

        watcher = asyncio.create_task(watch())
        status = 499  # until the stream completes
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache")]})

            async def emit(obj):
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + json.dumps(obj).encode() + b"\n\n"})

            if self.chat:
                await emit(chunk(self.rid, True, self.model, role=True))
            while True:
                kind, val = await self.q.get()
                if kind == "text":
                    await emit(chunk(self.rid, self.chat, self.model, text=val))
                    continue
                seq = val
                status = 200
                if seq.finish_reason == "error":
                    status = 500
                    await emit(error_body(f"generation failed: {getattr(seq, 'error', '')}", "server_error"))
                elif seq.finish_reason == "cancelled":
                    status = 499
                else:
                    await emit(chunk(self.rid, self.chat, self.model, finish=seq.finish_reason))
                    if self.usage:
                        from .openai_api import usage

                        await emit(chunk(self.rid, self.chat, self.model, usage_=usage(seq)))
                break
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        except (OSError, asyncio.CancelledError):
            self.seq.cancel()
            raise
        finally:
            watcher.cancel()
            self.seq.cancel()
            self.st.count("chat" if self.chat else "completions", status)


class App:
    def __init__(self, engine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.model = config.model_name or engine.model_name
        self.scheduler = Scheduler(engine, config.max_batch, config.max_queue)
        self.started = time.time()

    def count(self, endpoint: str, status: int) -> None:
        m = self.scheduler.metrics
        with m.lock:
            m.requests[(endpoint, status)] += 1

    # ---- helpers ---------------------------------------------------------------------------------
    def _auth(self, request):
        if self.config.api_key is None:
            return None
        h = request.headers.get("authorization", "")
        if h != f"Bearer {self.config.api_key}":
            return _err(401, "invalid or missing API key; send 'Authorization: Bearer KEY'",
                        "invalid_request_error", None, "invalid_api_key")
        return None

    async def _generate(self, request, chat: bool):
        endpoint = "chat" if chat else "completions"
        denied = self._auth(request)
        if denied is not None:
            self.count(endpoint, 401)
            return denied
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.count(endpoint, 400)
            return _err(400, f"the request body is not valid JSON ({e})", code="invalid_json")
        try:
            default = self.config.default_max_tokens if chat else 16
            p = parse(body, self.engine, chat, self.model, default)
        except BadRequest as e:
            self.count(endpoint, 400)
            return _err(400, str(e), param=e.param, code=e.code)
        from .generate import Sequence

        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def put(item):  # called from the scheduler thread
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        on_text = (lambda d: put(("text", d))) if p.stream else None
        seq = Sequence(p.prompt_ids, p.config, self.engine.tokenizer, self.engine.eos_ids, on_text=on_text,
                       context=self.engine.context_length)
        try:
            self.scheduler.submit(seq, lambda s: put(("done", s)))
        except QueueFull as e:
            self.count(endpoint, 429)
            return _err(429, str(e), "rate_limit_error", code="queue_full")
        except EngineError as e:
            self.count(endpoint, 503)
            return _err(503, str(e), "server_error")
        rid = new_id(chat)
        if p.stream:
            return _Events(self, seq, q, rid, chat, p.model, p.include_usage)

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            seq.cancel()

        watcher = asyncio.create_task(watch())
        try:
            while True:
                kind, val = await q.get()
                if kind == "done":
                    break
        except asyncio.CancelledError:
            seq.cancel()
            raise
        finally:
            watcher.cancel()
        if seq.finish_reason == "cancelled":
            self.count(endpoint, 499)
            return _err(499, "the client closed the request")
        if seq.finish_reason == "error":
            self.count(endpoint, 500)
            return _err(500, f"generation failed: {getattr(seq, 'error', '')}", "server_error")
        self.count(endpoint, 200)
        return _json(full_response(rid, chat, p.model, seq))

    # ---- routes --------------------------------------------------------------------------------------
    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def chat(self, request):
        return await self._generate(request, chat=True)

    async def models(self, request):
        denied = self._auth(request)
        if denied is not None:
            return denied
        return _json({"object": "list", "data": [{"id": self.model, "object": "model",
                                                  "created": int(self.started), "owned_by": "llmkiln"}]})

    async def health(self, request):
        return _json({"status": "ok", "model": self.model, "active": self.scheduler.active,
                      "queued": self.scheduler.queued, **self.engine.backend.describe()})

    async def metrics(self, request):
        from starlette.responses import PlainTextResponse

        return PlainTextResponse(self.prometheus(), media_type="text/plain; version=0.0.4")

    def prometheus(self) -> str:
        m, s = self.scheduler.metrics, self.scheduler
        with m.lock:
            lines = ["# HELP kiln_requests_total Requests by endpoint and HTTP status.",
                     "# TYPE kiln_requests_total counter"]
            for (ep, st), n in sorted(m.requests.items()):
                lines.append(f'kiln_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            rows = [("kiln_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", m.prompt_tokens),
                    ("kiln_generated_tokens_total", "counter", "Tokens generated.", m.completion_tokens),
                    ("kiln_requests_cancelled_total", "counter", "Requests stopped by a client disconnect.",
                     m.cancelled),
                    ("kiln_requests_rejected_total", "counter", "Requests refused with 429 (queue full).",
                     m.rejected_full),
                    ("kiln_decode_steps_total", "counter", "Batched decode steps.", m.steps),
                    ("kiln_decode_rows_total", "counter", "Sum of batch rows over decode steps.", m.step_rows),
                    ("kiln_decode_seconds_total", "counter", "Time spent in decode steps.", m.step_seconds),
                    ("kiln_time_to_first_token_seconds_sum", "counter", "Sum of time to first token.", m.ttft_sum),
                    ("kiln_time_to_first_token_seconds_count", "counter", "Requests with a first token.",
                     m.ttft_count),
                    ("kiln_active_requests", "gauge", "Requests decoding now.", s.active),
                    ("kiln_queued_requests", "gauge", "Requests waiting for a batch slot.", s.queued)]
        for name, typ, help_, v in rows:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {typ}", f"{name} {v}"]
        return "\n".join(lines) + "\n"

    def asgi(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.metrics, methods=["GET"])]
        async def not_found(request, exc):
            return _err(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        code="not_found" if exc.status_code == 404 else "method_not_allowed")

        return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})

    def close(self) -> None:
        self.scheduler.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family = infos[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise EngineError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def make_server(engine, config: ServerConfig, sock: socket.socket | None = None):
    """(uvicorn.Server, App, socket): call ``server.run(sockets=[sock])``, or run it in a thread."""
    import uvicorn

    app = App(engine, config)
    sock = sock or bind(config.host, config.port)
    ucfg = uvicorn.Config(app.asgi(), log_level="warning", access_log=False, lifespan="off",
                          timeout_graceful_shutdown=2)
    return uvicorn.Server(ucfg), app, sock


def serve(engine, config: ServerConfig, on_ready=None) -> None:
    """Serve until interrupted. ``on_ready(url)`` is called once the socket listens."""
    server, app, sock = make_server(engine, config)
    host, port = sock.getsockname()[:2]
    if on_ready:
        on_ready(f"http://{host}:{port}")
    try:
        server.run(sockets=[sock])
    finally:
        app.close()
        sock.close()
