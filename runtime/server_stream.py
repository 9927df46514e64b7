"""Relaying a request's progress from the scheduler thread to its HTTP client: ``Events`` streams server-sent
events, ``Waiter`` waits for a non-streaming request; both cancel the request when the client disconnects."""
from __future__ import annotations

import asyncio
import json

from .openai_shapes import chat_logprobs, chunk, completion_logprobs, error_body, finish_reason, usage


async def _watch(receive, seq) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    seq.cancel()


class Waiter:
    def __init__(self, request, seq, queue: asyncio.Queue):
        self.request, self.seq, self.q = request, seq, queue

    async def wait(self) -> None:
        watcher = asyncio.create_task(_watch(self.request.receive, self.seq))
        try:
            while (await self.q.get())[0] != "done":
                pass
        except asyncio.CancelledError:
            self.seq.cancel()
            raise
        finally:
            watcher.cancel()


class Events:
    """An ASGI response that relays a request's text (and logprobs) as server-sent events."""

    def __init__(self, app, seq, queue: asyncio.Queue, rid: str, chat: bool, parsed):
        self.app, self.seq, self.q, self.rid, self.chat, self.p = app, seq, queue, rid, chat, parsed
        self.sent = 0  # logprob entries sent so far
        self.offset = len(parsed.prompt_text or "")  # completions: text offset of the next token

    def _logprobs(self, upto: int):
        if self.p.config.logprobs is None:
            return None
        entries = self.seq.logprobs[self.sent:upto]
        self.sent = max(self.sent, upto)
        if self.chat:
            return chat_logprobs(entries, self.app.token_text)
        lp = completion_logprobs(entries, self.app.token_text, self.offset)
        self.offset += sum(len(t) for t in lp["tokens"])
        return lp

    async def __call__(self, scope, receive, send):
        watcher = asyncio.create_task(_watch(receive, self.seq))
        status = 499  # until the stream completes
        model = self.p.model
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache")]})

            async def emit(obj):
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + json.dumps(obj).encode() + b"\n\n"})

            if self.chat:
                await emit(chunk(self.rid, True, model, role=True))
            while True:
                kind, val, n = await self.q.get()
                if kind == "text":
                    await emit(chunk(self.rid, self.chat, model, text=val, logprobs=self._logprobs(n)))
                    continue
                seq = val
                status = 200
                if seq.finish_reason == "error":
                    status = 500
                    await emit(error_body(f"generation failed: {seq.error}", "server_error", None,
                                          "generation_failed"))
                elif seq.finish_reason == "cancelled":
                    status = 499
                else:
                    rest = len(seq.logprobs)
                    await emit(chunk(self.rid, self.chat, model, finish=finish_reason(seq),
                                     logprobs=self._logprobs(rest) if rest > self.sent else None))
                    if self.p.include_usage:
                        await emit(chunk(self.rid, self.chat, model, usage_=usage(seq)))
                break
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        except (OSError, asyncio.CancelledError):
            self.seq.cancel()
            raise
        finally:
            watcher.cancel()
            self.seq.cancel()
            self.app.count("chat" if self.chat else "completions", status)
