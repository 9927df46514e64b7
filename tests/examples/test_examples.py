"""Every example runs for real against the tiny model's exported artifact."""
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
EX = ROOT / "examples"


@pytest.fixture(scope="module")
def art(tiny_dir, tmp_path_factory):
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("ex") / "art"
    export_onnx(str(tiny_dir), out, validate=False)
    return out


def _env():
    return os.environ | {"PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc, seconds: float = 60) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read()}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not come up")


def test_embed_script(art):
    r = subprocess.run([sys.executable, str(EX / "embed.py"), str(art), "hello"], capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("tokens") == 2  # the two batched results


def test_webapp_streams(art):
    sys.path.insert(0, str(EX))
    try:
        import uvicorn
        from webapp import make_app

        from runtime import Engine

        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(make_app(Engine.load(art), max_new_tokens=12), host="127.0.0.1",
                                               port=port, log_level="error"))
        t = threading.Thread(target=server.run, daemon=True)
        t.start()
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.1)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert "/generate?prompt=" in page
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/generate?prompt=hi", timeout=60) as r:
            assert r.headers["content-type"].startswith("text/plain")
            body = r.read().decode()
        assert body and "[error" not in body
        server.should_exit = True
        t.join(10)
    finally:
        sys.path.remove(str(EX))


def test_openai_client_against_kiln_serve(art):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(art), "--port", str(port)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(f"http://127.0.0.1:{port}/health", proc)
        r = subprocess.run([sys.executable, str(EX / "openai_client.py"), "--base-url",
                            f"http://127.0.0.1:{port}/v1"], capture_output=True, text=True, env=_env(), timeout=300)
        assert r.returncode == 0, r.stderr
        assert "chat:" in r.stdout and "completion:" in r.stdout
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow  # end to end, ~20-30 s on 2 cores: CI runs it, the fast loop skips it
def test_pipeline_api(tiny_dir, tmp_path):
    r = subprocess.run([sys.executable, str(EX / "pipeline_api.py"), str(tiny_dir), str(tmp_path / "o")],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    assert "validation: True" in r.stdout and "decode tokens/s:" in r.stdout
