"""The ONNX Runtime form's int8 KV cache (``--form ort --kv-cache int8``, IO contract version 4).

ONNX Runtime's ``GroupQueryAttention`` reads an int8 cache directly (no dequantized copy of the past) when its
scales are static: one float32 per KV head and channel, ``k_scale`` / ``v_scale`` [1, kv_heads, 1, head_dim],
constants of the graph. When the checkpoint carries scales (``kiln compress quantize --kv-cache int8``, its
kiln.json ``kv_cache`` record and ``kv_cache/scales.safetensors``), the export takes them. Otherwise it builds the
float-cache graph, runs it on calibration windows (the end of the calibration corpus, never the windows
evaluation reads) and applies the same rule (runtime.kvscales: per layer, KV head and channel, amax / 127,
keys by the norm of the channel pair rotary turns together). It then turns the graph's past/present into int8
and gives every attention node its scales. A value beyond what calibration saw
is clipped to ±127 codes. The portable graph's per-token scales (``kvcache``, version 3) need no calibration.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.kvscales import KEY, KV_SCALES_FILE, VALUE, KVAmax, KVScales
from runtime.records import POSITIONS, KVCacheRecord

from ..errors import ExportError
from .validate import past_feeds, step_feeds

DEFAULT_WINDOWS, DEFAULT_SEQ_LEN = 8, 512


def calibrate(onnx_path: Path, tokenizer_dir: Path, arch, corpus: str | None = None,
              windows: int = DEFAULT_WINDOWS, seq_len: int = DEFAULT_SEQ_LEN, progress=None) -> KVScales:
    """Run the float-cache graph at ``onnx_path`` on ``windows`` calibration windows and return the scales."""
    import onnxruntime as ort

    from runtime.corpus import BUILTIN, CorpusError, calibration_windows, load_text
    from runtime.tokenizer import Tokenizer

    seq_len = min(seq_len, arch.max_position) if getattr(arch, "max_position", None) else seq_len
    try:
        ids = Tokenizer(tokenizer_dir).encode(load_text(corpus or BUILTIN), add_special_tokens=False)
        wins = calibration_windows(ids, seq_len, windows)
    except CorpusError as e:
        raise ExportError(f"KV cache calibration: {e}") from None
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    positions = any(i.name == POSITIONS for i in sess.get_inputs())
    empty = past_feeds(sess, None, 1, arch.kv_heads)
    amax = KVAmax(arch.layers, arch.kv_heads, arch.head_dim)
    names = [f"present.{i}.{k}" for i in range(arch.layers) for k in ("key", "value")]
    for w in wins:
        feeds = {**step_feeds(np.asarray([w], np.int64)), **empty}
        if positions:
            feeds[POSITIONS] = np.asarray([len(w) - 1], np.int64)  # one row of logits: only the cache is read
        outs = sess.run(names, feeds)
        for i in range(arch.layers):  # present [1, kv_heads, s, head_dim]
            amax.add(i, outs[2 * i], outs[2 * i + 1])
        if progress is not None:
            progress()
    try:
        return amax.scales(len(wins), seq_len)
    except ValueError as e:
        raise ExportError(f"KV cache calibration: {e}") from None


def load_checkpoint_scales(root: Path, record: KVCacheRecord, arch) -> KVScales:
    """The scales a checkpoint's quantize pass recorded (``record.file`` in ``root``), checked against ``arch``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(root) / (record.file or KV_SCALES_FILE)
    try:
        t = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ExportError(f"{path}: the checkpoint's KV scales cannot be read ({' '.join(str(e).split())[:200]}); "
                          "re-quantize it with --kv-cache int8") from None
    if KEY not in t or VALUE not in t:
        raise ExportError(f"{path}: needs tensors {KEY} and {VALUE}; re-quantize the checkpoint with --kv-cache int8")
    scales = KVScales(t[KEY], t[VALUE], record.windows, record.seq_len)
    try:
        scales.check(arch.layers, arch.kv_heads, arch.head_dim, str(path))
    except ValueError as e:
        raise ExportError(str(e)) from None
    return scales


def make_static(onnx_path: Path, scales: KVScales, arch) -> None:
    """Rewrite ``onnx_path`` (the graph only: its external data file is untouched) so past/present are int8 and
    each layer's GroupQueryAttention quantizes and reads them with that layer's scales."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    kv = [v for v in list(g.input) + list(g.output) if v.name.startswith(("past_key_values.", "present."))]
    if len(kv) != 4 * arch.layers:
        raise ExportError(f"{onnx_path}: expected {4 * arch.layers} KV inputs and outputs, found {len(kv)}")
    for v in kv:
        v.type.tensor_type.elem_type = TensorProto.INT8
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    if len(gqa) != arch.layers:
        raise ExportError(f"{onnx_path}: expected {arch.layers} GroupQueryAttention nodes, found {len(gqa)}")
    shape = (1, arch.kv_heads, 1, arch.head_dim)
    for n in gqa:
        layer = int(n.output[1].split(".")[1])  # present.{layer}.key
        names = []
        for kind, table in (("key", scales.key), ("value", scales.value)):
            name = f"/model/layers.{layer}/attn/kv_cache/{kind}_scale"
            g.initializer.append(numpy_helper.from_array(table[layer].reshape(shape).astype(np.float32), name))
            names.append(name)
        ins = list(n.input) + [""] * (12 - len(n.input))  # up to head_sink (index 11); k_scale, v_scale follow
        del n.input[:]
        n.input.extend(ins[:12] + names)
        n.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                            helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                            helper.make_attribute("kv_cache_bit_width", 8)])
    tmp = onnx_path.with_name(onnx_path.name + ".static")
    onnx.save(model, str(tmp))
    tmp.replace(onnx_path)
