"""The real SmolLM2-135M: weight-only INT8 (no calibration needed) saves, reloads exactly and stays close."""
import pytest
import torch

pytestmark = pytest.mark.slow


def test_int8_weight_only_round_trip_on_smollm2(smollm2, tmp_path):
    import copy

    from compress.evaluate import corpus_ids, perplexity
    from compress.loading import load_model
    from compress.quant import Int8WeightOnly, quantize_, save_quantized

    model, tok, _ = smollm2
    ids = corpus_ids(tok)[:2 * 256]
    base = perplexity(model, tok, seq_len=256, windows=2, ids=ids).ppl
    q = copy.deepcopy(model)
    rec = quantize_(q, Int8WeightOnly(method="rtn"))
    assert len(rec.layers) == 30 * 7 + 1
    ppl = perplexity(q, tok, seq_len=256, windows=2, ids=ids).ppl
    assert 1.0 < ppl / base < 1.01, (ppl, base)
    out = tmp_path / "q"
    save_quantized(q, tok, out, source={"id": "smollm2-135m"})
    size = sum(p.stat().st_size for p in out.iterdir())
    assert size < 0.3 * 4 * 134.5e6  # int8 codes: about a quarter of fp32 (plus scales, tokenizer)
    q2, _, _ = load_model(str(out))
    x = torch.tensor([ids[:64]])
    with torch.inference_mode():
        assert torch.equal(q(input_ids=x).logits, q2(input_ids=x).logits)
