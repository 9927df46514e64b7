"""Helpers for the ONNX export tests: tiny quantized checkpoints and plain ONNX Runtime runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# int8-sq with every input quantized: the full QDQ pattern TensorRT gets (its default keeps down_proj inputs float)
SCHEME_KW = {"int8-wo": {"method": "rtn"}, "fp8": {}, "int8-sq": {"float_inputs": ()}, "int8-dyn": {},
             "int4": {"method": "rtn", "group_size": 32}, "int8-group": {"method": "rtn", "group_size": 32}}


def make_quantized(src: Path, out: Path, scheme: str) -> Path:
    """Quantize the tiny HF model at ``src`` with ``scheme`` (calibrated on a few short windows) into ``out``."""
    from compress.calib import calibration_batches
    from compress.checkpoint import source_record
    from compress.loading import load_model
    from compress.quant import config_for, quantize_, save_quantized

    model, tok, info = load_model(str(src))
    calib = calibration_batches(tok, samples=4, seq_len=64)
    quantize_(model, config_for(scheme, **SCHEME_KW[scheme]), calib=calib)
    save_quantized(model, tok, out, source=source_record(info))
    return out


def feeds(arch, ids: np.ndarray, mask: np.ndarray | None = None, past: list | None = None,
          pos: np.ndarray | None = None) -> dict:
    """Feeds exactly as the contract states, written from the IO names only."""
    B, S = ids.shape
    P = 0 if past is None else past[0].shape[2]
    mask = np.ones((B, P + S), np.int64) if mask is None else mask
    if pos is None:
        pos = np.broadcast_to(np.arange(P, P + S), (B, S))
    f = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
         "position_ids": np.ascontiguousarray(pos, dtype=np.int64),
         "logits_positions": np.arange(S, dtype=np.int64)}  # logits for every position
    for i in range(arch.layers):
        for j, kind in enumerate(("key", "value")):
            f[f"past_key_values.{i}.{kind}"] = (np.zeros((B, arch.kv_heads, 0, arch.head_dim), np.float32)
                                                if past is None else past[2 * i + j])
    return f


def kv_graph_scales(art: Path) -> dict[str, np.ndarray]:
    """The ort form's static KV-cache scales, the graph's ``/kv_cache/`` initializers, by name."""
    import onnx

    m = onnx.load(str(Path(art) / "model.onnx"), load_external_data=False)
    return {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer if "/kv_cache/" in i.name}
