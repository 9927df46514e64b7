import pytest


@pytest.fixture(scope="module")
def calib(tiny_dir):
    """4 calibration windows of 64 tokens from the tiny model's tokenizer (a module overrides it by its own)."""
    from compress.calib import calibration_batches
    from compress.loading import load_model

    _, tok, _ = load_model(str(tiny_dir))
    return calibration_batches(tok, samples=4, seq_len=64)
