"""Issue 15's server probes against a live `kiln serve` on 127.0.0.1, as a careless or hostile client would
send them, in one command:

    .venv/bin/python benchmarks/serve_abuse.py [--art ART] [--threads 2] [--kv-budget-mb 512]

Without --art it serves the tests' tiny random model (built in seconds). Prints a table probe / expected / got
and the gates: a well-behaved client's 32-token request (greedy) during the probes takes at most 2x its time
alone (medians), /health answers within 200 ms throughout (timed from a separate process), the server's RSS
stays within its RSS after loading + the KV budget + 500 MB, and the server logs no traceback. The probes
that fill every batch slot and queue place (KV admission, cancelled queued requests) run with the
well-behaved client paused: a full server makes anyone wait, by design. Every loop is bounded; exit code 1
when a probe or gate fails.
"""
from __future__ import annotations

import argparse
import json
import select
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_live import HOST, HealthProbe, Sampler, Served, artifact  # noqa: E402

MB = 1 << 20


class Probes:
    def __init__(self, srv: Served, args):
        self.srv, self.args = srv, args
        self.rows: list[tuple[str, str, str, bool]] = []
        self.ends: list[float] = []  # when each row's probe finished
        self.model = srv.model()

    def add(self, name, expected, got, ok):
        self.rows.append((name, expected, got, bool(ok)))
        self.ends.append(time.monotonic())
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {got}", flush=True)

    # ---- helpers ------------------------------------------------------------------------------------
    def err(self, body, path="/v1/completions", headers=None):
        t0 = time.monotonic()
        if isinstance(body, bytes):
            status, data, h = self.srv.post(path, body, {"Content-Type": "application/json", **(headers or {})})
        else:
            status, data, h = self.srv.post(path, body, headers)
        dt = time.monotonic() - t0
        try:
            e = json.loads(data).get("error") or {}
        except ValueError:
            e = {"code": "NOT JSON"}
        return status, e.get("code"), dt, h

    def expect(self, name, body, status, code=None, path="/v1/completions", headers=None, within=None):
        got_status, got_code, dt, _ = self.err(body, path, headers)
        ok = got_status == status and (code is None or got_code == code) and (within is None or dt <= within)
        exp = f"{status} {code or ''}".strip() + (f" < {within:g} s" if within else "")
        self.add(name, exp, f"{got_status} {got_code or ''} in {dt:.2f} s", ok)

    def raw(self, head: bytes, body_parts, read_timeout=30.0) -> tuple[bytes, float]:
        """Send a raw request (head, then body parts until the server answers or hangs up): the response head
        and the seconds until it came."""
        s = socket.create_connection((HOST, self.srv.port), timeout=read_timeout)
        t0 = time.monotonic()
        data = b""
        try:
            s.sendall(head)
            s.setblocking(False)
            answered = False
            for part in body_parts:
                view = memoryview(part)
                while view and not answered:
                    r, w, _ = select.select([s], [s], [], read_timeout)
                    if r:
                        answered = True
                    elif w:
                        view = view[s.send(view):]
                if answered:
                    break
            s.setblocking(True)
            s.settimeout(read_timeout)
            while b"\r\n\r\n" not in data:
                part = s.recv(65536)
                if not part:
                    break
                data += part
        except OSError:
            pass
        finally:
            s.close()
        return data, time.monotonic() - t0

    # ---- item 1: stop strings -------------------------------------------------------------------------
    def stops(self):
        self.expect("stop string of 100,000 chars", {"prompt": "hi", "stop": "x" * 100_000}, 400, "invalid_value")
        self.expect("stop string of 257 chars", {"prompt": "hi", "stop": ["y" * 257]}, 400, "invalid_value")
        self.expect("four stop strings of 256 chars", {"prompt": "The module", "max_tokens": 64,
                                                       "stop": ["z" * 256, "q" * 256, "w" * 256, "\n\n\n\n"]}, 200)
        self.expect("five stop strings (pin)", {"prompt": "hi", "stop": list("abcde")}, 400, "invalid_type")
        self.expect("stop sequences work (pin)", {"prompt": "The module", "max_tokens": 32, "stop": ["e"]}, 200)

    # ---- item 2: body size, time, CPU work off the loop ------------------------------------------------------
    def bodies(self):
        n = 64 * MB
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % n)
        chunk = b'{"prompt": "' + b"a" * (MB - 12)
        data, dt = self.raw(head, [chunk] + [b"a" * MB] * 63)
        self.add("64 MB body (Content-Length)", "413 < 1 s", f"{data[9:12].decode() or 'none'} in {dt:.2f} s",
                 data.startswith(b"HTTP/1.1 413") and dt < 1.0)
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        part = b"%x\r\n" % MB + b"a" * MB + b"\r\n"
        data, dt = self.raw(head, [part] * 64)
        self.add("64 MB body (chunked)", "413 < 2 s", f"{data[9:12].decode() or 'none'} in {dt:.2f} s",
                 data.startswith(b"HTTP/1.1 413") and dt < 2.0)
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        data, dt = self.raw(head, [], read_timeout=self.args.body_timeout + 10)
        self.add("body that never finishes", f"408 after {self.args.body_timeout:g} s",
                 f"{data[9:12].decode() or 'none'} in {dt:.2f} s",
                 data.startswith(b"HTTP/1.1 408") and dt < self.args.body_timeout + 2)
        self.expect("3 MB prompt (beyond the context in characters)", {"prompt": "word " * 600_000}, 400,
                    "context_length_exceeded")
        msgs = [{"role": "user", "content": "hi"}] * 100_000
        self.expect("100,000 chat messages (3.4 MB)", {"messages": msgs}, 400, "invalid_json",
                    "/v1/chat/completions")
        self.expect("3 MB of token ids", {"prompt": [5] * 1_000_000}, 400, "context_length_exceeded")

    # ---- item 3: KV memory and the max_tokens cap ---------------------------------------------------------
    def memory(self, pause):
        srv = self.srv
        budget, per_tok = srv.metric("kiln_kv_budget_bytes"), srv.metric("kiln_kv_bytes_per_token")
        ctx = self.args.context
        ids = list(range(100, 116))
        self.expect("max_tokens above --max-tokens-cap", {"prompt": ids, "max_tokens": self.args.cap + 1}, 400,
                    "max_tokens_exceeded")
        longest = min(self.args.cap, ctx - len(ids))
        if (len(ids) + longest) * per_tok > budget:
            self.expect("one request needing more KV than the budget", {"prompt": ids, "max_tokens": longest},
                        400, "kv_budget_exceeded")
        # max-batch requests that may each grow to the whole context: admitted by bytes, the rest wait
        pause.set()
        try:
            self._settle()  # the well-behaved client's last request finishes first
            room = int(budget // ((len(ids) + longest) * per_tok)) if per_tok else self.args.max_batch
            fits = max(1, min(self.args.max_batch, room))
            socks = []
            body = json.dumps({"prompt": ids, "max_tokens": longest, "stream": True, "ignore_eos": True}).encode()
            n = self.args.max_batch + 1  # one more than the batch holds: someone must wait, by bytes or by slots
            for _ in range(n):
                s = socket.create_connection((HOST, srv.port), timeout=30)
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
                socks.append(s)
            seen = []  # (active, queued, reserved) while they run, for 2 s
            end = time.monotonic() + 2
            while time.monotonic() < end:
                seen.append((srv.metric("kiln_active_requests"), srv.metric("kiln_queued_requests"),
                             srv.metric("kiln_kv_reserved_bytes")))
                time.sleep(0.05)
            for s in socks:
                s.close()
            active, queued, reserved = (max(x[i] for x in seen) for i in range(3))
            self.add(f"{n} requests of {len(ids) + longest} positions each",
                     f"at most {fits} running, the rest queued, KV <= budget",
                     f"max {active:.0f} running, max {queued:.0f} queued, KV max {reserved / MB:.0f} of "
                     f"{budget / MB:.0f} MiB", active == fits and queued >= 1 and reserved <= budget)
            self._settle()
        finally:
            pause.clear()

    def _settle(self, timeout=30.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end and (self.srv.metric("kiln_active_requests") or
                                          self.srv.metric("kiln_queued_requests")):
            time.sleep(0.05)

    # ---- item 5: bodies that gave a plain-text 500 or were accepted ---------------------------------------
    def inputs(self):
        e = self.expect
        e("JSON nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json")
        e("max_tokens of 5,000 digits", b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400, "invalid_json")
        e("seed -1", {"prompt": "hi", "seed": -1}, 400, "invalid_value")
        e("lone surrogate in model", b'{"model": "\\ud800", "prompt": "hi"}', 400, "invalid_json")
        e("lone surrogate in message content", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400,
          "invalid_json", "/v1/chat/completions")
        e("repetition_penalty 1e400", b'{"prompt": "hi", "repetition_penalty": 1e400}', 400, "invalid_json")
        e("repetition_penalty Infinity", b'{"prompt": "hi", "repetition_penalty": Infinity}', 400, "invalid_json")
        e("ignore_eos \"false\"", {"prompt": "hi", "ignore_eos": "false"}, 400, "invalid_type")
        e("bad JSON (pin)", b"{not json", 400, "invalid_json")
        e("NaN (pin)", b'{"prompt": "hi", "temperature": NaN}', 400, "invalid_json")
        e("wrong type (pin)", {"prompt": "hi", "max_tokens": "ten"}, 400, "invalid_type")
        e("max_tokens -5 (pin)", {"prompt": "hi", "max_tokens": -5}, 400, "invalid_value")
        e("n 2 (pin)", {"prompt": "hi", "n": 2}, 400, "invalid_value")
        e("top_p 0 (pin)", {"prompt": "hi", "top_p": 0}, 400, "invalid_value")

    # ---- items 6, 7: model name, cross-site, rebinding -------------------------------------------------
    def names_and_origins(self):
        self.expect("model \"gpt-4o\"", {"model": "gpt-4o", "prompt": "hi"}, 404, "model_not_found")
        status, data, _ = self.srv.post("/v1/completions", {"model": "m" * MB, "prompt": "hi", "stream": True})
        self.add("model name of 1 MB", "404, body < 1 kB", f"{status}, body {len(data)} B",
                 status == 404 and len(data) < 1000)
        self.expect("served model name", {"model": self.model, "prompt": "hi", "max_tokens": 2}, 200)
        status, data, _ = self.srv.post("/v1/completions", json.dumps({"prompt": "hi"}).encode(),
                                        {"Content-Type": "text/plain"})
        self.add("text/plain cross-site POST", "415", str(status), status == 415)
        status, data, _ = self.srv.post("/v1/completions", {"prompt": "hi"}, {"Host": "evil.example:8000"})
        self.add("foreign Host header", "400 invalid_host", f"{status} {json.loads(data)['error']['code']}",
                 status == 400)
        status, _, _ = self.srv.request("GET", "/v1/models", headers={"Host": "rebound.example"})
        self.add("foreign Host on GET /v1/models", "400", str(status), status == 400)

    # ---- item 8 and disconnects ------------------------------------------------------------------------
    def queue(self, pause):
        srv, a = self.srv, self.args
        pause.set()
        try:
            self._settle()
            body = json.dumps({"prompt": "The module", "max_tokens": 2000, "stream": True, "ignore_eos": True}).encode()
            head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body))
            held = [socket.create_connection((HOST, srv.port), timeout=30) for _ in range(a.max_batch + a.max_queue)]
            for s in held:
                s.sendall(head + body)
            end = time.monotonic() + 10
            while time.monotonic() < end and srv.metric("kiln_queued_requests") < a.max_queue:
                time.sleep(0.05)
            for s in held[a.max_batch:]:  # the queued clients hang up
                s.close()
            end = time.monotonic() + 5
            while time.monotonic() < end and srv.metric("kiln_queued_requests") > 0:
                time.sleep(0.02)
            got = {}
            t = threading.Thread(target=lambda: got.update(r=srv.post("/v1/completions", {
                "prompt": "hi", "max_tokens": 2}, timeout=60)))
            t.start()
            time.sleep(0.3)
            for s in held[:a.max_batch]:
                s.close()
            t.join(60)
            status = got.get("r", (None,))[0]
            self.add("queued clients hang up, then a new request", "200 (not 429)", str(status), status == 200)
            self._settle()
            streams = []
            for _ in range(6):
                s = socket.create_connection((HOST, srv.port), timeout=30)
                s.sendall(head + body)
                s.recv(4096)  # the stream started
                streams.append(s)
            for s in streams:
                s.close()
            self._settle()
            st = srv.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})[0]
            self.add("six clients hang up mid-stream, then a request (pin)", "200, 0 active",
                     f"{st}, {srv.metric('kiln_active_requests'):.0f} active",
                     st == 200 and srv.metric("kiln_active_requests") == 0)
        finally:
            pause.clear()

    # ---- OpenAI extras --------------------------------------------------------------------------------
    def extras(self):
        status, data, _ = self.srv.post("/v1/completions", {"prompt": [list(range(100, 116))], "echo": True,
                                                            "logprobs": 1, "max_tokens": 1, "temperature": 0})
        lp = json.loads(data)["choices"][0]["logprobs"] if status == 200 else {}
        self.add("echo + logprobs 1 + max_tokens 1 (lm-eval)", "200, 17 token logprobs, first null",
                 f"{status}, {len(lp.get('token_logprobs', []))}, first {lp.get('token_logprobs', [0])[0]}",
                 status == 200 and len(lp["token_logprobs"]) == 17 and lp["token_logprobs"][0] is None)
        status, data, _ = self.srv.post("/v1/completions", {"prompt": "hi", "max_tokens": 3, "stream": True,
                                                            "stream_options": {"include_usage": True}})
        ok = status == 200 and b'"usage": {"prompt_tokens"' in data
        self.add("stream_options.include_usage (pin)", "200 with a usage chunk", str(status), ok)
        status, data, _ = self.srv.request("GET", "/health")
        h = json.loads(data)
        self.add("/health after the probes", "200, worker alive", f"{status}, worker {h.get('worker')}",
                 status == 200 and h.get("worker") == "alive")


def good_request(srv: Served, prompt_ids) -> float:
    t0 = time.monotonic()
    status, _, _ = srv.post("/v1/completions", {"prompt": prompt_ids, "max_tokens": 32, "temperature": 0,
                                                "ignore_eos": True}, timeout=120)
    if status != 200:
        raise RuntimeError(f"the well-behaved request got {status}")
    return time.monotonic() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--art", help="artifact to serve (default: the tests' tiny model, built in a temp dir)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=4)
    ap.add_argument("--kv-budget-mb", type=float, default=512)
    ap.add_argument("--body-timeout", type=float, default=3.0)
    ap.add_argument("--cap", type=int, default=4096, help="--max-tokens-cap of the server")
    args = ap.parse_args(argv)
    art = artifact(args.art)
    arch = json.loads((art / "kiln.json").read_text())["architecture"]
    args.context = int(arch["max_position"])
    srv = Served(art, "--threads", str(args.threads), "--max-batch", str(args.max_batch), "--max-queue",
                 str(args.max_queue), "--kv-budget-mb", str(args.kv_budget_mb), "--body-timeout",
                 str(args.body_timeout), "--max-tokens-cap", str(args.cap))
    try:
        prompt = list(range(200, 232))
        for _ in range(2):
            good_request(srv, prompt)  # warm-up
        rss0 = srv.rss_mb()
        alone = [good_request(srv, prompt) for _ in range(5)]
        print(f"serving {art} on port {srv.port}: RSS after loading {rss0:.0f} MB; 32-token request alone "
              f"{statistics.median(alone):.2f} s (median of 5)", flush=True)
        pause = threading.Event()
        during: list[float] = []
        stop = threading.Event()

        def good_loop():
            while not stop.is_set():
                if pause.is_set():
                    time.sleep(0.05)
                    continue
                try:
                    during.append(good_request(srv, prompt))
                except Exception as e:  # noqa: BLE001
                    during.append(float("inf"))
                    print(f"  well-behaved request failed: {e}", flush=True)

        hs, rs = HealthProbe(srv.port, 0.1), Sampler(srv.rss_mb, 0.1)
        rs.start()
        good = threading.Thread(target=good_loop, daemon=True)
        good.start()
        probes = Probes(srv, args)
        t_start = time.monotonic()
        for step in (probes.stops, probes.bodies, probes.inputs, probes.names_and_origins, probes.extras):
            step()
        probes.memory(pause)
        probes.queue(pause)
        probes.inputs()  # once more with the queue back to normal, so the good client overlaps them too
        stop.set()
        good.join(180)
        health = hs.stop()
        rs.stop()
        elapsed = time.monotonic() - t_start
        hv = [(t, dt if st == 200 else float("inf")) for t, dt, st in health]
        h = [v[1] for v in hv]
        t_worst = max(hv, key=lambda v: v[1])[0]
        during_probe = next((r[0] for r, end in zip(probes.rows, probes.ends) if end >= t_worst), "none")
        rss = [v for v in rs.values if isinstance(v, float)]
        med_alone, med_during = statistics.median(alone), statistics.median(during) if during else float("inf")
        bound = rss0 + args.kv_budget_mb + 500
        gates = [("32-token request during the probes vs alone (medians)", "<= 2x",
                  f"{med_during:.2f} s vs {med_alone:.2f} s = {med_during / med_alone:.2f}x "
                  f"(n={len(during)}, max {max(during):.2f} s)", med_during <= 2 * med_alone),
                 ("/health latency throughout", "<= 200 ms",
                  f"max {1e3 * max(h):.0f} ms (during '{during_probe}'), median "
                  f"{1e3 * statistics.median(h):.0f} ms (n={len(h)})",
                  max(h) <= 0.2),
                 ("server RSS", f"<= {bound:.0f} MB (load {rss0:.0f} + KV {args.kv_budget_mb:g} + 500)",
                  f"max {max(rss):.0f} MB", max(rss) <= bound),
                 ("tracebacks in the server log", "0", str(srv.tracebacks()), srv.tracebacks() == 0)]
        rows = probes.rows + gates
        w = max(len(r[0]) for r in rows)
        we = max(len(r[1]) for r in rows)
        print(f"\n{'probe'.ljust(w)}  {'expected'.ljust(we)}  got")
        for name, exp, got, ok in rows:
            print(f"{name.ljust(w)}  {exp.ljust(we)}  {got}{'' if ok else '   <-- FAIL'}")
        failed = [r for r in rows if not r[3]]
        print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed ({elapsed:.0f} s of probes)")
        return 1 if failed else 0
    finally:
        srv.close()


if __name__ == "__main__":
    sys.exit(main())
