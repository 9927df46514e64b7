"""Load-time graph edit: let the caller choose which positions the lm_head computes logits for.

The ONNX contract returns logits for every position ([B, S, vocab]). Prefill only needs the last one, and for
a 512-token prompt the lm_head over all positions is ~10% of the work and a 100 MB buffer. This inserts
``Gather(hidden, logits_positions, axis=1)`` in front of the lm_head MatMul and adds the int64 input
``logits_positions [K]``; scoring passes every position, generation the last. The edit touches only the graph
structure (loaded without the external weights); when the pattern is not found the graph is used as is.
"""
from __future__ import annotations

from pathlib import Path

POSITIONS = "logits_positions"
_PASS_THROUGH = {"Cast", "Identity"}


def _find_lm_head(graph, output: str = "logits"):
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    name = output
    for _ in range(8):
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type in ("MatMul", "MatMulNBits", "MatMulInteger"):
            return node
        if node.op_type in _PASS_THROUGH or (node.op_type == "Add" and any(i in inits for i in node.input)):
            name = next(i for i in node.input if i not in inits)
            continue
        return None
    return None


def _inline_small(graph, base: Path, limit: int = 1 << 16) -> None:
    """Bring small external tensors (shapes, axes, scalars) inline: shape inference on a graph given as
    bytes cannot read external data, and the big weights stay external."""
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_tensor

    for t in graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        meta = {e.key: e.value for e in t.external_data}
        if int(meta.get("length", limit + 1)) <= limit:
            load_external_data_for_tensor(t, str(base))
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]


def with_logits_positions(model_path: str | Path) -> bytes | None:
    """The serialized graph with a ``logits_positions`` input, or None when it cannot be added."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        return None
    model = onnx.load(str(model_path), load_external_data=False)
    g = model.graph
    _inline_small(g, Path(model_path).parent)
    if any(i.name == POSITIONS for i in g.input) or not any(o.name == "logits" for o in g.output):
        return None
    mm = _find_lm_head(g)
    if mm is None:
        return None
    hidden = mm.input[0]
    picked = hidden + "/kiln_logits_positions"
    gather = helper.make_node("Gather", [hidden, POSITIONS], [picked], axis=1,
                              name="/kiln/logits_positions/Gather")
    mm.input[0] = picked
    nodes = list(g.node)
    at = nodes.index(mm)
    g.node.insert(at, gather)
    g.input.append(helper.make_tensor_value_info(POSITIONS, TensorProto.INT64, [POSITIONS]))
    for o in g.output:
        if o.name == "logits":
            dims = o.type.tensor_type.shape.dim
            if len(dims) == 3:
                dims[1].Clear()
                dims[1].dim_param = POSITIONS
    # shapes recorded for the edited path no longer hold
    keep = [v for v in g.value_info if v.name not in (hidden, picked) and v.name not in mm.output]
    del g.value_info[:]
    g.value_info.extend(keep)
    return model.SerializeToString()
