"""`kiln serve ART --replicas 2` joined to a real Ray on 127.0.0.1 (issue 18): the official openai client gets
`kiln run`'s greedy text; the plain server's own request tests (test_server, test_server_input,
test_server_logprobs: every test that takes its `live` fixture) run unchanged against the Ray-served one, and
a set of refusals is compared answer for answer with a plain server; /health and /metrics cover both replicas;
every Ray socket stays on loopback. The same app from a Serve config file (`serve run`, the format of a
KubeRay RayService's serveConfigV2) behind Ray's own HTTP proxy on 127.0.0.1. Nothing of Ray is imported
without --replicas."""
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.runtime import test_server, test_server_input, test_server_logprobs
from tests.runtime.conftest import RAY_LOOPBACK_ENV, RayLive, _stop, process_tree, sockets_of
from tests.runtime.server_live import Live

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a Ray cluster per module: CI, not the fast loop
ROOT = Path(__file__).resolve().parents[2]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


SERVE_CONFIG = """\
proxy_location: HeadOnly
http_options: {{host: 127.0.0.1, port: {port}}}
applications:
- name: kiln-config
  route_prefix: /
  import_path: runtime.ray_serve:build_app
  args: {{art: "{art}", replicas: 2, threads: 1, max_batch: 4, max_queue: 8, host: 127.0.0.1}}
"""


class ConfigApp(Live):
    """`serve run CONFIG --address HEAD`: build_app behind Ray's HTTP proxy (started first, so the Serve
    instance on the head has a proxy, on 127.0.0.1)."""

    def __init__(self, head, art, tmp: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.model = f"http://127.0.0.1:{self.port}", "model"
        cfg = tmp / "serve.yaml"
        cfg.write_text(SERVE_CONFIG.format(port=self.port, art=art))
        serve = Path(sys.executable).with_name("serve")
        self.log = tmp / "serve-run.log"
        self.proc = subprocess.Popen([str(serve), "run", str(cfg), "--address", head.address], cwd=ROOT,
                                     stdin=subprocess.DEVNULL, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT,
                                     env={**os.environ, **RAY_LOOPBACK_ENV, "RAY_AUTH_MODE": "token"})
        end = time.monotonic() + 240
        while True:
            try:
                if json.loads(self.raw("GET", "/health", timeout=10)[1]).get("replicas") == 2:
                    break
            except (OSError, ValueError):
                pass
            if self.proc.poll() is not None or time.monotonic() > end:
                self.close()
                raise AssertionError("serve run did not come up:\n" + self.log.read_text()[-3000:])
            time.sleep(0.5)

    def close(self):  # the head's shutdown takes the Serve application with it
        _stop(self.proc, signal.SIGTERM, 60)


@pytest.fixture(scope="module")
def config_app(ray_head, tiny_onnx, tmp_path_factory):
    app = ConfigApp(ray_head, tiny_onnx, tmp_path_factory.mktemp("serve-config"))
    yield app
    app.close()


@pytest.fixture(scope="module")
def live(ray_head, config_app, tiny_onnx, tiny_engine, tmp_path_factory):
    srv = RayLive(tiny_onnx, tiny_engine, tmp_path_factory.mktemp("ray-serve"), ray_address=ray_head.address,
                  max_batch=4, max_queue=8)
    yield srv
    srv.close()


# ---- the plain server's own tests, against the Ray-served one ------------------------------------------
def _adopt(*modules):
    for m in modules:
        short = m.__name__.rsplit(".", 1)[-1].removeprefix("test_")
        for name, f in list(vars(m).items()):
            if name.startswith("test_") and callable(f) and "live" in inspect.signature(f).parameters:
                globals()[f"test_{short}__{name[5:]}"] = f


_adopt(test_server, test_server_input, test_server_logprobs)


# ---- gates ---------------------------------------------------------------------------------------------
def _kiln_run(art, prompt, n, chat=False):
    cmd = [sys.executable, "-m", "kiln.cli", "run", str(art), prompt, "--json", "--max-new-tokens", str(n),
           "--temperature", "0", "--ignore-eos", "--threads", "1"] + (["--chat"] if chat else [])
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["text"]


def test_openai_client_gets_kiln_run_text(live, tiny_onnx):
    c = live.client()
    want = _kiln_run(tiny_onnx, "The module", 24)
    r = c.completions.create(model=live.model, prompt="The module", max_tokens=24, **GREEDY)
    assert r.choices[0].text == want and r.usage.completion_tokens == 24
    s = c.completions.create(model=live.model, prompt="The module", max_tokens=24, stream=True, **GREEDY)
    assert "".join(ch.choices[0].text for ch in s if ch.choices) == want

    want = _kiln_run(tiny_onnx, "Say something", 20, chat=True)
    msgs = [{"role": "user", "content": "Say something"}]
    r = c.chat.completions.create(model=live.model, messages=msgs, max_tokens=20, **GREEDY)
    assert r.choices[0].message.content == want
    s = c.chat.completions.create(model=live.model, messages=msgs, max_tokens=20, stream=True, **GREEDY)
    assert "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices) == want


REFUSALS = [("/v1/completions", body) for _, body, _, _ in test_server_input.BAD_400] + [
    ("/v1/chat/completions", {"messages": "hello"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000}),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4o"}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}),
    ("/v1/completions", [1, 2]),
]


def test_refusals_are_the_plain_servers_answers(live, tiny_engine):
    plain = Live(tiny_engine, max_batch=4, max_queue=8)
    try:
        for path, body in REFUSALS:
            a, b = plain.post(path, body), live.post(path, body)
            assert (a[0], json.loads(a[1])) == (b[0], json.loads(b[1])), (path, str(body)[:80])
            assert a[0] >= 400
        for method, path, headers in [("GET", "/v1/nothing", {}), ("GET", "/v1/completions", {}),
                                      ("GET", "/metrics", {"Host": "evil.example"}),
                                      ("GET", "/health", {"Host": "evil.example"}),
                                      ("POST", "/v1/completions", {"Content-Type": "text/plain"})]:
            a, b = plain.raw(method, path, b"{}", headers), live.raw(method, path, b"{}", headers)
            assert (a[0], json.loads(a[1])) == (b[0], json.loads(b[1])), (method, path)
    finally:
        plain.close()


def test_health_and_metrics_cover_every_replica(live):
    h = live.health()
    assert h["status"] == "ok" and h["replicas"] == 2 and h["replica_states"] == {"RUNNING": 2}
    assert len({r["pid"] for r in h["replica_list"]}) == 2 and all(r["node"] == "127.0.0.1"
                                                                    for r in h["replica_list"])
    before = live.requests("completions", 200)
    tokens = live.metric("kiln_generated_tokens_total")

    def one(i):
        return live.client().completions.create(model=live.model, prompt=f"n{i}", max_tokens=8, **GREEDY)

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(one, range(16)))
    assert live.requests("completions", 200) == before + 16
    assert live.metric("kiln_generated_tokens_total") == tokens + 16 * 8
    assert live.metric("kiln_replicas") == 2 and live.metric("kiln_worker_alive") == 2


def test_every_ray_socket_is_on_loopback(live, ray_head, config_app):
    pids = process_tree(ray_head.proc.pid, live.proc.pid, config_app.proc.pid)
    socks = sockets_of(pids)
    assert sum(s["listening"] for s in socks) >= 5  # GCS, raylet, workers, agents, the front end
    bad = [s for s in socks if not s["local"][0].is_loopback
           or not (s["peer"][0].is_loopback or s["peer"][0].is_unspecified)]
    assert not bad, bad


# ---- the Serve-config (KubeRay RayService) form ----------------------------------------------------------
def test_serve_config_app_behind_rays_proxy(config_app, live, tiny_onnx, tiny_engine):
    h = json.loads(config_app.raw("GET", "/health")[1])
    assert h["replicas"] == 2 and h["replica_states"] == {"RUNNING": 2}
    c = config_app.client()
    want = _kiln_run(tiny_onnx, "The module", 24)
    r = c.completions.create(model="model", prompt="The module", max_tokens=24, **GREEDY)
    assert r.choices[0].text == want
    s = c.completions.create(model="model", prompt="The module", max_tokens=24, stream=True, **GREEDY)
    assert "".join(ch.choices[0].text for ch in s if ch.choices) == want
    for path, body in REFUSALS[:8] + REFUSALS[-5:]:
        a, b = live.post(path, body), config_app.post(path, body)
        assert (a[0], json.loads(a[1])) == (b[0], json.loads(b[1])), (path, str(body)[:80])
    assert config_app.requests("completions", 200) == 2 and config_app.metric("kiln_replicas") == 2


# ---- without --replicas, nothing of Ray ----------------------------------------------------------------
BLOCK_RAY = r"""
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ray":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
import kiln.cli, runtime, runtime.server, runtime.ray_serve
from click.testing import CliRunner
r = CliRunner().invoke(kiln.cli.cli, ["serve", "--help"])
assert r.exit_code == 0 and "--replicas" in r.output, r.output
r = CliRunner().invoke(kiln.cli.cli, ["serve", sys.argv[1], "--ray-address", "127.0.0.1:1"])
assert r.exit_code == 2 and "--replicas" in r.output, r.output
assert not [m for m in sys.modules if m.split(".")[0] == "ray"]
r = CliRunner().invoke(kiln.cli.cli, ["serve", sys.argv[1], "--replicas", "2", "--port", "0"])
assert r.exit_code == 2 and "pip install 'llmkiln[ray]'" in r.output and len(r.output.splitlines()) == 1, r.output
print("OK")
"""


def test_nothing_of_ray_without_replicas(tiny_onnx):
    r = subprocess.run([sys.executable, "-c", BLOCK_RAY, str(tiny_onnx)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-2000:] + r.stdout[-2000:]
