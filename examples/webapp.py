"""A tiny web app that streams tokens from an embedded Engine to the browser (starlette + uvicorn).

    python examples/webapp.py ART [--port 8080]     then open http://127.0.0.1:8080/

GET / serves a page with a prompt box; GET /generate?prompt=... streams the answer as plain text chunks.
"""
import argparse
import asyncio
import threading

import uvicorn
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from runtime import Engine, EngineError

PAGE = """<!doctype html><title>llmkiln</title>
<input id=p size=60 value="Write a haiku about compilers"> <button onclick=go()>ask</button><pre id=o></pre>
<script>
async function go() {
  const o = document.getElementById('o'); o.textContent = '';
  const r = await fetch('/generate?prompt=' + encodeURIComponent(document.getElementById('p').value));
  const rd = r.body.getReader(), dec = new TextDecoder();
  for (;;) { const {done, value} = await rd.read(); if (done) break; o.textContent += dec.decode(value); }
}
</script>"""


def make_app(engine: Engine, max_new_tokens: int = 128) -> Starlette:
    lock = threading.Lock()  # one generation at a time on this engine

    async def page(request):
        return HTMLResponse(PAGE)

    async def generate(request):
        prompt = request.query_params.get("prompt", "").strip()
        if not prompt:
            return PlainTextResponse("missing ?prompt=", status_code=400)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def work():
            try:
                with lock:
                    for delta in engine.stream([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens):
                        loop.call_soon_threadsafe(queue.put_nowait, delta)
            except EngineError as e:
                loop.call_soon_threadsafe(queue.put_nowait, f"\n[error: {e}]")
            loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=work, daemon=True).start()

        async def chunks():
            while (delta := await queue.get()) is not None:
                yield delta.encode("utf-8")

        return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8")

    return Starlette(routes=[Route("/", page), Route("/generate", generate)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("art")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args()
    uvicorn.run(make_app(Engine.load(args.art)), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
