"""lm-evaluation-harness `local-completions` through `kiln serve` scores a multiple-choice task item for item as
`--model hf` does on the same fp32 weights (benchmarks/lm_eval_parity.py on the tiny model).

Needs a Python with lm_eval[api,hf]==0.4.13: $KILN_LMEVAL_PYTHON, else .venv-lmeval/bin/python."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _lmeval_python() -> str | None:
    if os.environ.get("KILN_LMEVAL_PYTHON"):
        return os.environ["KILN_LMEVAL_PYTHON"]
    local = ROOT / ".venv-lmeval" / "bin" / "python"
    return str(local) if local.exists() else None


PY = _lmeval_python()


@pytest.mark.slow
@pytest.mark.skipif(PY is None, reason="needs a Python with lm_eval[api,hf]==0.4.13: set KILN_LMEVAL_PYTHON or "
                                       "create .venv-lmeval (python3 -m venv .venv-lmeval; pip install "
                                       "torch==2.13.0 'lm_eval[api,hf]==0.4.13')")
def test_lm_eval_local_completions_matches_hf(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lm_eval_parity.py"), "--lmeval-python", PY,
                        "--work", str(tmp_path), "--threads", "1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "items 40, loglikelihoods 160" in r.stdout and "parity: ok" in r.stdout
