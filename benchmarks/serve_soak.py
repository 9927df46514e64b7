"""Soak a live `kiln serve` on 127.0.0.1: 8 clients for --duration seconds (default 600) sending random valid
and invalid requests, streaming and not, and hanging up at random:

    .venv/bin/python benchmarks/serve_soak.py [--art ART] [--duration 600] [--clients 8] [--seed 0]

Without --art it serves the tests' tiny random model. Checks: no 500 (429 / 503 with Retry-After under
overload are fine), every valid request's text (temperature 0) equal to the same request sent alone before
the soak, active and queued requests and reserved KV back to 0, RSS back within --rss-slack-mb of its value
after the warm-up, no traceback in the server log. Every loop is bounded in time and count; exit code 1 when a
check fails.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_live import HOST, Served, artifact  # noqa: E402

WORDS = ("the module text function value object class list return string file data name type error "
         "system method number line call default first time code loop").split()


def templates(seed: int, n: int) -> list[tuple[str, dict]]:
    """n valid greedy requests: (path, body)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
        body = {"max_tokens": rng.randint(4, 48), "temperature": 0, "ignore_eos": rng.random() < 0.7}
        if rng.random() < 0.3:
            body["stop"] = [rng.choice(["e", "\n", "the", " a"])]
        if rng.random() < 0.2:
            body["top_k"] = rng.randint(1, 50)  # still greedy at temperature 0
        if i % 3 == 0:
            out.append(("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}))
        else:
            out.append(("/v1/completions", {**body, "prompt": text}))
    return out


INVALID = [
    (b"[" * 50_000 + b"]" * 50_000, 400), (b'{"prompt": "hi", "max_tokens": ' + b"9" * 3000 + b"}", 400),
    (b'{"prompt": "hi", "seed": -1}', 400), (b'{"model": "\\ud800", "prompt": "hi"}', 400),
    (b'{"prompt": "hi", "repetition_penalty": 1e400}', 400), (b'{"prompt": "hi", "temperature": Infinity}', 400),
    (b'{"prompt": "hi", "ignore_eos": "false"}', 400), (b'{"prompt": "hi", "stop": "' + b"x" * 5000 + b'"}', 400),
    (b'{"prompt": "hi", "model": "gpt-4o"}', 404), (b"{not json", 400), (b'{"prompt": "hi", "n": 2}', 400),
    (b'{"prompt": "word ' + b"word " * 300_000 + b'"}', 400), (b'{"prompt": "hi", "logprobs": 9}', 400),
]


def text_of(path: str, data: bytes) -> str:
    c = json.loads(data)["choices"][0]
    return c["message"]["content"] if "chat" in path else c["text"]


def stream_text(path: str, data: bytes) -> str:
    out = []
    for ev in data.decode().split("\n\n"):
        if ev.startswith("data: {"):
            obj = json.loads(ev[6:])
            if "error" in obj:
                raise RuntimeError(obj["error"]["message"])
            for c in obj.get("choices", []):
                out.append((c.get("delta") or {}).get("content") or "" if "chat" in path else c.get("text") or "")
    return "".join(out)


class Soak:
    def __init__(self, srv: Served, tmpl, refs, rng_seed: int):
        self.srv, self.tmpl, self.refs = srv, tmpl, refs
        self.status = collections.Counter()
        self.kinds = collections.Counter()
        self.bad: list[str] = []
        self.lock = threading.Lock()
        self.seed = rng_seed

    def note(self, kind, status, problem=None):
        with self.lock:
            self.kinds[kind] += 1
            self.status[status] += 1
            if problem and len(self.bad) < 50:
                self.bad.append(f"{kind}: {problem}")

    def overload_ok(self, status, headers) -> bool:
        return status in (429, 503) and "retry-after" in headers

    def client(self, idx: int, until: float, max_requests: int):
        rng = random.Random(self.seed * 1000 + idx)
        srv = self.srv
        for _ in range(max_requests):
            if time.monotonic() >= until:
                return
            r = rng.random()
            i = rng.randrange(len(self.tmpl))
            path, body = self.tmpl[i]
            kind = "valid" if r < 0.4 else "stream" if r < 0.7 else "hang-up" if r < 0.85 else "invalid"
            try:
                if r < 0.4:
                    status, data, h = srv.post(path, body)
                    if status == 200:
                        got = text_of(path, data)
                        self.note("valid", 200, None if got == self.refs[i] else f"text differs for template {i}")
                    else:
                        self.note("valid", status, None if self.overload_ok(status, h) else f"status {status}")
                elif r < 0.7:
                    status, data, h = srv.post(path, {**body, "stream": True})
                    if status == 200:
                        got = stream_text(path, data)
                        self.note("stream", 200, None if got == self.refs[i] else f"text differs for template {i}")
                    else:
                        self.note("stream", status, None if self.overload_ok(status, h) else f"status {status}")
                elif r < 0.85:
                    self.hang_up(path, {**body, "stream": rng.random() < 0.7, "max_tokens": 200,
                                        "ignore_eos": True}, rng)
                else:
                    raw, want = rng.choice(INVALID)
                    status, data, h = srv.post("/v1/completions", raw, {"Content-Type": "application/json"})
                    ok = status == want and set(json.loads(data)["error"]) == {"message", "type", "param", "code"}
                    self.note("invalid", status, None if ok or self.overload_ok(status, h) else
                              f"status {status} (expected {want})")
            except Exception as e:  # noqa: BLE001 - a client error is a finding, not a crash of the soak
                self.note("client-error", 0, f"{kind} request: {type(e).__name__}: {e}")

    def hang_up(self, path, body, rng):
        data = json.dumps(body).encode()
        s = socket.create_connection((HOST, self.srv.port), timeout=60)
        try:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            if rng.random() < 0.5:  # read a little of the answer first, if it comes soon
                s.settimeout(5)
                try:
                    s.recv(rng.randint(1, 4096))
                except TimeoutError:
                    pass
            time.sleep(rng.random() * 0.5)
        finally:
            s.close()
        self.note("hang-up", -1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--art")
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--templates", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--kv-budget-mb", type=float, default=512)
    ap.add_argument("--rss-slack-mb", type=float, default=64)
    args = ap.parse_args(argv)
    art = artifact(args.art)
    srv = Served(art, "--threads", str(args.threads), "--max-batch", str(args.max_batch), "--max-queue",
                 str(args.max_queue), "--kv-budget-mb", str(args.kv_budget_mb))
    try:
        tmpl = templates(args.seed, args.templates)
        refs = []
        for path, body in tmpl:  # each alone: the reference texts (and the warm-up)
            status, data, _ = srv.post(path, body)
            assert status == 200, (status, data[:200])
            refs.append(text_of(path, data))
        for path, body in tmpl[:4]:
            srv.post(path, {**body, "stream": True})
        rss0 = srv.rss_mb()
        print(f"serving {art} on port {srv.port}: {len(tmpl)} reference texts, RSS {rss0:.0f} MB; soaking "
              f"{args.clients} clients for {args.duration:g} s", flush=True)
        soak = Soak(srv, tmpl, refs, args.seed)
        until = time.monotonic() + args.duration
        peak = [rss0]
        stop = threading.Event()

        def watch():
            while not stop.wait(1.0):
                peak.append(srv.rss_mb())

        w = threading.Thread(target=watch, daemon=True)
        w.start()
        threads = [threading.Thread(target=soak.client, args=(i, until, 100_000)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.duration + 300)
        stop.set()
        end = time.monotonic() + 60
        while time.monotonic() < end and (srv.metric("kiln_active_requests") or srv.metric("kiln_queued_requests")):
            time.sleep(0.2)
        time.sleep(1.0)
        active, queued = srv.metric("kiln_active_requests"), srv.metric("kiln_queued_requests")
        reserved = srv.metric("kiln_kv_reserved_bytes")
        rss1 = srv.rss_mb()
        errors500 = srv.metric("kiln_requests_failed_total")
        checks = [
            ("no 500", soak.status[500] == 0 and errors500 == 0, f"{soak.status[500]} responses, "
                                                                f"{errors500:.0f} failed generations"),
            ("valid texts equal alone", not [b for b in soak.bad if "differs" in b],
             f"{sum(1 for b in soak.bad if 'differs' in b)} differ of {soak.kinds['valid'] + soak.kinds['stream']}"),
            ("unexpected statuses / client errors", not [b for b in soak.bad if "differs" not in b],
             "; ".join(b for b in soak.bad if "differs" not in b)[:500] or "none"),
            ("active, queued, reserved KV back to 0", active == 0 and queued == 0 and reserved == 0,
             f"{active:.0f}, {queued:.0f}, {reserved:.0f} B"),
            ("RSS back to baseline", rss1 <= rss0 + args.rss_slack_mb,
             f"{rss0:.0f} MB -> {rss1:.0f} MB (peak {max(peak):.0f} MB, slack {args.rss_slack_mb:g})"),
            ("tracebacks in the server log", srv.tracebacks() == 0, str(srv.tracebacks())),
        ]
        total = sum(soak.kinds.values())
        print(f"\n{total} requests in {args.duration:g} s: " + ", ".join(f"{k} {v}" for k, v in sorted(soak.kinds.items()))
              + "; statuses " + ", ".join(f"{k}: {v}" for k, v in sorted(soak.status.items())))
        for name, ok, got in checks:
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {got}")
        return 0 if all(ok for _, ok, _ in checks) else 1
    finally:
        srv.close()


if __name__ == "__main__":
    sys.exit(main())
