"""Packaging: the base install (no extras) is the runtime and the thin CLI, without torch, transformers or
matplotlib; commands that need an extra say which in one line (exit 2); ``llmkiln`` re-exports the public API
lazily.

The fast tests simulate a missing dependency in a subprocess (an import hook that finds no such module, as
when it is not installed); the slow one builds a real fresh venv and ``pip install``s the checkout."""
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# what `pip install llmkiln` (no extras) does not have
NOT_IN_BASE = ("torch", "transformers", "safetensors", "gguf", "accelerate", "onnx", "matplotlib", "yaml")

MISSING = r"""
import sys

class NotInstalled:
    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if any(name == n or name.startswith(n + ".") for n in self.names):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled(sys.argv.pop(1).split(",")))
"""

KILN = MISSING + r"""
from kiln.cli import cli
cli(sys.argv[1:], prog_name="kiln")
"""


def kiln_without(missing, *args, timeout=180):
    """`kiln ARGS` in a process where the modules ``missing`` are not installed."""
    return subprocess.run([sys.executable, "-c", KILN, ",".join(missing), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def one_line_error(r, dep: str, extra: str, command: str) -> None:
    """Exit 2 and the error as one line on stderr (after the pipeline's stage lines), no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == (f"error: `kiln {command}` needs {dep}, which is not installed: "
                         f"pip install 'llmkiln[{extra}]'"), r.stderr[-2000:]
    assert len(lines) == 1 or command == "pipeline", r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not r.stdout.strip(), r.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny_art(tiny_dir, tmp_path_factory) -> Path:
    """The tiny Llama as an ONNX artifact (portable fp32, as tests/runtime/conftest.py builds it)."""
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("pkg") / "tiny-onnx"
    export_onnx(str(tiny_dir), out, validate=False)
    return out


# --- llmkiln namespace ---------------------------------------------------------------------------------------

def test_llmkiln_engine_never_imports_torch(tiny_art):
    script = MISSING + r"""
import llmkiln
from llmkiln import Engine, EngineError
assert Engine.__module__ == "runtime.engine"
eng = Engine.load(sys.argv[1], threads=1)
assert len(eng.generate("The module", max_new_tokens=3, ignore_eos=True).token_ids) == 3
assert "Engine" in dir(llmkiln) and "quantize_" in dir(llmkiln) and "export_onnx" in dir(llmkiln)
try:
    llmkiln.quantize_
except ModuleNotFoundError as e:
    assert e.name == "torch", e.name
else:
    raise AssertionError("quantize_ imported without torch")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "matplotlib", "onnx"))
assert not heavy, heavy
print("OK")
"""
    r = subprocess.run([sys.executable, "-c", script, ",".join(NOT_IN_BASE), str(tiny_art)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-2000:]


def test_llmkiln_names_are_the_packages_own():
    import compress
    import compress.prune
    import compress.quant
    import export.onnx
    import llmkiln
    import runtime

    assert set(llmkiln.__all__) <= set(dir(llmkiln))
    for name in llmkiln.__all__:
        obj = getattr(llmkiln, name)
        owner = {"Engine": runtime, "EngineError": runtime, "CompressError": compress, "load_model": compress,
                 "ExportError": export, "export_onnx": export.onnx}.get(name)
        if owner is None:
            owner = compress.quant if hasattr(compress.quant, name) else compress.prune
        assert obj is getattr(owner, name), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = llmkiln.nope
    with pytest.raises(ImportError):
        from llmkiln import nope  # noqa: F401


# --- missing extras: one line, exit 2 ------------------------------------------------------------------------

@pytest.mark.parametrize("command,args", [
    ("compress quantize", ["--scheme", "int8-wo", "-o", "{tmp}/q"]),
    ("compress prune", ["--method", "magnitude", "--sparsity", "0.5", "-o", "{tmp}/p"]),
    ("eval ppl", []),
    ("info", []),
    ("export onnx", ["-o", "{tmp}/o"]),
    ("pipeline", ["-o", "{tmp}/pipe", "--no-bench"]),
])
def test_command_without_its_extra_says_which_in_one_line(command, args, tiny_dir, tmp_path):
    # the base install: none of the extras' modules
    argv = command.split() + [tiny_dir] + [a.format(tmp=tmp_path) for a in args]
    r = kiln_without(NOT_IN_BASE, *argv)
    if command == "export onnx":  # the graph builder needs onnx first; [export] has it (validation: next)
        one_line_error(r, "onnx", "export", command)
    else:
        # the first of the [compress] modules the command imports is named (torch, transformers, yaml)
        dep = next((d for d in ("yaml", "transformers", "torch") if f"needs {d}," in r.stderr), "torch")
        one_line_error(r, dep, "compress", command)
    left = [p for p in tmp_path.rglob("*") if p.is_file()]  # (pipeline makes its OUT dir first: empty)
    assert not left, f"a failed command left output behind: {left}"


def test_export_with_export_extra_but_no_torch(tiny_dir, tmp_path):
    # [export] without [compress]: the builder runs, the validation against the torch model needs [compress]
    r = kiln_without(("torch", "transformers", "matplotlib"), "export", "onnx", tiny_dir, "-o", tmp_path / "o")
    one_line_error(r, "torch", "compress", "export onnx")
    assert not (tmp_path / "o").exists()


def test_export_extra_builds_without_torch(tiny_dir, tmp_path):
    # what [export] is for: the graph of a float HF dir from its safetensors, no torch, no transformers
    r = kiln_without(("torch", "transformers", "gguf", "accelerate", "matplotlib"), "export", "onnx", tiny_dir,
                     "-o", tmp_path / "o", "--no-validate")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "model.onnx").is_file() and (tmp_path / "o" / "kiln.json").is_file()


def test_onnx_for_a_torch_stage_names_compress(tiny_dir, tmp_path):
    # a torch-less install that also lacks onnx/safetensors: a compress command names [compress], not [export]
    r = kiln_without(("torch", "safetensors"), "eval", "ppl", tiny_dir)
    assert r.returncode == 2 and "pip install 'llmkiln[compress]'" in r.stderr, r.stderr[-2000:]


def test_an_installed_module_that_fails_to_import_keeps_its_traceback(tiny_dir):
    # torch is installed but broken (a submodule is missing): a bug to see, not an extra to install
    r = kiln_without(("torch.nn",), "eval", "ppl", tiny_dir)
    assert r.returncode == 1 and "Traceback" in r.stderr and "torch.nn" in r.stderr, r.stderr[-2000:]
    assert "pip install" not in r.stderr


def test_runtime_commands_without_extras(tiny_art, tmp_path):
    r = kiln_without(NOT_IN_BASE, "run", tiny_art, "The module", "--max-new-tokens", "4", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]) == 4
    r = kiln_without(NOT_IN_BASE, "info", tiny_art, "--json")
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["kind"] == "onnx", r.stderr[-2000:]
    r = kiln_without(NOT_IN_BASE, "compress", "quantize", "--help")
    assert r.returncode == 0 and "--scheme" in r.stdout, r.stderr[-2000:]


# --- the real base install -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read()


@pytest.mark.slow
def test_base_install_in_a_fresh_venv(tiny_art, tiny_dir, tmp_path):
    """`pip install <checkout>` with no extras: no torch/transformers/matplotlib; Engine, run, serve, eval ppl
    work; compress says which extra to install. Dependencies come from the registry (pip's cache helps)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    py, kiln = venv / "bin" / "python", venv / "bin" / "kiln"
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    listed = subprocess.run([py, "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                            check=True, timeout=120).stdout
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed)}
    assert "llmkiln" in names and "onnxruntime" in names
    heavy = names & {"torch", "transformers", "matplotlib", "accelerate", "gguf", "onnx", "safetensors"}
    assert not heavy, f"the base install pulled {sorted(heavy)}"

    work = tmp_path / "cwd"  # away from the checkout, so the installed packages are the ones imported
    work.mkdir()

    def run(*args, timeout=300):
        return subprocess.run([str(a) for a in args], cwd=work, capture_output=True, text=True, timeout=timeout,
                              check=False)

    r = run(py, "-c", "import sys, llmkiln, runtime; from llmkiln import Engine; "
                      "print(llmkiln.__file__); print(runtime.__file__); print('torch' in sys.modules)")
    assert r.returncode == 0, r.stderr[-2000:]
    lk, rt, torch_loaded = r.stdout.split()
    assert lk.startswith(str(venv)) and rt.startswith(str(venv)) and torch_loaded == "False", r.stdout

    r = run(kiln, "run", tiny_art, "Hello", "--max-new-tokens", "4", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]) == 4

    # perplexity of the artifact: the same without the extras as with them (this process has them all)
    r = run(kiln, "eval", "ppl", tiny_art, "--seq-len", "64", "--windows", "2", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    base_ppl = json.loads(r.stdout.strip().splitlines()[-1])["ppl"]
    from runtime import Engine
    from runtime.evaluate import perplexity

    full = perplexity(Engine.load(tiny_art, threads=1), seq_len=64, windows=2)
    assert base_ppl == pytest.approx(full.ppl, rel=1e-6)

    r = run(kiln, "compress", "quantize", tiny_dir, "--scheme", "int8-wo", "-o", work / "q")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == ("error: `kiln compress quantize` needs torch, which is not installed: "
                                "pip install 'llmkiln[compress]'")
    r = run(kiln, "export", "onnx", tiny_dir, "-o", work / "o")
    assert r.returncode == 2 and r.stderr.strip().endswith("pip install 'llmkiln[export]'"), r.stderr[-2000:]
    assert not (work / "q").exists() and not (work / "o").exists()

    port = _free_port()
    proc = subprocess.Popen([str(kiln), "serve", str(tiny_art), "--port", str(port), "--threads", "1"], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                status, _ = _http(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "kiln serve did not come up"
                time.sleep(0.5)
        assert status == 200
        status, body = _http(f"http://127.0.0.1:{port}/v1/completions",
                             {"prompt": "Hello", "max_tokens": 3, "temperature": 0})
        out = json.loads(body)
        assert status == 200 and out["usage"]["completion_tokens"] >= 1 and isinstance(out["choices"][0]["text"], str)
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert re.search(rf"serving .* at http://127\.0\.0\.1:{port}/v1", err), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
