"""What one SmolLM2-135M decode step costs in ONNX Runtime's weight-only matmul kernels alone.

    .venv/bin/python -m benchmarks.matmul_floor [--threads 2] [--bits 8,4,32] [--block 32] [--rows 1,8]

Builds a graph of nothing but the step's MatMulNBits nodes (the kernel ORT runs for DequantizeLinear ->
MatMul of int8/int4 weights, accuracy level 4), with SmolLM2's shapes and random codes, and times one
batch-1 pass over all of them (median of 5 x 20 passes), per layer as the checkpoint has them (q, k, v, o,
gate, up, down: 7 per layer) and with q/k/v and gate/up stacked (4 per layer), lm_head included.
Compare with `kiln bench`'s decode time per token: the rest of the step is attention, norms, RoPE and
residuals. ``--bits 32`` times plain float32 MatMul nodes of the same shapes (the fp32 artifact's floor,
which streams about 540 MB of weights per step). ``--rows 8`` times 8 rows per pass: a batch-8 decode step,
as the server runs for 8 concurrent clients.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

H, INTER, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152


def step_shapes(stacked: bool) -> list[tuple[int, int]]:
    per = ([(H, H + 2 * KV), (H, H), (H, 2 * INTER), (INTER, H)] if stacked else
           [(H, H), (H, KV), (H, KV), (H, H), (H, INTER), (H, INTER), (INTER, H)])
    return per * LAYERS + [(H, VOCAB)]


def time_step(bits: int, block: int, stacked: bool, threads: int, rows: int = 1) -> float:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for i, (k, n) in enumerate(step_shapes(stacked)):
        if bits == 32:  # plain float32 MatMul: what the fp32 artifact runs
            inits.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["x" if k == H else "x_inter", f"w{i}"], [f"y{i}"]))
            outs.append(f"y{i}")
            continue
        nb = (k + block - 1) // block
        inits.append(numpy_helper.from_array(rng.integers(0, 255, (n, nb, block * bits // 8), dtype=np.uint8), f"w{i}"))
        inits.append(numpy_helper.from_array((rng.random(n * nb, dtype=np.float32) * 0.01), f"s{i}"))
        nodes.append(helper.make_node("MatMulNBits", ["x" if k == H else "x_inter", f"w{i}", f"s{i}"], [f"y{i}"],
                                      domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                                      accuracy_level=4))
        outs.append(f"y{i}")
    graph = helper.make_graph(nodes, "matmuls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, H]),
                                                 helper.make_tensor_value_info("x_inter", TensorProto.FLOAT, [rows, INTER])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"x": rng.random((rows, H), dtype=np.float32), "x_inter": rng.random((rows, INTER), dtype=np.float32)}
    for _ in range(5):
        sess.run(None, feeds)
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20):
            sess.run(None, feeds)
        runs.append((time.perf_counter() - t) / 20)
    return statistics.median(runs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", default="8,4,32")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--rows", default="1", help="Comma-separated rows per pass (batch size of a decode step).")
    args = ap.parse_args(argv)
    for bits in (int(b) for b in args.bits.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            for stacked in (False, True):
                ms = 1e3 * time_step(bits, args.block, stacked, args.threads, rows)
                print(json.dumps({"bits": bits, "block": args.block, "rows": rows,
                                  "matmuls_per_step": len(step_shapes(stacked)), "stacked_qkv_gate_up": stacked,
                                  "ms_per_step": round(ms, 2),
                                  "tokens_per_s_if_only_matmuls": round(rows * 1e3 / ms, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
