"""A small causal LM written directly with onnx.helper that follows the llmkiln ONNX IO contract.

It lets the runtime be tested without torch or the exporter: token + position embeddings, `layers` attention
blocks (past KV concatenated inside the graph, causal + padding mask as a finite additive bias), an lm_head.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def build(path: Path, vocab: int, layers: int = 2, heads: int = 2, head_dim: int = 8, max_pos: int = 256,
          seed: int = 0) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    hidden = heads * head_dim
    inits, nodes = [], []

    def w(name, *shape, scale=0.5):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def c(name, value, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def n(op, ins, out, **kw):
        nodes.append(helper.make_node(op, ins, [out], name=f"/{out}/{op}", **kw))
        return out

    emb, pemb = w("embed", vocab, hidden), w("pos_embed", max_pos, hidden)
    x = n("Add", [n("Gather", [emb, "input_ids"], "tok"), n("Gather", [pemb, "position_ids"], "pos")], "x0")
    # bias [B, 1, S, T]: key t visible to query s iff t <= P + s and attention_mask[b, t] == 1
    c("zero", 0), c("one", 1), c("ax1", [1]), c("ax0", [0]), c("ax12", [1, 2]), c("shape_bshd", [0, 0, heads, head_dim])
    c("shape_bsh", [0, 0, hidden])
    t_len = n("Squeeze", [n("Gather", [n("Shape", ["attention_mask"], "mshape"), "one"], "t1"), ], "T")
    s_len = n("Squeeze", [n("Gather", [n("Shape", ["input_ids"], "ishape"), "one"], "s1")], "S")
    p_len = n("Sub", [t_len, s_len], "P")
    t_idx = n("Range", ["zero", t_len, "one"], "t_idx")  # [T]
    s_idx = n("Unsqueeze", [n("Range", [p_len, t_len, "one"], "q_idx"), "ax1"], "s_idx")  # [S, 1]
    causal = n("LessOrEqual", [t_idx, s_idx], "causal")  # [S, T]
    pad = n("Unsqueeze", [n("Cast", ["attention_mask"], "mask_b", to=TensorProto.BOOL), "ax12"], "pad")  # [B,1,1,T]
    allowed = n("And", [causal, pad], "allowed")  # [B, 1, S, T]
    c("fz", 0.0, np.float32), c("fneg", -1e9, np.float32), c("scale", 1.0 / np.sqrt(head_dim), np.float32)
    bias = n("Where", [allowed, "fz", "fneg"], "bias")
    for i in range(layers):
        pre = f"l{i}"
        q = n("Transpose", [n("Reshape", [n("MatMul", [x, w(f"{pre}.wq", hidden, hidden)], f"{pre}.q0"),
                                          "shape_bshd"], f"{pre}.q1")], f"{pre}.q", perm=[0, 2, 1, 3])
        k = n("Transpose", [n("Reshape", [n("MatMul", [x, w(f"{pre}.wk", hidden, hidden)], f"{pre}.k0"),
                                          "shape_bshd"], f"{pre}.k1")], f"{pre}.k", perm=[0, 2, 1, 3])
        v = n("Transpose", [n("Reshape", [n("MatMul", [x, w(f"{pre}.wv", hidden, hidden)], f"{pre}.v0"),
                                          "shape_bshd"], f"{pre}.v1")], f"{pre}.v", perm=[0, 2, 1, 3])
        pk = n("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
        pv = n("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
        kt = n("Transpose", [pk], f"{pre}.kt", perm=[0, 1, 3, 2])
        sc = n("Add", [n("Mul", [n("MatMul", [q, kt], f"{pre}.qk"), "scale"], f"{pre}.qks"), bias], f"{pre}.sc")
        att = n("MatMul", [n("Softmax", [sc], f"{pre}.p", axis=-1), pv], f"{pre}.att")  # [B, H, S, hd]
        o = n("Reshape", [n("Transpose", [att], f"{pre}.att_t", perm=[0, 2, 1, 3]), "shape_bsh"], f"{pre}.o0")
        x = n("Add", [x, n("MatMul", [o, w(f"{pre}.wo", hidden, hidden, scale=0.2)], f"{pre}.o")], f"{pre}.x")
    x = n("Gather", [x, "logits_positions"], "picked", axis=1)  # only the positions asked for
    n("MatMul", [x, w("lm_head", hidden, vocab, scale=1.0)], "logits")

    kv = [f"past_key_values.{i}.{t}" for i in range(layers) for t in ("key", "value")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["B", "S"]),
              helper.make_tensor_value_info("logits_positions", TensorProto.INT64, ["K"])]
    inputs += [helper.make_tensor_value_info(k_, TensorProto.FLOAT, ["B", heads, "P", head_dim]) for k_ in kv]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "K", vocab])]
    outputs += [helper.make_tensor_value_info(k_.replace("past_key_values", "present"), TensorProto.FLOAT,
                                              ["B", heads, "T", head_dim]) for k_ in kv]
    graph = helper.make_graph(nodes, "handgraph", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)


def io_record(layers: int, heads: int, head_dim: int, vocab: int):
    """The kiln.json ``io`` record of the hand-built graph (the contract's names, its own dim names)."""
    from runtime.records import IO_VERSION, IOSpec, TensorSpec

    ins = [TensorSpec("input_ids", "int64", ("B", "S")), TensorSpec("attention_mask", "int64", ("B", "T")),
           TensorSpec("position_ids", "int64", ("B", "S")), TensorSpec("logits_positions", "int64", ("K",))]
    outs = [TensorSpec("logits", "float32", ("B", "K", vocab))]
    for i in range(layers):
        for t in ("key", "value"):
            ins.append(TensorSpec(f"past_key_values.{i}.{t}", "float32", ("B", heads, "P", head_dim)))
            outs.append(TensorSpec(f"present.{i}.{t}", "float32", ("B", heads, "T", head_dim)))
    return IOSpec(version=IO_VERSION, form="portable", opset=21, inputs=tuple(ins), outputs=tuple(outs))


def make_artifact(out: Path, tokenizer_dir: Path, layers: int = 2, heads: int = 2, head_dim: int = 8,
                  max_pos: int = 256) -> Path:
    """An onnx artifact dir: the hand-built graph, the tokenizer files of ``tokenizer_dir``, kiln.json."""
    import shutil

    from runtime.manifest import Architecture, Manifest

    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    build(out, vocab, layers=layers, heads=heads, head_dim=head_dim, max_pos=max_pos)
    arch = Architecture(model_type="llama", layers=layers, hidden=heads * head_dim, intermediate=0, heads=heads,
                        kv_heads=heads, head_dim=head_dim, vocab=vocab, max_position=max_pos, rope_theta=1e4,
                        rms_eps=1e-5, tied_embeddings=False, bos_token_id=1, eos_token_id=2)
    m = Manifest(kind="onnx", architecture=arch, source={"model": "handgraph"}, io=io_record(layers, heads, head_dim,
                                                                                             vocab))
    m.record_files(out)
    m.save(out)
    return out
