"""`kiln run | chat | bench | serve` on a real exported artifact."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import openai
from click.testing import CliRunner

from kiln.cli import cli

ROOT = Path(__file__).resolve().parents[2]


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def test_run_streams_and_json(tiny_onnx, tiny_engine):
    ref = tiny_engine.generate("The module", max_new_tokens=8, ignore_eos=True)
    r = run("run", tiny_onnx, "The module", "--max-new-tokens", 8, "--ignore-eos", "--threads", 1)
    assert r.exit_code == 0, r.output
    assert r.stdout == ref.text + "\n" and "8 tokens" in r.stderr
    r = run("run", tiny_onnx, "The module", "--max-new-tokens", 8, "--ignore-eos", "--json")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["token_ids"] == ref.token_ids and out["finish_reason"] == "length"


def test_chat_loop(tiny_onnx):
    r = run("chat", tiny_onnx, "--max-new-tokens", 4, "--temperature", 0, input="hello\n/reset\nagain\n/exit\n")
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) >= 2


def test_bench_json(tiny_onnx):
    r = run("bench", tiny_onnx, "--runs", 1, "--new-tokens", 8, "--prefill-len", 64, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["decode_tokens_per_s"] > 0 and out["prefill_ms"] > 0 and out["peak_rss_mb"] > 10


def test_user_errors_are_one_line(tiny_onnx, tmp_path):
    r = run("run", tiny_onnx, "hi", "--backend", "tensorrt")
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    r = run("run", tmp_path, "hi")
    assert r.exit_code == 2 and "no kiln.json" in r.stderr


def test_serve_subprocess(tiny_onnx):
    p = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(tiny_onnx), "--port", "0",
                          "--threads", "1", "--api-key", "k"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.time() + 90
        while "serving" not in line and time.time() < deadline:
            line = p.stderr.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line).group(1)
        c = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        r = c.completions.create(model=c.models.list().data[0].id, prompt="The module", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        p.terminate()
        p.wait(15)
