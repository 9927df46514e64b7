"""Decode at size: how close an artifact's decode gets to this box's memory-bandwidth ceiling, and to llama.cpp.

    .venv/bin/python -m benchmarks.scale decode --art A8 --art A4 [--source MODEL_DIR] [--work /tmp/scale]
        [--gguf-peer auto|none|PATH] [--peers-venv /work/peers-venv] [--threads 2] [--runs 3]

- read bandwidth: numpy reductions over a --bandwidth-gib array split between --threads threads (numpy
  releases the GIL inside them), best kernel's median of 5 passes;
- bytes one decode step streams: every initializer of model.onnx (sizes from the graph, weights in
  model.onnx.data), except that a tensor only looked up by position (Gather's data: the embedding and its
  scales; RotaryEmbedding's cos/sin caches) counts one row;
- decode tok/s: benchmarks/runtime_speed.py's own worker (batch 1, 32-token prompt, 128 new tokens, greedy,
  median of --runs), with the code of --code (default: this checkout);
- ceiling = bandwidth / bytes per step, and tok/s / ceiling;
- llama.cpp: a GGUF of the same HF checkpoint (the artifact's kiln.json source) converted with llama.cpp's own
  convert_hf_to_gguf.py from the llama-cpp-python source distribution (pip download --no-binary into
  WORK/llama-src) to bf16, then quantized with `llama_cpp.llama_model_quantize` to Q8_0 (int8 artifacts) or
  Q4_0 (int4), measured with runtime_speed.py's llama.cpp worker in --peers-venv, same run.
"""
from __future__ import annotations

import glob
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUANT_SNIPPET = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, sys.argv[3])
p.nthread = int(sys.argv[4])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
sys.exit(rc)
"""
SENTENCEPIECE_STUB = """class SentencePieceProcessor:  # stub written by benchmarks/scale_decode.py
    def __init__(self, *a, **k):
        raise ImportError("sentencepiece is not installed (stub for convert_hf_to_gguf.py's import only)")
"""
PEER_TYPE = {"int8-wo": ("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"), "int4": ("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0")}


# ---- bandwidth ------------------------------------------------------------------------------------------------
def _ort_session(node, threads: int, inputs: list, inits: list):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph([node], "bw", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def read_bandwidth(threads: int = 2, gib: float = 1.5, passes: int = 5) -> dict:
    """GB/s read from one --gib array by ``threads`` threads, per kernel (median of ``passes`` after a warm-up);
    the best kernel is the box's read bandwidth. numpy reductions run one thread per slice (they release the
    GIL); ONNX Runtime ReduceMax over [rows, cols] and a batch-1 MatMul (a decode step's GEMV, weights as an
    input so nothing is folded) run on its own intra-op pool."""
    from onnx import TensorProto, helper

    a = np.ones(int(gib * (1 << 30)) // 8, dtype=np.float64)
    parts = np.array_split(a, threads)

    def numpy_kernel(fn):
        def run():
            ts = [threading.Thread(target=fn, args=(p,)) for p in parts]
            for x in ts:
                x.start()
            for x in ts:
                x.join()
        return run

    f32 = a.view(np.float32)
    cols = 4096
    mat = f32[: f32.size // cols * cols].reshape(-1, cols)
    red = _ort_session(helper.make_node("ReduceMax", ["x", "axes"], ["y"], keepdims=0), threads,
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(mat.shape))],
                       [helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    w = mat.reshape(cols, -1)  # [K, N] row-major, as MatMul's weight input
    gemv = _ort_session(helper.make_node("MatMul", ["v", "w"], ["y"]), threads,
                        [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, cols]),
                         helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape))], [])
    v = np.ones((1, cols), np.float32)
    kernels = {"numpy_sum_f64": numpy_kernel(lambda p: p.sum()), "numpy_max_f64": numpy_kernel(lambda p: p.max()),
               "ort_reducemax_f32": lambda: red.run(None, {"x": mat}),
               "ort_gemv_f32": lambda: gemv.run(None, {"v": v, "w": w})}
    out = {}
    for name, fn in kernels.items():
        runs = []
        for _ in range(passes + 1):
            t = time.perf_counter()
            fn()
            runs.append(a.nbytes / (time.perf_counter() - t) / 1e9)
        out[name] = statistics.median(runs[1:])  # the first pass warms pages and thread pools
    best = max(out, key=out.get)
    return {"gbs": out[best], "kernel": best, "all_gbs": out, "threads": threads, "array_gib": gib}


# ---- bytes per decode step ------------------------------------------------------------------------------------
def onnx_step_bytes(art: Path) -> dict:
    import onnx

    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            consumers.setdefault(x, []).append((n, i))
    regions: dict = {}  # one stored region may back several initializers (tied embedding / lm_head): count it once
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            nbytes, key = int(ext["length"]), (ext.get("location"), ext.get("offset"), ext["length"])
        else:
            nbytes = len(t.raw_data) or (int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                                         if t.dims else 0)
            key = ("inline", t.name)
        uses = consumers.get(t.name, [])
        looked_up = all((n.op_type == "Gather" and i == 0) or (n.op_type == "RotaryEmbedding" and i in
                        ((2, 3) if n.domain == "com.microsoft" else (1, 2))) for n, i in uses)  # cos/sin caches
        per_step = nbytes
        if uses and looked_up and t.dims:  # embedding rows, rope cos/sin caches: one row per token
            axis = next((a.i for a in uses[0][0].attribute if a.name == "axis"), 0) \
                if uses[0][0].op_type == "Gather" else 0
            per_step = nbytes // t.dims[axis if axis >= 0 else len(t.dims) + axis]
        prev = regions.get(key, (nbytes, 0))
        regions[key] = (nbytes, max(prev[1], per_step))
    total = sum(p for _, p in regions.values())
    stored = sum(n for n, _ in regions.values())
    return {"bytes": total, "stored_bytes": stored, "looked_up_bytes": stored - sum(
        n for n, p in regions.values() if p == n)}


def gguf_step_bytes(path: Path) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    total = 0
    names = {t.name for t in r.tensors}
    for t in r.tensors:
        n = int(t.n_bytes)
        if t.name == "token_embd.weight":  # looked up one row per token (read in full too when tied: no output.weight)
            rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
            total += n // rows + (n if "output.weight" not in names else 0)
        else:
            total += n
    return {"bytes": total}


# ---- the weight kernels alone ---------------------------------------------------------------------------------
def weight_products(art: Path) -> list[tuple[int, int, int, int]]:
    """(K, N, bits, block) of every DequantizeLinear -> MatMul weight of the artifact, as ONNX Runtime fuses it
    into MatMulNBits (a per-channel int8 weight gets blocks of 32 inputs, the scale repeated)."""
    import onnx

    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    feeds_matmul = {n.input[1] for n in m.graph.node if n.op_type == "MatMul" and len(n.input) > 1}
    out = []
    for n in m.graph.node:
        w = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if w is None or n.output[0] not in feeds_matmul or len(w.dims) != 2:
            continue
        bits = {onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT4: 4,
                onnx.TensorProto.UINT4: 4}.get(w.data_type)
        if bits is None:
            continue
        block = next((a.i for a in n.attribute if a.name == "block_size"), 0) or 32
        out.append((int(w.dims[0]), int(w.dims[1]), bits, block))
    return out


def kernel_floor(art: Path, threads: int, runs: int = 5) -> dict:
    """Milliseconds one batch-1 pass over nothing but the artifact's weight products takes in ONNX Runtime's
    MatMulNBits (accuracy level 4, the fast kernel the runtime's graphs fuse to; random codes of the same shapes,
    bits and blocks, one session, ``threads`` intra-op threads; benchmarks/matmul_floor.py builds it): the
    decode step's floor from its weight kernels, whatever the rest of the graph does. Median of ``runs`` x 5
    passes."""
    from .matmul_floor import median_pass, product_graph

    prods = weight_products(art)
    if not prods:
        return {"error": "no quantized weight products in the graph"}
    sess, feeds, nbytes = product_graph(prods, threads)
    ms = median_pass(sess, feeds, runs=runs, reps=5, warmup=1) * 1e3
    return {"floor_ms": ms, "products": len(prods), "weight_bytes": nbytes, "kernel_gbs": nbytes / ms / 1e6}


# ---- tok/s ----------------------------------------------------------------------------------------------------
def _worker(python: str, script: Path, worker: str, target: str, a) -> dict:
    cmd = [python, str(script), "--worker", worker, "--target", target, "--threads", str(a.threads), "--runs",
           str(a.runs), "--new-tokens", "128", "--prompt-len", "32", "--prefill-len", "512"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=script.parents[1], check=False)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode or not lines:
        return {"error": ((r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1])[:300]}
    return json.loads(lines[-1])


# ---- GGUF peer ------------------------------------------------------------------------------------------------
def _sh(cmd, env=None, timeout=7200) -> tuple[bool, str]:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    tail = ((r.stderr or "") + (r.stdout or "")).strip().splitlines()
    return r.returncode == 0, (tail[-1][:300] if tail else f"exit {r.returncode}")


def converter(work: Path, peers_venv: Path) -> Path | str:
    pattern = str(work / "llama-src" / "*" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py")
    found = sorted(glob.glob(pattern))
    if not found:
        ver = subprocess.run([str(peers_venv / "bin" / "python"), "-c",
                              "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True,
                             check=False)
        spec = f"llama-cpp-python=={ver.stdout.strip()}" if ver.returncode == 0 else "llama-cpp-python"
        _, msg = _sh([str(peers_venv / "bin" / "pip"), "download", "--no-deps", "--no-binary", ":all:", spec,
                       "-d", str(work / "llama-src")])
        tars = sorted(glob.glob(str(work / "llama-src" / "*.tar.gz")))
        if not tars:
            return f"unavailable: cannot fetch llama.cpp's converter ({msg})"
        subprocess.run(["tar", "-xzf", tars[-1], "-C", str(work / "llama-src")], check=True)
        found = sorted(glob.glob(pattern))
        if not found:
            return f"unavailable: no convert_hf_to_gguf.py in {tars[-1]}"
    return Path(found[-1])


def gguf_peer(source: Path, scheme: str, work: Path, peers_venv: Path, threads: int) -> str:
    """Path of the Q8_0 / Q4_0 GGUF of ``source`` (made once), or 'unavailable: why'."""
    if scheme not in PEER_TYPE:
        return f"unavailable: no llama.cpp peer type for scheme {scheme}"
    qname, ftype = PEER_TYPE[scheme]
    gdir = work / "gguf"
    gdir.mkdir(parents=True, exist_ok=True)
    stem = source.name
    out = gdir / f"{stem}-{qname}.gguf"
    if out.exists():
        return str(out)
    if not (peers_venv / "bin" / "python").exists():
        return f"unavailable: no {peers_venv}/bin/python (create it and pip install llama-cpp-python)"
    bf16 = gdir / f"{stem}-bf16.gguf"
    if not bf16.exists():
        conv = converter(work, peers_venv)
        if isinstance(conv, str):
            return conv
        paths = [str(conv.parent / "gguf-py")]
        if subprocess.run([sys.executable, "-c", "import sentencepiece"], capture_output=True, check=False).returncode:
            # convert_hf_to_gguf.py imports sentencepiece before it looks for tokenizer.model; these models have
            # none (a BPE tokenizer.json), so the name only has to import: a stub raising if ever used
            stub = work / "llama-src" / "stub"
            stub.mkdir(parents=True, exist_ok=True)
            (stub / "sentencepiece.py").write_text(SENTENCEPIECE_STUB)
            paths.append(str(stub))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        print(f"[decode] converting {source} -> {bf16} with {conv}", file=sys.stderr, flush=True)
        ok, msg = _sh([sys.executable, str(conv), str(source), "--outtype", "bf16", "--outfile", str(bf16) + ".tmp"],
                      env=env)
        if not ok:
            return f"unavailable: convert_hf_to_gguf.py failed: {msg}"
        os.replace(str(bf16) + ".tmp", bf16)
    print(f"[decode] quantizing {bf16.name} -> {out.name}", file=sys.stderr, flush=True)
    ok, msg = _sh([str(peers_venv / "bin" / "python"), "-c", QUANT_SNIPPET, str(bf16), str(out) + ".tmp", ftype,
                   str(threads)])
    if not ok:
        return f"unavailable: llama_model_quantize failed: {msg}"
    os.replace(str(out) + ".tmp", out)
    return str(out)


# ---- command --------------------------------------------------------------------------------------------------
def _scheme(art: Path) -> str:
    k = json.loads((art / "kiln.json").read_text())
    schemes = [p["config"].get("scheme") for p in k.get("passes", []) if p.get("kind") == "quantize"]
    return schemes[-1] if schemes else "fp32"


def cmd_decode(a) -> int:
    from .scale import load_results, publish, save_results, table

    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    peers_venv = Path(a.peers_venv)
    code = Path(a.code).resolve()
    load = os.getloadavg()[0]
    print(f"[decode] load average {load:.2f}; measuring read bandwidth ({a.threads} threads)", file=sys.stderr,
          flush=True)
    if load > 1.0:  # a 2-thread decode loop stalls on every descheduled thread: its tok/s then means nothing
        print(f"[decode] warning: load average {load:.2f} on {os.cpu_count()} cores; decode speed needs a quiet "
              "machine (a 1B int8-wo artifact ran at 1.7 tok/s at load 8, ~40 when quiet)", file=sys.stderr, flush=True)
    bw = read_bandwidth(a.threads, a.bandwidth_gib)
    recs = []
    for art in (Path(p).resolve() for p in a.art):
        scheme = _scheme(art)
        sb = onnx_step_bytes(art)
        print(f"[decode] {art.name}: {scheme}, {sb['bytes'] / 1e6:.0f} MB per step; measuring tok/s",
              file=sys.stderr, flush=True)
        ours = _worker(sys.executable, code / "benchmarks" / "runtime_speed.py", "ours", str(art), a)
        floor = kernel_floor(art, a.threads, a.runs)
        rec = {"art": str(art), "scheme": scheme, "step_bytes": sb["bytes"], "bandwidth_gbs": bw["gbs"],
               "ceiling_tok_s": bw["gbs"] * 1e9 / sb["bytes"], "date": time.strftime("%Y-%m-%d %H:%M"),
               "code": str(code), "load_average": os.getloadavg()[0]}
        if "floor_ms" in floor:  # the weight kernels alone: their GB/s and the tok/s they would allow
            rec |= {"kernel_gbs": floor["kernel_gbs"], "kernel_tok_s": 1e3 / floor["floor_ms"],
                    "kernel_of_bandwidth": floor["kernel_gbs"] / bw["gbs"]}
        if "error" in ours:
            rec["error"] = ours["error"]
        else:
            rec["tok_s"] = ours["decode_tokens_per_s"]
            rec["tok_s_all"] = ours.get("decode_all")
            rec["of_ceiling"] = rec["tok_s"] / rec["ceiling_tok_s"]
            if "kernel_tok_s" in rec:
                rec["of_kernel"] = rec["tok_s"] / rec["kernel_tok_s"]
        peer = a.gguf_peer
        if peer == "auto":
            src = Path(a.source) if a.source else Path(json.loads((art / "kiln.json").read_text())["source"]["path"])
            peer = gguf_peer(src, scheme, work, peers_venv, a.threads)
        if peer and peer != "none":
            if peer.startswith("unavailable"):
                rec["peer_error"] = peer
            else:
                pr = _worker(str(peers_venv / "bin" / "python"), code / "benchmarks" / "runtime_speed.py",
                             "llamacpp", peer, a)
                rec["peer"] = peer
                rec["peer_step_bytes"] = gguf_step_bytes(Path(peer))["bytes"]
                if "error" in pr:
                    rec["peer_error"] = pr["error"]
                else:
                    rec["peer_tok_s"] = pr["decode_tokens_per_s"]
                    rec["peer_tok_s_all"] = pr.get("decode_all")
                    rec["peer_of_ceiling"] = rec["peer_tok_s"] * rec["peer_step_bytes"] / (bw["gbs"] * 1e9)
                    if "tok_s" in rec:
                        rec["vs_peer"] = rec["tok_s"] / rec["peer_tok_s"]
        recs.append(rec)
        print(json.dumps(rec), flush=True)
    res = load_results(work)
    res["runs"].append({"command": "python -m benchmarks.scale " + " ".join(sys.argv[1:]),
                        "date": time.strftime("%Y-%m-%d %H:%M"),
                        "machine": f"read bandwidth {bw['gbs']:.1f} GB/s ({bw['kernel']}, {bw['threads']} threads, "
                                   f"{bw['array_gib']} GiB array), load {os.getloadavg()[0]:.2f} at the end"})
    for r in recs:
        res["decode"] = [d for d in res["decode"] if d["art"] != r["art"]] + [r]
    save_results(work, res)
    print(publish(work, table(res), not a.no_docs), flush=True)
    return 0


def decode_table(rows: list[dict]) -> str:
    def f(x, nd=1) -> str:
        return "" if x is None else f"{x:.{nd}f}"

    out = [("Decode at batch 1 (2 threads; 32-token prompt, 128 new tokens, greedy; medians): ceiling = read "
            "bandwidth / bytes one step streams. Kernels: ONNX Runtime's MatMulNBits over nothing but the step's "
            "weight products (same shapes, bits and blocks; `kernel_floor`): their GB/s, that as a share of the "
            "read bandwidth, and the tok/s they alone allow."), "",
           ("| artifact | scheme | MB / step | bandwidth GB/s | tok/s | ceiling tok/s | of ceiling (≥ 0.90) "
            "| kernels GB/s | kernels of bandwidth | kernels tok/s | of kernels "
            "| llama.cpp tok/s | its MB / step | vs llama.cpp (≥ 1.1) | notes |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        notes = "; ".join(x for x in (r.get("error"), r.get("peer_error")) if x)
        peer = Path(r["peer"]).name if r.get("peer") else ""
        out.append(f"| {Path(r['art']).parent.name}/{Path(r['art']).name} | {r['scheme']} | {r['step_bytes'] / 1e6:.0f} "
                   f"| {f(r['bandwidth_gbs'])} | {f(r.get('tok_s'))} | {f(r['ceiling_tok_s'])} "
                   f"| {f(r.get('of_ceiling'), 2)} | {f(r.get('kernel_gbs'))} | {f(r.get('kernel_of_bandwidth'), 2)} "
                   f"| {f(r.get('kernel_tok_s'))} | {f(r.get('of_kernel'), 2)} | {f(r.get('peer_tok_s'))} {peer} "
                   f"| {f((r.get('peer_step_bytes') or 0) / 1e6, 0) if r.get('peer_step_bytes') else ''} "
                   f"| {f(r.get('vs_peer'), 2)} | {notes.replace('|', '/')} |")
    return "\n".join(out)


def add_decode_parser(sp) -> None:
    d = sp.add_parser("decode", help="bandwidth ceiling, decode tok/s and the llama.cpp peer for artifacts")
    d.add_argument("--art", action="append", required=True, help="ONNX artifact dir (repeatable)")
    d.add_argument("--source", help="HF dir the GGUF peer is converted from (default: the kiln.json source)")
    d.add_argument("--gguf-peer", default="auto", help="auto (convert + quantize), none, or a GGUF path")
    d.add_argument("--peers-venv", default=os.environ.get("KILN_PEERS_VENV", "/work/peers-venv"))
    d.add_argument("--work", default="/tmp/scale")
    d.add_argument("--code", default=str(ROOT), help="checkout whose runtime measures the artifacts")
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--runs", type=int, default=3)
    d.add_argument("--bandwidth-gib", type=float, default=1.5)
    d.add_argument("--no-docs", action="store_true", help="write WORK/table.md only, not docs/BENCHMARKS.md")
    d.set_defaults(func=cmd_decode)
