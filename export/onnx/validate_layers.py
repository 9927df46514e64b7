"""Self-validation one decoder layer at a time, for models whose float32 torch copy does not fit in memory.

The graph is cut at the residual stream between layers (the builder records the tensor names:
``GraphBuilder.boundaries``). Each layer's subgraph runs alone on ONNX Runtime, its weights read from the
artifact's model.onnx.data, on exactly the hidden state the torch layer of the checkpoint receives; the torch
side is built one layer at a time (compress.lazy). Last, the final norm and lm_head. Memory: one layer on
each side. The metric per cut: max |Δ| / (max - min) of the torch output, with the graph's own math (basic
optimizations) and as the runtime runs it (all optimizations).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.records import POSITIONS, LayerCheck, Validation

from ..errors import ExportError
from .validate import KV_TOLERANCES, PROMPT, _rel, checkpoint_tolerances

LAYER_GRAPH_TOLERANCE = 1e-3
# The graph-math check runs with basic optimizations, which fold a DequantizeLinear of a constant into a float32
# copy of the weights: for a quantized lm_head over a big vocabulary (128k x 4096: 2.1 GB) that copy would be
# the biggest thing in memory, so that one cut is checked as the runtime runs it only.
HEAD_GRAPH_BYTES = 256 << 20


def _empty_past(elem: int, kv_heads: int, last: int):
    """A zero-length past of ONNX element type ``elem`` ([1, kv_heads, 0, last]); FP8 codes go in typed."""
    if elem == 17:  # FLOAT8E4M3FN: numpy has no such dtype, ONNX Runtime takes the bytes tagged with it
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.zeros((1, kv_heads, 0, last), np.uint8), 17)
    return np.zeros((1, kv_heads, 0, last), {1: np.float32, 3: np.int8}[elem])


def subgraph(model, inputs: list[str], outputs: list[str], hidden: int):
    """The nodes computing ``outputs`` from ``inputs`` (and the graph's own inputs), as a standalone model
    whose initializers still point into the same model.onnx.data."""
    from onnx import TensorProto, helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    graph_inputs = {i.name: i for i in g.input}
    inits = {t.name: t for t in g.initializer}
    keep, seen, stack = [], set(inputs), list(outputs)
    used_inputs, used_inits = [], []
    while stack:
        name = stack.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name in inits:
            used_inits.append(inits[name])
        elif name in graph_inputs:
            used_inputs.append(graph_inputs[name])
        elif name in producer:
            node = producer[name]
            if id(node) not in {id(k) for k in keep}:
                keep.append(node)
                stack.extend(node.input)
        else:
            raise ExportError(f"validation: tensor {name} has no producer in the graph")
    order = {id(n): k for k, n in enumerate(g.node)}
    keep.sort(key=lambda n: order[id(n)])
    vin = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", hidden]) for n in inputs]
    outs = {o.name: o for o in g.output}
    vout = [outs[n] if n in outs else helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", hidden])
            for n in outputs]
    sub = helper.make_graph(keep, "layer", vin + used_inputs, vout, initializer=used_inits)
    m = helper.make_model(sub, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m


def _session(model, folder: Path, basic: bool, prepack: bool = True):
    """``prepack=False`` for the head over a big vocabulary: ONNX Runtime would otherwise hold the table twice
    (its mapped bytes and a prepacked copy for the Gemm); the products are the same MLAS kernels either way."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if basic
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    so.log_severity_level = 3
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def validate_layers(onnx_path: Path, boundaries: list, lazy, tokenizer, arch, specs: dict,
                    reason: str, progress=None, kv: str = "float") -> Validation:
    """Each cut of the graph against the torch layers of the checkpoint ``lazy`` (compress.lazy.LazyModel).
    ``kv``: the graph's KV cache format (a quantized one loosens the tolerances as in ``validate``)."""
    import onnx
    import torch

    from compress.calib import forward_loop
    from compress.memory import give_back
    from compress.sequential import Streamed

    graph_tol, tol = checkpoint_tolerances(specs)
    graph_tol = LAYER_GRAPH_TOLERANCE if graph_tol is None else graph_tol
    if kv != "float":
        graph_tol, tol = max(graph_tol, KV_TOLERANCES[kv]), max(tol, KV_TOLERANCES[kv])
    model = onnx.load(str(onnx_path), load_external_data=False)
    folder = Path(onnx_path).parent
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"][:24]
    ids = np.asarray([ids], dtype=np.int64) % arch.vocab
    S = ids.shape[1]
    base = {"input_ids": ids, "attention_mask": np.ones((1, S), np.int64),
            "position_ids": np.arange(S, dtype=np.int64)[None], POSITIONS: np.arange(S, dtype=np.int64)}
    src = Streamed(lazy)
    big_head = arch.vocab * arch.hidden * 4 > HEAD_GRAPH_BYTES  # a float32 copy of the head table
    checks = []
    with torch.no_grad():
        ((h, kw),) = src.capture(forward_loop([torch.from_numpy(ids)]))
        for i, (ins, outs) in enumerate(boundaries):
            last = outs == ["logits"]
            if last:
                norm = lazy.norm()
                hn = norm(h)[0]
                ref = torch.cat([hn @ lazy.head_rows(lo, min(lo + 8192, arch.vocab)).T
                                 for lo in range(0, arch.vocab, 8192)], dim=1)[None].numpy()
                wanted = ["logits"]
            else:
                layer = src.layer(i)
                out = layer(h, **kw)
                src.release(i)
                ref = out.numpy()
                wanted = outs + [f"present.{i}.key", f"present.{i}.value"]
            sub = subgraph(model, ins, wanted, arch.hidden)
            feed = {k: v for k, v in base.items() if k in {x.name for x in sub.graph.input}}
            x = h.numpy()
            feed[ins[0]] = x
            if len(ins) > 1:
                feed[ins[1]] = np.zeros_like(x)  # the residual split as (x, 0): the skip-norm adds them
            for v in sub.graph.input:  # a zero-length past: float, or a quantized cache's codes and scales
                if v.name.startswith(f"past_key_values.{i}."):
                    dims = v.type.tensor_type.shape.dim
                    feed[v.name] = _empty_past(v.type.tensor_type.elem_type, arch.kv_heads, dims[3].dim_value)
            vals = []
            quantized_head = last and big_head and "lm_head" in specs
            for basic in (True, False):
                if basic and quantized_head:
                    vals.append(None)
                    continue
                got = _session(sub, folder, basic, prepack=not (last and big_head)).run(wanted[: len(outs)], feed)
                y = got[0] if len(got) == 1 else got[0] + got[1]
                vals.append(_rel(y, ref)[1])
                del got, y
            checks.append(LayerCheck(layer=-1 if last else i, graph=vals[0], ort_cpu=vals[1]))
            give_back()
            if not last:
                h = out
            if progress is not None:
                progress()
    worst_graph = max(c.graph for c in checks if c.graph is not None)
    worst = max(c.ort_cpu for c in checks)
    result = Validation(passed=True, mode="per-layer", reason=reason,
                        reference="torch layers of the same checkpoint, one at a time" +
                                  (" (fake-quant)" if specs else ""),
                        runtime="onnxruntime CPUExecutionProvider",
                        metric="per layer: max |out_ort - out_torch| / (max - min of out_torch), same input",
                        prompt_tokens=int(S), value=worst, tolerance=tol, per_layer=tuple(checks))
    problems = []
    if worst_graph > graph_tol:
        bad = max((c for c in checks if c.graph is not None), key=lambda c: c.graph)
        problems.append(f"layer {bad.layer}'s graph math differs from the torch layer by {bad.graph:.3g} "
                        f"(tolerance {graph_tol:g})")
    if worst > tol:
        bad = max(checks, key=lambda c: c.ort_cpu)
        problems.append(f"layer {bad.layer} on ONNX Runtime differs by {bad.ort_cpu:.3g} (tolerance {tol:g})")
    if problems:
        raise ExportError(f"self-validation (per layer) failed on ONNX Runtime CPU: {'; '.join(problems)}; "
                          "no artifact was written")
    return result
