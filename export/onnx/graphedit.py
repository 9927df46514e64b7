"""Edit a graph this project did not build (optimum-onnx's) to the IO contract's ``logits_positions``:
insert ``Gather(hidden, logits_positions, axis=1)`` in front of the lm_head and add the int64 input, so
logits come only for the positions asked for (generation asks for the last one, scoring for all).
Graphs built by ``build_decoder`` have the Gather from the start."""
from __future__ import annotations

from runtime.records import POSITIONS

_MATMULS = {"MatMul", "Gemm", "MatMulNBits", "MatMulInteger"}
_AFTER = {"Reshape", "Cast", "Identity", "Mul", "Add", "Div"}  # between the lm_head product and `logits`
_BEFORE = {"Reshape", "Cast", "Identity", "QuantizeLinear", "DequantizeLinear"}  # between hidden and product


def find_final_hidden(graph, output: str = "logits") -> str | None:
    """The [B, S, hidden] tensor the lm_head reads: walk back from ``output`` over reshapes, casts and scale
    multiplies to the lm_head MatMul/Gemm, then over the flattening Reshape / activation QDQ before it."""
    producer = {o: n for n in graph.node for o in n.output}
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                     for o in n.output}
    name, mm = output, None
    for _ in range(8):
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type in _MATMULS:
            mm = node
            break
        if node.op_type not in _AFTER:
            return None
        name = node.input[0]
        if name in consts:
            return None
    if mm is None:
        return None
    h = mm.input[0]
    for _ in range(4):
        node = producer.get(h)
        if node is None or node.op_type not in _BEFORE:
            break
        h = node.input[0]
    return None if h in consts or h in {i.name for i in graph.input} else h


def add_logits_positions(g) -> bool:
    """Insert the ``logits_positions`` Gather in front of the lm_head; False when the pattern is not found."""
    from onnx import TensorProto, helper

    if any(i.name == POSITIONS for i in g.input) or not any(o.name == "logits" for o in g.output):
        return False
    hidden = find_final_hidden(g)
    if hidden is None:
        return False
    picked = hidden + "/kiln_logits_positions"
    gather = helper.make_node("Gather", [hidden, POSITIONS], [picked], axis=1,
                              name="/kiln/logits_positions/Gather")
    users = [n for n in g.node if hidden in n.input]
    for n in users:
        for k, name in enumerate(n.input):
            if name == hidden:
                n.input[k] = picked
    first = min(list(g.node).index(n) for n in users)
    g.node.insert(first, gather)
    g.input.append(helper.make_tensor_value_info(POSITIONS, TensorProto.INT64, [POSITIONS]))
    for o in g.output:
        if o.name == "logits":
            dims = o.type.tensor_type.shape.dim
            if len(dims) == 3:
                dims[1].Clear()
                dims[1].dim_param = POSITIONS
    del g.value_info[:]  # recorded shapes downstream of the edit no longer hold; ORT infers them again
    return True
