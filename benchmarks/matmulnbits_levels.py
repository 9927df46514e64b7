"""ONNX Runtime's MatMulNBits on CPU: the fast kernel (accuracy level 4: activations re-quantized to int8 per
block) against the exact one (accuracy level 1: float activations), per weight width and batch rows.

    .venv/bin/python benchmarks/matmulnbits_levels.py [--k 2048 --n 8192 --block 32 --threads 1 --runs 5]

One node per (bits, accuracy level) on random codes and scales; prints a markdown table of medians (ms per
product) and each level's error against a float64 product, relative to the output's range. Why the exporters
build no exact weight-only path: docs/QUANTIZATION.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def session(codes: np.ndarray, scales: np.ndarray, k: int, n: int, bits: int, block: int, level: int,
            threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scales.reshape(-1), "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def pack(q: np.ndarray, bits: int, k: int, n: int, block: int) -> np.ndarray:
    """Unsigned codes [n, k] (zero point 2^(bits-1)) -> MatMulNBits' B [n, k/block, block*bits/8] uint8."""
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    return np.ascontiguousarray(q.astype(np.uint8).reshape(n, k // block, block * bits // 8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--rows", default="1,16", help="batch rows (M) to time")
    ap.add_argument("--levels", default="4,1", help="accuracy levels (4 fast, 1 exact, 2 fp16, 3 bf16)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"K {a.k}, N {a.n}, block {a.block}, {a.threads} thread(s); median of {a.runs} x 5 runs\n")
    print("| bits | rows | accuracy level | ms | error / output range |")
    print("|---|---:|---:|---:|---:|")
    for bits in (4, 8):
        q = rng.integers(0, 2 ** bits, (a.n, a.k))
        scales = ((rng.random((a.n, a.k // a.block)) + 0.5) * 1e-3).astype(np.float32)
        w = (q - 2 ** (bits - 1)) * np.repeat(scales, a.block, axis=1).astype(np.float64)  # [n, k]
        sessions = {lv: session(pack(q, bits, a.k, a.n, a.block), scales, a.k, a.n, bits, a.block, lv, a.threads)
                    for lv in map(int, a.levels.split(","))}
        for m in map(int, a.rows.split(",")):
            x = rng.standard_normal((m, a.k)).astype(np.float32)
            ref = x.astype(np.float64) @ w.T
            for lv, s in sessions.items():
                y = s.run(None, {"x": x})[0]
                times = []
                for _ in range(a.runs):
                    t = time.perf_counter()
                    for _ in range(5):
                        s.run(None, {"x": x})
                    times.append((time.perf_counter() - t) / 5)
                err = np.abs(y - ref).max() / (ref.max() - ref.min())
                print(f"| {bits} | {m} | {lv} | {statistics.median(times) * 1e3:.2f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
