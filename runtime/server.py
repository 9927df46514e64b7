"""OpenAI-compatible HTTP server (starlette + uvicorn) over a continuously batching ``Scheduler``.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (``stream: true`` answers
server-sent events), GET /health, GET /metrics (Prometheus text). With an API key, /v1/* needs
``Authorization: Bearer KEY``. A client that disconnects cancels its generation.

Every refusal is a JSON body ``{"error": {"message", "type", "param", "code"}}`` counted in /metrics. The event
loop only reads bodies (size-limited, with a timeout); parsing, templating and tokenizing run on a small
thread pool, generation on the scheduler's thread.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .errors import EngineError
from .sysinfo import mem_available
from .http_guard import HttpError, check_content_type, check_host, is_loopback, parse_json, read_body
from .openai_api import Limits, parse
from .openai_shapes import TokenText, error_body, full_response, new_id
from .scheduler import OverBudget, QueueFull, Scheduler, WorkerDown
from .server_stream import Events, Waiter

log = logging.getLogger("kiln.server")
KV_BUDGET_FRACTION = 0.5  # of MemAvailable, when --kv-budget-mb is not given


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    model_name: str | None = None
    default_max_tokens: int = 256  # chat, when a request gives no max_tokens (completions use OpenAI's 16)
    max_tokens_cap: int | None = 4096  # the most tokens one request may ask for (None: the context)
    kv_budget_mb: float | None = None  # None: KV_BUDGET_FRACTION of MemAvailable at start
    max_body_mb: float = 4.0
    body_timeout_s: float = 30.0
    max_connections: int = 128  # uvicorn's limit_concurrency: beyond it, 503 (bodies in memory <= this x max_body)

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise EngineError(f"port must be in 0..65535, got {self.port}")
        if self.max_batch < 1:
            raise EngineError(f"max-batch must be at least 1, got {self.max_batch}")
        if self.max_queue < 0:
            raise EngineError(f"max-queue must be >= 0, got {self.max_queue}")
        if self.api_key is not None and not self.api_key:
            raise EngineError("the API key must not be empty")
        for name in ("max_body_mb", "body_timeout_s", "max_connections", "default_max_tokens"):
            if getattr(self, name) <= 0:
                raise EngineError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.kv_budget_mb is not None and self.kv_budget_mb <= 0:
            raise EngineError(f"kv-budget-mb must be positive, got {self.kv_budget_mb}")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise EngineError(f"max-tokens-cap must be at least 1, got {self.max_tokens_cap}")


def max_prompt_chars(engine) -> int:
    """Characters beyond which a text cannot fit the context: context x (longest token's text + 1)."""
    tok = engine.tokenizer
    longest = max(len(tok.decode([i], skip_special_tokens=False)) for i in range(tok.vocab_size))
    return engine.context_length * (longest + 1)


def _json(obj, status=200, headers=None):
    from starlette.responses import JSONResponse

    return JSONResponse(obj, status_code=status, headers=headers)


def _err(e: HttpError):
    return _json(error_body(str(e), e.type, e.param, e.code), e.status, e.headers)


METRICS_HELP = {  # name: (type, help), in the order /metrics lists them
    "kiln_prompt_tokens_total": ("counter", "Prompt tokens of finished requests."),
    "kiln_generated_tokens_total": ("counter", "Tokens generated."),
    "kiln_requests_cancelled_total": ("counter", "Requests stopped by a client disconnect."),
    "kiln_requests_failed_total": ("counter", "Requests ended by an error in generation."),
    "kiln_requests_rejected_total": ("counter", "Requests refused with 429 (queue full)."),
    "kiln_decode_steps_total": ("counter", "Batched decode steps."),
    "kiln_decode_rows_total": ("counter", "Sum of batch rows over decode steps."),
    "kiln_decode_seconds_total": ("counter", "Time spent in decode steps."),
    "kiln_time_to_first_token_seconds_sum": ("counter", "Sum of time to first token."),
    "kiln_time_to_first_token_seconds_count": ("counter", "Requests with a first token."),
    "kiln_active_requests": ("gauge", "Requests decoding now."),
    "kiln_queued_requests": ("gauge", "Requests waiting for a batch slot."),
    "kiln_kv_reserved_bytes": ("gauge", "KV cache the running requests may need."),
    "kiln_kv_budget_bytes": ("gauge", "KV cache budget (0: unbounded)."),
    "kiln_kv_bytes_per_token": ("gauge", "KV cache one row takes per position."),
    "kiln_worker_alive": ("gauge", "1 while the generation worker runs."),
}


def prometheus_text(snap: dict, extra: tuple = ()) -> str:
    """Prometheus text of an ``App.snapshot()`` (``extra``: more (name, type, help, value) rows)."""
    lines = ["# HELP kiln_requests_total Requests by endpoint and HTTP status.",
             "# TYPE kiln_requests_total counter"]
    for (ep, st), n in sorted(snap["requests"].items()):
        lines.append(f'kiln_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
    values = {**snap["counters"], **snap["gauges"]}
    rows = [(name, typ, help_, values[name]) for name, (typ, help_) in METRICS_HELP.items() if name in values]
    for name, typ, help_, v in rows + list(extra):
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {typ}", f"{name} {v}"]
    return "\n".join(lines) + "\n"


class App:
    def __init__(self, engine, config: ServerConfig, scheduler: Scheduler | None = None):
        self.engine, self.config = engine, config
        self.model = config.model_name or engine.model_name
        if config.kv_budget_mb is not None:
            budget = int(config.kv_budget_mb * 2 ** 20)
        else:
            avail = mem_available()
            budget = int(avail * KV_BUDGET_FRACTION) if avail else None
        self.scheduler = scheduler or Scheduler(engine, config.max_batch, config.max_queue, budget)
        self.limits = Limits(self.model, engine.context_length, max_prompt_chars(engine),
                             config.default_max_tokens, config.max_tokens_cap)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kiln-parse")
        self.token_text = TokenText(engine.tokenizer)
        self.loopback = is_loopback(config.host)
        self.started = time.time()
        self._key = f"Bearer {config.api_key}".encode() if config.api_key is not None else None

    def count(self, endpoint: str, status: int) -> None:
        m = self.scheduler.metrics
        with m.lock:
            m.requests[(endpoint, status)] += 1

    # ---- request handling ----------------------------------------------------------------------------
    def _auth(self, request) -> None:
        if self._key is None:
            return
        got = request.headers.get("authorization", "").encode("latin-1", "replace")
        if not hmac.compare_digest(got, self._key):
            raise HttpError(401, "invalid or missing API key; send 'Authorization: Bearer KEY'",
                            "invalid_api_key")

    def route(self, endpoint: str, handler, auth: bool):
        """Wrap a handler: Host and auth checks, HttpError -> JSON, anything else -> JSON 500, all counted."""
        async def run(request):
            try:
                check_host(request.headers, self.loopback)
                if auth:
                    self._auth(request)
                resp = await handler(request)
            except HttpError as e:
                resp = _err(e)
            except Exception as e:
                log.exception("%s %s failed", request.method, request.url.path)
                resp = _err(HttpError(500, f"internal error ({type(e).__name__})", "internal_error",
                                      type_="server_error"))
            if not isinstance(resp, Events):  # a stream counts itself when it ends
                self.count(endpoint, resp.status_code)
            return resp

        return run

    def _parse(self, raw: bytes, chat: bool):
        return parse(parse_json(raw), self.engine, chat, self.limits)

    async def _generate(self, request, chat: bool):
        check_content_type(request.headers)
        raw = await read_body(request, int(self.config.max_body_mb * 2 ** 20), self.config.body_timeout_s)
        loop = asyncio.get_running_loop()
        p = await loop.run_in_executor(self.pool, self._parse, raw, chat)
        del raw
        from .generate import Sequence

        q: asyncio.Queue = asyncio.Queue()

        def put(item):  # called from the scheduler thread
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        holder = []
        on_text = (lambda d: put(("text", d, len(holder[0].logprobs)))) if p.stream else None
        seq = Sequence(p.prompt_ids, p.config, self.engine.tokenizer, self.engine.eos_ids, on_text=on_text,
                       context=self.engine.context_length)
        holder.append(seq)
        try:
            self.scheduler.submit(seq, lambda s: put(("done", s, 0)))
        except OverBudget as e:
            raise HttpError(400, str(e), "kv_budget_exceeded", "max_tokens") from None
        except QueueFull as e:
            raise HttpError(429, str(e), "queue_full", type_="rate_limit_error", headers={"Retry-After": "1"}) \
                from None
        except WorkerDown as e:
            raise HttpError(503, str(e), "unavailable", type_="server_error", headers={"Retry-After": "5"}) \
                from None
        rid = new_id(chat)
        if p.stream:
            return Events(self, seq, q, rid, chat, p)
        await Waiter(request, seq, q).wait()
        if seq.finish_reason == "cancelled":
            raise HttpError(499, "the client closed the request", "cancelled")
        if seq.finish_reason == "error":
            raise HttpError(500, f"generation failed: {seq.error}", "generation_failed", type_="server_error")
        return _json(full_response(rid, chat, p.model, seq, p, self.token_text))

    # ---- routes --------------------------------------------------------------------------------------
    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def chat(self, request):
        return await self._generate(request, chat=True)

    async def models(self, request):
        return _json({"object": "list", "data": [{"id": self.model, "object": "model",
                                                  "created": int(self.started), "owned_by": "llmkiln"}]})

    async def health(self, request):
        s = self.scheduler
        alive = s.alive
        body = {"status": "ok" if alive else "unavailable", "worker": "alive" if alive else "stopped",
                "model": self.model, "active": s.active, "queued": s.queued, **self.engine.backend.describe()}
        if s.crash:
            body["error"] = s.crash
        return _json(body, 200 if alive else 503)

    async def metrics(self, request):
        from starlette.responses import PlainTextResponse

        return PlainTextResponse(self.prometheus(), media_type="text/plain; version=0.0.4")

    def snapshot(self) -> dict:
        """The figures /metrics reports as plain data: ``requests`` {(endpoint, status): n}, ``counters`` and
        ``gauges`` {name: value} (a replicated server adds its replicas' snapshots up)."""
        m, s = self.scheduler.metrics, self.scheduler
        with m.lock:
            counters = {"kiln_prompt_tokens_total": m.prompt_tokens,
                        "kiln_generated_tokens_total": m.completion_tokens,
                        "kiln_requests_cancelled_total": m.cancelled, "kiln_requests_failed_total": m.failed,
                        "kiln_requests_rejected_total": m.rejected_full, "kiln_decode_steps_total": m.steps,
                        "kiln_decode_rows_total": m.step_rows, "kiln_decode_seconds_total": m.step_seconds,
                        "kiln_time_to_first_token_seconds_sum": m.ttft_sum,
                        "kiln_time_to_first_token_seconds_count": m.ttft_count}
            requests = dict(m.requests)
        gauges = {"kiln_active_requests": s.active, "kiln_queued_requests": s.queued,
                  "kiln_kv_reserved_bytes": s.kv_reserved, "kiln_kv_budget_bytes": s.kv_budget or 0,
                  "kiln_kv_bytes_per_token": s.kv_per_token, "kiln_worker_alive": int(s.alive)}
        return {"requests": requests, "counters": counters, "gauges": gauges}

    def prometheus(self) -> str:
        return prometheus_text(self.snapshot())

    def asgi(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [Route("/v1/models", self.route("models", self.models, True), methods=["GET"]),
                  Route("/v1/completions", self.route("completions", self.completions, True), methods=["POST"]),
                  Route("/v1/chat/completions", self.route("chat", self.chat, True), methods=["POST"]),
                  Route("/health", self.route("health", self.health, False), methods=["GET"]),
                  Route("/metrics", self.route("metrics", self.metrics, False), methods=["GET"])]

        async def not_found(request, exc):
            code = "not_found" if exc.status_code == 404 else "method_not_allowed"
            self.count("other", exc.status_code)
            return _err(HttpError(exc.status_code, f"{request.method} {request.url.path[:200]}: {exc.detail}", code))

        return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})

    def close(self) -> None:
        self.scheduler.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


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


def make_server(engine, config: ServerConfig, sock: socket.socket | None = None, scheduler=None):
    """(uvicorn.Server, App, socket): call ``server.run(sockets=[sock])``, or run it in a thread."""
    app = App(engine, config, scheduler)
    sock = sock or bind(config.host, config.port)
    return uvicorn_server(app.asgi(), config), app, sock


def uvicorn_server(asgi, config: ServerConfig):
    """The uvicorn.Server every kiln server runs (the replicated front end too)."""
    import uvicorn

    ucfg = uvicorn.Config(asgi, log_level="warning", access_log=False, lifespan="off",
                          timeout_graceful_shutdown=2, limit_concurrency=config.max_connections,
                          timeout_keep_alive=5, server_header=False)
    return uvicorn.Server(ucfg)


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

