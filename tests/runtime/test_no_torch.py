"""`runtime` never imports torch, transformers or onnx: import everything, generate and score in a process
where they cannot load, with the same perplexity as here, where they are installed."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "onnx"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
import runtime
from runtime import Engine, EngineError
import runtime.engine, runtime.generate, runtime.sampling, runtime.tokenizer, runtime.textstream
import runtime.server, runtime.scheduler, runtime.openai_api, runtime.evaluate, runtime.bench
import runtime.backends.onnxruntime, runtime.backends.base
eng = Engine.load(sys.argv[1], threads=1)
r = eng.generate("The module", max_new_tokens=5, ignore_eos=True)
assert len(r.token_ids) == 5, r
from runtime.evaluate import perplexity
res = perplexity(eng, seq_len=32, windows=1)
from runtime.server import App, ServerConfig
App(eng, ServerConfig(port=0)).close()
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx"))
assert not bad, bad
print(repr(res.ppl))
print("OK")
"""


def test_runtime_works_with_torch_blocked(hand_art):
    from runtime import Engine
    from runtime.evaluate import perplexity

    r = subprocess.run([sys.executable, "-c", SCRIPT, str(hand_art)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-2000:]
    with Engine.load(hand_art, threads=1) as eng:
        here = perplexity(eng, seq_len=32, windows=1).ppl
    assert float(r.stdout.split()[-2]) == here
