"""Self-validation: run the artifact on ONNX Runtime CPU and compare with the torch model of the same checkpoint.

Checks (all on one prompt): logits without past (P = 0), logits of the prompt's second half fed with the
first half's present KV, and 32 greedy tokens decoded on ORT with its KV cache, which torch must choose too
(teacher-forced: one torch forward over prompt + generated tokens, argmax at every step).
The metric is max |Δlogits| divided by the torch logit range (max - min) on the same positions.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.layerspec import LayerSpec
from runtime.records import POSITIONS, Diff, LogitCheck, Validation

from ..errors import ExportError

PROMPT = ("The quick brown fox jumps over the lazy dog. In Python, a list comprehension builds a new list "
          "from an iterable, and a generator expression yields its items lazily.")
GREEDY_TOKENS = 32
# Two checks, both max |Δlogits| / logit range against the torch model of the same checkpoint:
#  "graph":   ONNX Runtime with basic optimizations only, i.e. the graph's own math (what TensorRT is given);
#             it must match the (fake-quant) torch model closely for every format.
#  "ort_cpu": ONNX Runtime with all optimizations (what runtime.Engine runs). ORT rewrites
#             DequantizeLinear -> MatMul into MatMulNBits, whose fast CPU kernel quantizes activations to int8
#             per block, so weight-only formats get a looser tolerance there.
# Activation quantization (static per-tensor, per-token) turns last-bit float differences between torch and
# ORT kernels into whole-code flips that compound over the layers; the same happens between torch float32
# and float64 on the same fake-quant checkpoint (benchmarks/parity_floor.py), which sets these tolerances.
# The figures behind them are in docs/QUANTIZATION.md. A checkpoint mixing formats takes the loosest of its
# Linears'.
def tolerances(spec: LayerSpec) -> tuple[float, float]:
    """(graph tolerance, ort_cpu tolerance) of one quantized Linear's LayerSpec."""
    if spec.static_act:
        return 0.1, (0.15 if spec.act == "int8" else 0.1)
    if spec.dynamic_act:
        return 0.1, 0.1
    if spec.weight == "fp8":
        return 1e-3, 0.1
    return 1e-3, (0.08 if spec.weight == "int4" else 0.05)


FLOAT_TOLERANCE = 1e-3  # a float graph against its torch model: ORT's float32 kernels only
# A quantized KV cache (--kv-cache, export/onnx/kvcache.py) against the torch model's float cache: the largest
# max |Δlogits| / range measured on the tiny test models and SmolLM2, with headroom (docs/RUNTIME.md)
# int8-static: the ort form's static per-channel scales (kvstatic), coarser than per-token ones for tokens far
# below their channel's calibrated peak: 0.026 measured on SmolLM2 int8-wo
KV_TOLERANCES = {"int8": 0.02, "fp8": 0.1, "int8-static": 0.05}


def checkpoint_tolerances(specs: dict) -> tuple[float | None, float]:
    """(graph, ort_cpu) tolerances of a checkpoint: the loosest of its quantized Linears; a float model has
    no separate graph check (None) and FLOAT_TOLERANCE."""
    tols = [tolerances(s) for s in specs.values() if s.quantized]
    if not tols:
        return None, FLOAT_TOLERANCE
    return max(t[0] for t in tols), max(t[1] for t in tols)


@dataclass(frozen=True)
class ValidationConfig:
    prompt: str = PROMPT
    max_prompt_tokens: int = 24
    greedy_tokens: int = GREEDY_TOKENS

    def __post_init__(self):
        if self.max_prompt_tokens < 4:
            raise ExportError("validation needs a prompt of at least 4 tokens")


def step_feeds(ids: np.ndarray, past_len: int = 0) -> dict:
    """input_ids [B,S], an all-ones attention_mask [B,P+S] and position_ids P..P+S-1, as the contract states."""
    B, S = ids.shape
    return {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((B, past_len + S), np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + S, dtype=np.int64), (B, S)).copy()}


_ZERO = {"tensor(int8)": np.int8, "tensor(float8e4m3fn)": np.uint8, "tensor(float)": np.float32}


def past_feeds(sess, past: list | None, batch: int, kv_heads: int) -> dict:
    """The graph's past_key_values.* inputs in its own types: ``past`` (the previous call's present outputs,
    in output order: codes, and per-token scales for a version-3 cache) or zero-length tensors."""
    import onnxruntime as ort

    feeds = {}
    kv_in = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    for j, i in enumerate(kv_in):
        x = past[j] if past is not None else np.zeros((batch, kv_heads, 0, i.shape[3]), _ZERO[i.type])
        # FP8 codes come back as uint8 bytes; they go in tagged with their ONNX type (17: FLOAT8E4M3FN)
        feeds[i.name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(x, 17) if i.type.endswith("e4m3fn)") else x
    return feeds


def ort_session(path, threads: int | None = None, basic: bool = False, profile: str | None = None):
    """``basic``: the graph's own math (basic optimizations only). Otherwise as runtime.Engine runs it (all
    optimizations). ``profile``: a file prefix for ONNX Runtime's profiler (``fused_kernels`` reads it)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if basic
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def graph_ops(onnx_path) -> set[str]:
    """The op types of the graph file (its weights are not read)."""
    import onnx

    return {n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}


def fused_kernels(sess, in_file: set[str]) -> dict[str, int]:
    """{op type: nodes per run} of the kernels a profiled session ran in its first run that the graph file
    (op types ``in_file``) does not contain: ONNX Runtime's fusions (MatMulNBits for DequantizeLinear ->
    MatMul, MatMulIntegerToFloat, ...), where its numbers may part from the graph's own math. Ends the
    session's profiling."""
    import json
    import os

    path = sess.end_profiling()
    try:
        events = json.loads(Path(path).read_text())
    finally:
        os.unlink(path)
    first = next((e for e in events if e.get("name") == "model_run"), None)
    counts: dict[str, int] = {}
    for e in events:
        op = e.get("args", {}).get("op_name") if e.get("cat") == "Node" else None
        if op and op not in in_file and e["name"].endswith("_kernel_time") and (
                first is None or first["ts"] <= e["ts"] <= first["ts"] + first["dur"]):
            counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def run_ort(sess, ids, past, arch):
    feeds = step_feeds(ids, 0 if past is None else past[0].shape[2])
    feeds.update(past_feeds(sess, past, ids.shape[0], arch.kv_heads))
    if any(i.name == POSITIONS for i in sess.get_inputs()):
        feeds[POSITIONS] = np.arange(ids.shape[1], dtype=np.int64)  # logits for every position
    outs = sess.run(None, feeds)
    return outs[0], outs[1:]


def _rel(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    d = float(np.max(np.abs(a.astype(np.float64) - ref)))
    rng = float(ref.max() - ref.min()) or 1.0
    return d, d / rng


def validate(model, tokenizer, onnx_path, arch, specs: dict,
             cfg: ValidationConfig = ValidationConfig(), kv: str = "float") -> Validation:
    """Compare ORT and torch; returns the kiln.json ``validation`` record, raises ExportError when out of
    tolerance. ``specs``: the checkpoint's LayerSpecs (tolerances and checks follow from them); ``kv``: the
    graph's KV cache format (a quantized one loosens the tolerances like a quantized Linear does)."""
    import torch

    graph_tol, tol = checkpoint_tolerances(specs)
    if kv != "float":
        graph_tol, tol = max(graph_tol or 0.0, KV_TOLERANCES[kv]), max(tol, KV_TOLERANCES[kv])
    is_float = graph_tol is None
    ids = tokenizer(cfg.prompt, add_special_tokens=False)["input_ids"][: cfg.max_prompt_tokens]
    ids = np.asarray([ids], dtype=np.int64) % arch.vocab
    S = ids.shape[1]
    k = S // 2
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.float().numpy()  # [1,S,V]

    def compare(sess, optimization: str, tolerance: float) -> LogitCheck:
        full, _ = run_ort(sess, ids, None, arch)
        abs0, rel0 = _rel(full, ref)
        _, past = run_ort(sess, ids[:, :k], None, arch)
        tail, _ = run_ort(sess, ids[:, k:], past, arch)
        abs1, rel1 = _rel(tail, ref[:, k:])
        return LogitCheck(optimization=optimization, value=max(rel0, rel1), tolerance=tolerance,
                          no_past=Diff(abs0, rel0), with_past=Diff(abs1, rel1, past_tokens=int(k)),
                          top1_agreement=float(np.mean(full.argmax(-1) == ref.argmax(-1))),
                          kernels=fused_kernels(sess, ops))

    ops = graph_ops(onnx_path)
    with tempfile.TemporaryDirectory(prefix="kiln-validate-") as prof:
        graph = None if is_float else compare(ort_session(onnx_path, basic=True, profile=f"{prof}/basic"),
                                              "ORT_ENABLE_BASIC", graph_tol)
        sess = ort_session(onnx_path, profile=f"{prof}/all")
        cpu = compare(sess, "ORT_ENABLE_ALL", tol)

    # greedy decoding on ORT with its KV cache; torch then reads prompt + generated tokens in one forward and
    # must pick the same token at every step (identical to running torch greedy, at the cost of one forward)
    ort_tokens = []
    logits, past = run_ort(sess, ids, None, arch)
    for step in range(cfg.greedy_tokens):
        nxt = int(logits[0, -1].argmax())
        ort_tokens.append(nxt)
        if step + 1 < cfg.greedy_tokens:
            logits, past = run_ort(sess, np.asarray([[nxt]], np.int64), past, arch)
    seq = np.concatenate([ids, np.asarray([ort_tokens], np.int64)], 1)
    with torch.no_grad():
        t_logits = model(input_ids=torch.from_numpy(seq[:, :-1])).logits[0, S - 1:].float().numpy()
    t_tokens = t_logits.argmax(-1).tolist()
    same = next((i for i, (a, b) in enumerate(zip(ort_tokens, t_tokens)) if a != b), len(t_tokens))
    result = Validation(
        passed=True,
        reference="torch model of the same checkpoint" + ("" if is_float or not specs else " (fake-quant)")
                  + ("" if kv == "float" else f", float KV cache (the graph's: {kv})"),
        runtime="onnxruntime CPUExecutionProvider",
        metric="max |logits_ort - logits_torch| / (max - min of logits_torch)",
        prompt_tokens=int(S), value=cpu.value, tolerance=tol, ort_cpu=cpu, graph=graph,
        greedy_tokens=cfg.greedy_tokens, greedy_identical_prefix=int(same), greedy_required=is_float)
    problems = []
    if graph is not None and not graph.value <= graph_tol:
        problems.append(f"the graph's own math differs from the torch model by {graph.value:.3g} of the logit "
                        f"range (tolerance {graph_tol:g})")
    if not cpu.value <= tol:
        problems.append(f"logits differ by {cpu.value:.3g} of the logit range (tolerance {tol:g})")
    if is_float and same != cfg.greedy_tokens:
        problems.append(f"greedy tokens diverge at step {same} of {cfg.greedy_tokens}")
    if problems:
        raise ExportError(f"self-validation failed on ONNX Runtime CPU: {'; '.join(problems)}; "
                          "no artifact was written")
    return result
