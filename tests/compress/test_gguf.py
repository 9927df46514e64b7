import torch

from compress import load_model
from tests.tiny import save_tiny_gguf


def test_gguf_loads_same_model_as_hf_dir(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    gguf_file = save_tiny_gguf(tiny_dir, tmp_path / "tiny.gguf")
    ref, ref_tok, _ = load_model(str(tiny_dir))
    model, tok, info = load_model(str(gguf_file))
    assert info.kind == "gguf" and info.extra["sha256"]
    text = "def f(x):\n    return x + 1  # the attribute"
    ids = ref_tok(text, add_special_tokens=False)["input_ids"]
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    # second load comes from the converted cache
    _, _, again = load_model(str(gguf_file))
    assert again.extra["converted"] == info.extra["converted"]
