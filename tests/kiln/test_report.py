"""kiln/report.py: report.png drawn on a private Figure (no matplotlib global state), skipped in one line
without matplotlib while report.md is still written."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

REPORT = {
    "source": "tiny", "target": "cpu", "recipe": "int8-wo",
    "eval": {"text": "builtin:pydoc", "windows": 2, "seq_len": 32},
    "bench": {"prompt_len": 8, "new_tokens": 8, "runs": 3},
    "stages": [
        {"name": "source", "kind": "hf", "ppl": 20.0, "ppl_ratio": 1.0, "bytes_on_disk": 4_000_000},
        {"name": "int8-wo", "kind": "checkpoint", "ppl": 20.1, "ppl_ratio": 1.005, "bytes_on_disk": 1_000_000},
        {"name": "onnx", "kind": "onnx", "ppl": 20.1, "ppl_ratio": 1.005, "bytes_on_disk": 1_100_000,
         "decode_tokens_per_s": 300.0, "ttft_ms": 2.0, "prefill_ms": 10.0},
    ],
    "artifact": "out/onnx", "next_steps": [],
}

BLOCK = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""

RUN = r"""
import json, sys
from pathlib import Path
from kiln.report import write_report
report = json.loads(sys.argv[2])
write_report(Path(sys.argv[1]), report)
print(json.dumps({"plot": report.get("plot"), "pyplot": "matplotlib.pyplot" in sys.modules,
                  "backend": sys.modules["matplotlib"].rcParams._get("backend") if "matplotlib" in sys.modules
                  else None}))
"""


def _run(tmp_path, prelude="", env_backend="svg"):
    import os

    env = dict(os.environ, MPLBACKEND=env_backend)
    r = subprocess.run([sys.executable, "-c", prelude + RUN, str(tmp_path), json.dumps(REPORT)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_report_png_leaves_matplotlib_state_alone(tmp_path):
    out, _ = _run(tmp_path)
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert out == {"plot": "report.png", "pyplot": False, "backend": "svg"}  # the user's backend, untouched
    assert "![perplexity vs size and speed](report.png)" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob("*.tmp.png"))


def test_report_without_matplotlib_skips_the_png_in_one_line(tmp_path):
    (tmp_path / "report.png").write_bytes(b"stale")  # from an earlier run: must not survive next to the new md
    out, err = _run(tmp_path, prelude=BLOCK)
    assert out["plot"] is None and out["backend"] is None
    assert err.strip() == "report.png skipped: matplotlib is not installed (pip install 'llmkiln[report]')"
    assert not (tmp_path / "report.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "| int8-wo | checkpoint | 20.1000 | 1.0050 | 1.0 |" in md and "report.png" not in md
