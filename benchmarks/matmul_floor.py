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


def product_graph(products: list[tuple[int, int, int, int]], threads: int, rows: int = 1):
    """An ONNX Runtime session of nothing but weight products, one per (K, N, bits, block): bits 32 a plain
    float32 MatMul, else ``MatMulNBits`` (accuracy level 4, random codes, a float32 scale per block), one input
    [rows, K] per distinct K. Returns (session, feeds, weight bytes)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, outs, ks, nbytes = [], [], [], {}, 0
    for i, (k, n, bits, block) in enumerate(products):
        ks.setdefault(k, helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [rows, k]))
        if bits == 32:  # plain float32 MatMul: what the fp32 artifact runs
            w = rng.standard_normal((k, n), dtype=np.float32) * 0.02
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
            nbytes += w.nbytes
        else:
            nb = (k + block - 1) // block
            codes = rng.integers(0, 256, (n, nb, block * bits // 8), dtype=np.uint8)
            scales = (rng.random(n * nb, dtype=np.float32) + 0.5) * 1e-3
            inits += [numpy_helper.from_array(codes, f"w{i}"), numpy_helper.from_array(scales, f"s{i}")]
            nodes.append(helper.make_node("MatMulNBits", [f"x{k}", f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                          K=k, N=n, bits=bits, block_size=block, accuracy_level=4))
            nbytes += codes.nbytes + scales.nbytes
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [rows, n]))
    graph = helper.make_graph(nodes, "matmuls", list(ks.values()), outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {f"x{k}": rng.random((rows, k), dtype=np.float32) for k in ks}
    return sess, feeds, nbytes


def median_pass(sess, feeds, runs: int = 5, reps: int = 20, warmup: int = 5) -> float:
    """Seconds one pass takes: median over ``runs`` of the mean of ``reps`` passes, after ``warmup`` passes."""
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(reps):
            sess.run(None, feeds)
        times.append((time.perf_counter() - t) / reps)
    return statistics.median(times)


def time_step(bits: int, block: int, stacked: bool, threads: int, rows: int = 1) -> float:
    sess, feeds, _ = product_graph([(k, n, bits, block) for k, n in step_shapes(stacked)], threads, rows)
    return median_pass(sess, feeds)


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
