import os
import shutil
from pathlib import Path

# Under pytest-xdist (the README's command runs 2 workers on a 2-core box) the cores are shared out: OpenMP /
# torch threads per worker and per process it starts = cores // workers (2 workers x 2 threads on 2 cores ran
# the fast loop in 177 s, 1 thread each in 137 s). Set before anything imports torch; one already set is kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import pytest  # noqa: E402 - after the thread setting above

from tests.tiny import save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64, 4 query / 2 KV heads, tied embeddings) as an HF dir."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny model dir, for tests that might touch it."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_dir, dst)
    return dst


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (slow tests only): loaded once per session."""
    from compress.loading import load_model

    return load_model("smollm2-135m")


def pytest_collection_modifyitems(config, items):
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except Exception:
        has_trt = False
    skip = pytest.mark.skip(reason="needs TensorRT and an NVIDIA GPU (pip install 'llmkiln[gpu]' on an H100)")
    for item in items:
        if "gpu" in item.keywords and not has_trt:
            item.add_marker(skip)
