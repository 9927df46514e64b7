"""Pruning on the real SmolLM2-135M (slow): structured checkpoints load in plain transformers, 2:4 is exact."""
import copy

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_width_checkpoint_loads_in_transformers(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from compress.checkpoint import save_checkpoint, source_record
    from compress.prune import StructuredWidth, prune_
    from compress.calib import calibration_batches

    model, tok, info = smollm2
    small = copy.deepcopy(model)
    calib = calibration_batches(tok, "builtin:pydoc", 2, 128)
    rep = prune_(small, StructuredWidth(mlp=0.25, kv_groups=1), calib=calib)
    out = tmp_path / "narrow"
    save_checkpoint(small, tok, out, source=source_record(info), passes=[rep.to_pass()])
    plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    c = plain.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (1152, 6, 2, 64)
    x = calib[0][:, :64]
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, small(input_ids=x).logits)
        # still a language model: next-token loss on calibration text far below uniform (ln 49152 = 10.8)
        loss = torch.nn.functional.cross_entropy(plain(input_ids=x).logits[0, :-1], x[0, 1:])
    assert loss < 6.0
    assert rep.stats["parameters_after"] < 0.85 * rep.stats["parameters_before"]


def test_smollm2_magnitude_2of4_is_exact(smollm2):
    from compress.prune import NM, Magnitude, prune_

    model = copy.deepcopy(smollm2[0])
    rep = prune_(model, Magnitude(NM(2, 4)))
    assert rep.stats["matrices"] == 30 * 7 and rep.stats["sparsity"] == 0.5
    for name, keep in rep.masks.items():
        w = model.get_submodule(name).weight
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all(), name
