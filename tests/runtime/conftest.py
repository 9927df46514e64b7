"""Runtime fixtures: real ONNX artifacts of the tiny model (from the exporter) and a hand-built graph."""
import shutil
from pathlib import Path

import pytest

from tests.runtime.server_live import Live


@pytest.fixture(scope="session")
def tiny_onnx(tiny_dir, tmp_path_factory) -> Path:
    """The tiny Llama exported by `export.onnx.export_onnx` (fp32, portable form)."""
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("rt") / "tiny-onnx"
    export_onnx(str(tiny_dir), out, validate=False)
    return out


@pytest.fixture(scope="session")
def tiny_onnx_ort(tiny_dir, tmp_path_factory) -> Path:
    """The same tiny Llama in the ONNX Runtime form (``--form ort``: GroupQueryAttention and friends)."""
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("rt") / "tiny-onnx-ort"
    export_onnx(str(tiny_dir), out, form="ort", validate=False)
    return out


@pytest.fixture
def tiny_onnx_copy(tiny_onnx, tmp_path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(tiny_onnx, dst)
    return dst


@pytest.fixture(scope="session")
def hand_art(tiny_dir, tmp_path_factory) -> Path:
    """A graph written with onnx.helper that follows the IO contract (no torch, no exporter)."""
    from tests.runtime.handgraph import make_artifact

    return make_artifact(tmp_path_factory.mktemp("rt") / "hand", tiny_dir)


@pytest.fixture(scope="session")
def tiny_engine(tiny_onnx):
    from runtime import Engine

    return Engine.load(tiny_onnx, threads=1)


@pytest.fixture(scope="session")
def tiny_engine_ort(tiny_onnx_ort):
    from runtime import Engine

    return Engine.load(tiny_onnx_ort, threads=1)


@pytest.fixture(params=["portable", "ort"])
def any_engine(request):
    """The tiny model's engine in both graph forms."""
    return request.getfixturevalue("tiny_engine" if request.param == "portable" else "tiny_engine_ort")


# ---- Ray-served `kiln serve --replicas` (issue 18): a real Ray on 127.0.0.1, real kiln serve processes -----
# Tests marked `ray` need ray[serve] (llmkiln[ray]); CI installs it, so there they fail rather than skip.
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
_RAY_HEAD = r"""
import sys
import ray
ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=int(sys.argv[1]),
         logging_level="WARNING")
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test session closes our stdin
ray.shutdown()
"""


def need_ray():
    import importlib.util
    import os

    if importlib.util.find_spec("ray") is None:
        if os.environ.get("CI"):
            pytest.fail("ray[serve] is not installed; CI must install llmkiln[ray]")
        pytest.skip("needs ray[serve]: pip install 'llmkiln[ray]'")


def _wait_line(path: Path, marker: str, proc, timeout: float) -> str:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = path.read_text(errors="replace") if path.exists() else ""
        for line in text.splitlines():
            if marker in line:
                return line
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {marker!r} after {timeout:.0f} s:\n{text[-3000:]}")


def _stop(proc, sig, timeout: float) -> None:
    import subprocess

    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # the process this fixture started, by its pid
            proc.wait(10)


class RayHead:
    """A Ray head on 127.0.0.1 in a helper process (ray.init; ray.shutdown when its stdin closes)."""

    def __init__(self, tmp: Path, cpus: int = 4):
        import os
        import subprocess
        import sys

        self.log = tmp / "ray-head.log"
        self.proc = subprocess.Popen([sys.executable, "-c", _RAY_HEAD, str(cpus)], stdin=subprocess.PIPE,
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **RAY_LOOPBACK_ENV})
        self.address = _wait_line(self.log, "GCS ", self.proc, 120).split()[-1]

    def close(self):
        import signal

        if self.proc.poll() is None:
            self.proc.stdin.close()
        _stop(self.proc, signal.SIGTERM, 30)


_FLAGS = {"max_batch": "--max-batch", "max_queue": "--max-queue", "max_body_mb": "--max-body-mb",
          "body_timeout_s": "--body-timeout", "api_key": "--api-key", "max_tokens_cap": "--max-tokens-cap"}


class RayLive(Live):
    """`kiln serve ART --replicas N` in a subprocess (port 0), with the helpers of server_live.Live."""

    def __init__(self, art, engine, tmp: Path, replicas: int = 2, ray_address: str | None = None,
                 extra=(), **cfg):
        import os
        import subprocess
        import sys
        from types import SimpleNamespace

        from runtime.openai_api import Limits
        from runtime.server import ServerConfig, max_prompt_chars

        cmd = [sys.executable, "-m", "kiln.cli", "serve", str(art), "--port", "0", "--replicas",
               str(replicas), "--threads", "1", *extra]
        if ray_address:
            cmd += ["--ray-address", ray_address]
        for k, v in cfg.items():
            cmd += [_FLAGS[k], str(v)]
        self.log = tmp / f"kiln-serve-{os.getpid()}-{id(self)}.log"
        env = {**os.environ, "RAY_AUTH_MODE": "token"} if ray_address else dict(os.environ)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, env=env)
        try:
            line = _wait_line(self.log, "serving ", self.proc, 240)
        except BaseException:
            self.close()
            raise
        self.url = line.split(" at ")[1].split()[0].removesuffix("/v1")
        self.port = int(self.url.rsplit(":", 1)[1])
        c = ServerConfig(port=0, **cfg)
        self.model = engine.model_name
        self.app = SimpleNamespace(limits=Limits(self.model, engine.context_length, max_prompt_chars(engine),
                                                 c.default_max_tokens, c.max_tokens_cap))

    def health(self) -> dict:
        import json

        return json.loads(self.raw("GET", "/health")[1])

    def close(self):
        import signal

        _stop(self.proc, signal.SIGINT, 60)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on 127.0.0.1 for one test module (4 logical CPUs, so two servers of 2 replicas fit)."""
    need_ray()
    head = RayHead(tmp_path_factory.mktemp("ray"))
    yield head
    head.close()


def process_tree(*roots: int) -> set[int]:
    """These processes and all their descendants (from /proc)."""
    import os

    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, grew = set(roots), True
    while grew:
        new = {p for p, pp in parent.items() if pp in tree and p not in tree}
        tree |= new
        grew = bool(new)
    return tree


def _addr(hexaddr: str):
    import ipaddress

    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(raw[::-1])
    else:
        ip = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
        ip = ip.ipv4_mapped or ip
    return ip, int(port, 16)


def sockets_of(pids) -> list[dict]:
    """Every TCP and UDP socket the processes hold: {proto, listening, local, peer, pid} (from /proc)."""
    import os

    inode_pid = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inode_pid[target[8:-1]] = pid
        except OSError:
            pass
    out = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/net/{proto}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[9] in inode_pid:
                local, peer = _addr(cols[1]), _addr(cols[2])
                pid = inode_pid[cols[9]]
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
                except OSError:
                    cmd = "?"
                out.append({"proto": proto, "listening": proto.startswith("tcp") and cols[3] == "0A",
                            "local": local, "peer": peer, "pid": pid, "cmd": cmd})
    return out
