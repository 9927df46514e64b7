"""The real SmolLM2-135M (slow): the exported fp32 graph reproduces transformers' greedy decoding token for token."""
from __future__ import annotations

import numpy as np
import pytest

from tests.export.onnx_helpers import feeds


@pytest.mark.slow
def test_smollm2_fp32_export_greedy_identical(smollm2, tmp_path):
    import onnxruntime as ort
    import torch

    from export.onnx import export_onnx

    model, tok, info = smollm2
    m = export_onnx(info, tmp_path / "art")
    v = m.validation
    assert v.passed and v.value <= 1e-3 and v.greedy_identical_prefix == 32
    a = m.architecture
    assert (a.layers, a.heads, a.kv_heads, a.head_dim, a.vocab) == (30, 9, 3, 64, 49152)
    # a plain InferenceSession written from the contract alone, on a chat prompt
    sess = ort.InferenceSession(str(tmp_path / "art/model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.asarray([tok.apply_chat_template([{"role": "user", "content": "What is a Python list?"}],
                                              add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]])
    out = sess.run(None, feeds(a, ids))
    got = []
    for _ in range(16):
        nxt = int(out[0][0, -1].argmax())
        got.append(nxt)
        out = sess.run(None, feeds(a, np.array([[nxt]]), past=out[1:]))
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(ids), max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(ref) >= 4 and got[:len(ref)] == ref


@pytest.mark.slow
def test_smollm2_ort_form_greedy_identical(smollm2, tmp_path):
    """The ONNX Runtime form of the real model passes the same self-validation (32 greedy tokens identical to
    transformers), and a left-padded batch of two prompts decodes what each prompt decodes alone."""
    from export.onnx import export_onnx
    from runtime import Engine

    model, tok, info = smollm2
    m = export_onnx(info, tmp_path / "art", form="ort")
    v = m.validation
    assert m.io.form == "ort" and v.passed and v.value <= 1e-3 and v.greedy_identical_prefix == 32
    eng = Engine.load(tmp_path / "art", threads=2)
    prompts = ["def fibonacci(n):", "The capital of France is"]
    batch = eng.generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in batch] == [eng.generate(p, max_new_tokens=12, ignore_eos=True).token_ids
                                            for p in prompts]
