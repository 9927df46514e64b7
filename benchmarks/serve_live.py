"""A live `kiln serve` subprocess on 127.0.0.1 (a free port) for the server benchmarks, with raw HTTP helpers
and the server's RSS. Standard library only."""
from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # the only address these benchmarks talk to


def tiny_artifact(work: Path) -> Path:
    """The tests' tiny random Llama exported to ONNX (seconds, no download)."""
    out = work / "tiny-onnx"
    if not (out / "kiln.json").is_file():
        code = ("import sys; from pathlib import Path; sys.path.insert(0, %r)\n"
                "from tests.tiny import save_tiny\nfrom export.onnx import export_onnx\n"
                "d = save_tiny(Path(%r) / 'tiny-model')\nexport_onnx(str(d), Path(%r), validate=False)\n"
                % (str(ROOT), str(work), str(out)))
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return out


def artifact(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    return tiny_artifact(Path(tempfile.gettempdir()) / "kiln-serve-bench")


class Served:
    """``kiln serve ART --port 0`` in a subprocess; its log lines are kept in ``self.log``."""

    def __init__(self, art: Path, *args: str, timeout: float = 600):
        cmd = [sys.executable, "-m", "kiln.cli", "serve", str(art), "--host", HOST, "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        end = time.monotonic() + timeout
        self.port = None
        while self.port is None:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("kiln serve exited before listening:\n" + "".join(self.log[-20:]))
            self.log.append(line)
            m = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                self.port = int(m.group(1))
            if time.monotonic() > end:
                raise RuntimeError("kiln serve did not start in time")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def tracebacks(self) -> int:
        return sum("Traceback" in line for line in self.log)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def request(self, method, path, body=None, headers=None, timeout=120):
        """(status, body bytes, headers) of one request."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        c = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
        finally:
            c.close()

    def post(self, path, body, headers=None, timeout=120):
        return self.request("POST", path, body, headers, timeout)

    def metric(self, name: str) -> float:
        text = self.request("GET", "/metrics")[1].decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def model(self) -> str:
        return json.loads(self.request("GET", "/v1/models")[1])["data"][0]["id"]

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Sampler(threading.Thread):
    """Calls ``fn`` every ``every`` seconds until stopped, keeping the values."""

    def __init__(self, fn, every: float):
        super().__init__(daemon=True)
        self.fn, self.every, self.values, self._halt = fn, every, [], threading.Event()

    def run(self):
        while not self._halt.is_set():
            try:
                self.values.append(self.fn())
            except Exception as e:  # noqa: BLE001 - a failed probe is a value too
                self.values.append(e)
            self._halt.wait(self.every)

    def stop(self):
        self._halt.set()
        self.join(30)


_HEALTH_LOOP = r"""
import http.client, sys, time
port, every, end = int(sys.argv[1]), float(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    t0 = time.monotonic()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/health")
        st = c.getresponse().status
        c.close()
    except OSError:
        st = 0
    print(f"{t0:.6f} {time.monotonic() - t0:.6f} {st}", flush=True)
    time.sleep(every)
"""


class HealthProbe:
    """/health latency measured from a separate process, so the benchmark's own work (building large bodies
    holds its GIL) does not count as the server's. ``stop()`` returns [(monotonic start, seconds, status)]."""

    def __init__(self, port: int, every: float = 0.1, limit_s: float = 3600):
        self.proc = subprocess.Popen([sys.executable, "-c", _HEALTH_LOOP, str(port), str(every), str(limit_s)],
                                     stdout=subprocess.PIPE, text=True)

    def stop(self) -> list[tuple[float, float, int]]:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        rows = []
        for line in out.splitlines():
            t, dt, st = line.split()
            rows.append((float(t), float(dt), int(st)))
        return rows

