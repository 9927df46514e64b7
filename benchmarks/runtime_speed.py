"""Runtime speed of llmkiln vs its peers on SmolLM2-135M, in one command, on a quiet machine:

    KILN_CACHE=/tmp/kc .venv/bin/python benchmarks/runtime_speed.py [--threads 2] [--runs 3] [--work DIR]

Builds what is missing under --work (ONNX artifacts fp32 / int8-wo / int4 with `kiln`, a Q8_0 GGUF of the same
fp32 weights with llama.cpp's converter), then measures one system at a time, each in its own subprocess:
llmkiln (`runtime.bench`), PyTorch eager (transformers `generate`), optimum `ORTModelForCausalLM`, llama.cpp
(llama-cpp-python) on Q8_0 and Q4_1 GGUFs, and the server with 1 vs 8 concurrent streaming clients.
Peers run with the Python of --peers-venv (default /work/peers-venv); a peer that is not installed is reported
as missing, never estimated. Batch 1, greedy, EOS ignored; decode tokens/s = (N-1)/(T_N - T_1) from token
arrival times; TTFT for a --prefill-len prompt; medians of --runs after one warm-up. Writes --out (JSON) and
prints a markdown table with the gate ratios and the memory-bandwidth ceiling.

Only the standard library is imported at the top: workers run this same file under other interpreters.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BANDWIDTH_GBS = 47.0  # read bandwidth of the 2-core reference box (docs/BENCHMARKS.md)


# ---- workers (run in a subprocess; print one JSON line) ------------------------------------------------------
def _prompt_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:20000]


def _summary(runs: list[dict]) -> dict:
    med = statistics.median
    return {"decode_tokens_per_s": med(r["decode"] for r in runs), "ttft_ms": med(r["ttft"] for r in runs),
            "prefill_ms": med(r["prefill"] for r in runs), "runs": len(runs),
            "decode_all": [r["decode"] for r in runs]}


def _measure(gen_times, prompt, long_prompt, n, runs) -> dict:
    """gen_times(ids, n) -> (t0, [arrival time of each token]); one warm-up, then ``runs``."""
    out = []
    for i in range(runs + 1):
        t0, ts = gen_times(prompt, n)
        t0p, tsp = gen_times(long_prompt, 1)
        if len(ts) != n:
            raise RuntimeError(f"expected {n} tokens, got {len(ts)}")
        if i:
            out.append({"decode": (n - 1) / (ts[-1] - ts[0]), "ttft": 1e3 * (ts[0] - t0),
                        "prefill": 1e3 * (tsp[0] - t0p)})
    return _summary(out)


def worker_ours(a) -> dict:
    sys.path.insert(0, str(ROOT))
    from runtime import Engine
    from runtime.bench import BenchConfig, benchmark

    eng = Engine.load(a.target, threads=a.threads)
    r = benchmark(eng, BenchConfig(prompt_len=a.prompt_len, new_tokens=a.new_tokens, runs=a.runs,
                                   prefill_len=a.prefill_len))
    return {"decode_tokens_per_s": r["decode_tokens_per_s"], "ttft_ms": r["ttft_ms"], "prefill_ms": r["prefill_ms"],
            "runs": a.runs, "decode_all": r["decode_tokens_per_s_all"], "peak_rss_mb": r["peak_rss_mb"]}


def _hf_tokenizer(path):
    """AutoTokenizer, or the plain fast tokenizer when this transformers does not know the saved class."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:
        return PreTrainedTokenizerFast(tokenizer_file=str(Path(path) / "tokenizer.json"))


def _hf_times(model, tok, threads):
    import torch
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)

    class Clock(BaseStreamer):
        def __init__(self):
            self.times, self.first = [], True

        def put(self, value):
            if self.first:  # the prompt
                self.first = False
                return
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def gen(ids, n):
        clock = Clock()
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, streamer=clock, pad_token_id=model.config.eos_token_id)
        return t0, clock.times

    return gen


def _hf_prompts(tok, a):
    ids = tok(_prompt_text(), add_special_tokens=False)["input_ids"]
    return ids[:a.prompt_len], ids[:a.prefill_len]


def worker_torch(a) -> dict:
    from transformers import AutoModelForCausalLM

    tok = _hf_tokenizer(a.target)
    model = AutoModelForCausalLM.from_pretrained(a.target, dtype="float32").eval()
    p, lp = _hf_prompts(tok, a)
    return _measure(_hf_times(model, tok, a.threads), p, lp, a.new_tokens, a.runs)


def worker_optimum(a) -> dict:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    tok = _hf_tokenizer(a.target)
    model = ORTModelForCausalLM.from_pretrained(a.target, export=True, use_cache=True, session_options=so,
                                                provider="CPUExecutionProvider")
    p, lp = _hf_prompts(tok, a)
    return _measure(_hf_times(model, tok, a.threads), p, lp, a.new_tokens, a.runs)


def worker_llamacpp(a) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=a.target, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=2048,
                n_batch=max(512, a.prefill_len), verbose=False)
    ids = llm.tokenize(_prompt_text().encode(), add_bos=False, special=False)

    def gen(prompt, n):
        times = []
        llm.reset()  # no prefix reuse between runs: every run prefills its whole prompt
        t0 = time.perf_counter()
        for _tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == n:
                break
        return t0, times

    return _measure(gen, ids[:a.prompt_len], ids[:a.prefill_len], a.new_tokens, a.runs)


def worker_server(a) -> dict:
    """Aggregate streamed tokens/s of 1 client and of 8 concurrent clients against `kiln serve`."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    import openai

    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", a.target, "--port", "0", "--threads",
                             str(a.threads), "--max-batch", "8"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError("kiln serve did not start")
        url = re.search(r"(http://\S+/v1)", line).group(1)
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
        text = _prompt_text()

        def one(i):
            s = client.completions.create(model="m", prompt=text[i * 200:i * 200 + 150], max_tokens=a.new_tokens,
                                          temperature=0, stream=True, stream_options={"include_usage": True},
                                          extra_body={"ignore_eos": True})
            n = 0
            for ch in s:
                if getattr(ch, "usage", None):
                    n = ch.usage.completion_tokens
            return n

        def agg(k):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(k) as ex:
                n = sum(ex.map(one, range(k)))
            return n / (time.perf_counter() - t0)

        agg(1)  # warm-up
        single = statistics.median(agg(1) for _ in range(a.runs))
        eight = statistics.median(agg(8) for _ in range(a.runs))
        return {"single_client_tokens_per_s": single, "eight_clients_tokens_per_s": eight,
                "ratio": eight / single}
    finally:
        proc.terminate()
        proc.wait(30)


WORKERS = {"ours": worker_ours, "torch": worker_torch, "optimum": worker_optimum, "llamacpp": worker_llamacpp,
           "server": worker_server}


# ---- driver --------------------------------------------------------------------------------------------------
def _run(cmd, env=None, timeout=3600) -> tuple[bool, str]:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    tail = (r.stderr or r.stdout).strip().splitlines()
    return r.returncode == 0, (tail[-1] if tail else f"exit {r.returncode}")


def _kiln(*args) -> list[str]:
    return [sys.executable, "-m", "kiln.cli", *args]


def prepare(a) -> dict:
    """Artifacts and GGUFs under a.work; each entry is a path or an 'unavailable: why' string."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    suffix = "" if a.form == "portable" else f"-{a.form}"
    fp32 = work / f"onnx-fp32{suffix}"
    if not fp32.exists():
        ok, msg = _run(_kiln("export", "onnx", a.model, "-o", str(fp32), "--form", a.form))
        if not ok:
            fp32 = f"unavailable: {msg}"
    out["fp32"] = str(fp32)
    for scheme in ("int8-wo", "int4"):
        art = work / f"onnx-{scheme}{suffix}"
        if scheme not in a.schemes:
            out[scheme] = "unavailable: not requested (--schemes)"
            continue
        if not art.exists():
            ck = work / f"ckpt-{scheme}"
            ok, msg = (True, "")
            if not ck.exists():
                ok, msg = _run(_kiln("compress", "quantize", a.model, "--scheme", scheme, "-o", str(ck),
                                     "--eval-windows", "0"))
            if ok:
                ok, msg = _run(_kiln("export", "onnx", str(ck), "-o", str(art), "--form", a.form))
            if not ok:
                art = f"unavailable: {msg}"
        out[scheme] = str(art)
    out["hf"] = hf_dir(a, work)
    cache = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "llmkiln"))
    q41 = sorted(glob.glob(str(cache / "smollm2-135m" / "*Q4_1.gguf")))
    out["q4_1"] = q41[0] if q41 else "unavailable: no Q4_1 GGUF in the cache (fetch smollm2-135m once)"
    out["q8_0"] = q8_0(a, work, out["hf"])
    return out


def hf_dir(a, work: Path) -> str:
    """An HF dir of the fp32 weights every system reads (the alias's converted checkpoint)."""
    d = work / "hf-fp32"
    if not (d / "config.json").exists():
        code = ("import sys; from compress.loading import load_model; m, t, _ = load_model(sys.argv[1]); "
                "m.config.architectures = ['LlamaForCausalLM']; m.save_pretrained(sys.argv[2]); t.save_pretrained(sys.argv[2])")
        ok, msg = _run([sys.executable, "-c", code, a.model, str(d)])
        if not ok:
            return f"unavailable: {msg}"
        # older transformers (optimum's) and llama.cpp's converter read rope_theta at the top level
        cfg = json.loads((d / "config.json").read_text())
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
        if theta is not None and "rope_theta" not in cfg:
            cfg["rope_theta"] = theta
            (d / "config.json").write_text(json.dumps(cfg, indent=1))
    return str(d)


def q8_0(a, work: Path, hf: str) -> str:
    """Q8_0 GGUF of the same fp32 weights, with llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python
    source distribution, fetched with pip into --work when not found)."""
    out = work / "smollm2-135m-q8_0.gguf"
    if out.exists():
        return str(out)
    if hf.startswith("unavailable"):
        return hf
    found = sorted(glob.glob(str(work / "llama-src" / "*" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py")))
    if not found:
        pip = Path(a.peers_venv) / "bin" / "pip"
        ok, msg = _run([str(pip), "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python",
                        "-d", str(work / "llama-src")])
        tars = sorted(glob.glob(str(work / "llama-src" / "*.tar.gz")))
        if not tars:
            return f"unavailable: cannot fetch llama.cpp's converter ({msg})"
        subprocess.run(["tar", "-xzf", tars[-1], "-C", str(work / "llama-src")], check=True)
        found = sorted(glob.glob(str(work / "llama-src" / "*" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py")))
    conv = Path(found[-1])
    env = dict(os.environ, PYTHONPATH=str(conv.parent / "gguf-py"))
    ok, msg = _run([sys.executable, str(conv), hf, "--outtype", "q8_0", "--outfile", str(out)], env=env)
    return str(out) if ok else f"unavailable: {msg}"


def measure(a, worker: str, target: str, python: str) -> dict:
    if target.startswith("unavailable"):
        return {"error": target}
    if not Path(python).exists():
        return {"error": f"not installed: {python} missing (create {a.peers_venv} and install the peer)"}
    cmd = [python, str(Path(__file__).resolve()), "--worker", worker, "--target", target, "--threads",
           str(a.threads), "--runs", str(a.runs), "--new-tokens", str(a.new_tokens), "--prompt-len",
           str(a.prompt_len), "--prefill-len", str(a.prefill_len)]
    print(f"[bench] {worker} {Path(target).name} ...", file=sys.stderr, flush=True)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    lines = [x for x in r.stdout.strip().splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        err = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        if "No module named" in err:
            err = "not installed: " + err
        return {"error": err}
    return json.loads(lines[-1])


def _best_ttft_ratio(res: dict) -> float | None:
    ours = [r["prefill_ms"] for k, r in res.items() if k.startswith("ours_") and "prefill_ms" in r]
    peer = [r["prefill_ms"] for k, r in res.items() if k.startswith("llamacpp_") and "prefill_ms" in r]
    return min(ours) / min(peer) if ours and peer else None


def table(res: dict, a) -> str:
    rows = [("llmkiln fp32 (ONNX Runtime)", "ours_fp32"), ("llmkiln int8-wo", "ours_int8-wo"),
            ("llmkiln int4", "ours_int4"), ("PyTorch eager fp32", "torch_fp32"),
            ("optimum ORTModelForCausalLM fp32", "optimum_fp32"), ("llama.cpp Q8_0", "llamacpp_q8_0"),
            ("llama.cpp Q4_1", "llamacpp_q4_1")]
    out = [f"SmolLM2-135M, {a.threads} threads, batch 1, prompt {a.prompt_len}, {a.new_tokens} new tokens, greedy; "
           f"TTFT for a {a.prefill_len}-token prompt; medians of {a.runs} runs; llmkiln artifacts --form {a.form}.", "",
           f"| system | decode tok/s | TTFT {a.prefill_len} (ms) | ceiling tok/s |", "|---|---:|---:|---:|"]
    for name, key in rows:
        r = res.get(key, {})
        if "error" in r:
            out.append(f"| {name} | {r['error'][:80]} | | |")
        elif r:
            ceil = r.get("ceiling_tokens_per_s")
            out.append(f"| {name} | {r['decode_tokens_per_s']:.1f} | {r['prefill_ms']:.0f} | "
                       f"{'' if ceil is None else f'{ceil:.0f}'} |")

    def ratio(k1, k2, field="decode_tokens_per_s"):
        x, y = res.get(k1, {}), res.get(k2, {})
        return x[field] / y[field] if field in x and field in y else None

    gates = [("fp32 vs optimum fp32 (>= 2.0)", ratio("ours_fp32", "optimum_fp32")),
             ("int8-wo vs llama.cpp Q8_0 (>= 1.25)", ratio("ours_int8-wo", "llamacpp_q8_0")),
             ("int4 vs llama.cpp Q4_1 (>= 1.25)", ratio("ours_int4", "llamacpp_q4_1")),
             ("TTFT (prefill-len prompt) int8-wo / llama.cpp Q8_0 (<= 0.8)", ratio("ours_int8-wo", "llamacpp_q8_0", "prefill_ms")),
             ("TTFT (prefill-len prompt) int4 / llama.cpp Q4_1 (<= 0.8)", ratio("ours_int4", "llamacpp_q4_1", "prefill_ms")),
             ("TTFT (prefill-len prompt) fastest llmkiln artifact / fastest llama.cpp GGUF (<= 0.8)",
              _best_ttft_ratio(res)),
             ("server 8 clients / 1 client (>= 2.5)", res.get("server", {}).get("ratio"))]
    out += ["", "| gate | ratio |", "|---|---:|"]
    out += [f"| {g} | {'n/a' if v is None else f'{v:.2f}'} |" for g, v in gates]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", default="/tmp/kiln-bench")
    ap.add_argument("--peers-venv", default="/work/peers-venv")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--only", default="", help="Comma-separated subset: ours,torch,optimum,llamacpp,server")
    ap.add_argument("--schemes", default="fp32,int8-wo,int4", help="llmkiln artifacts to build and measure.")
    ap.add_argument("--form", choices=("ort", "portable"), default="ort",
                    help="Graph form of the llmkiln artifacts (kiln export onnx --form).")
    ap.add_argument("--out", default="benchmarks/runtime_speed.json")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(WORKERS[a.worker](a)))
        return
    only = set(filter(None, a.only.split(","))) or set(WORKERS)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"[bench] warning: load average {load:.2f}; speed numbers need a quiet machine", file=sys.stderr)
    paths = prepare(a)
    peers_py = str(Path(a.peers_venv) / "bin" / "python")
    res: dict = {"config": vars(a) | {"load_average_at_start": load}, "inputs": paths}
    for scheme in ("fp32", "int8-wo", "int4"):
        if "ours" in only and scheme in a.schemes:
            r = measure(a, "ours", paths[scheme], sys.executable)
            data = Path(paths[scheme]) / "model.onnx.data"
            if "error" not in r and data.exists():
                r["ceiling_tokens_per_s"] = BANDWIDTH_GBS * 1e9 / data.stat().st_size
            res[f"ours_{scheme}"] = r
    if "torch" in only:
        res["torch_fp32"] = measure(a, "torch", paths["hf"], sys.executable)
    if "optimum" in only:
        res["optimum_fp32"] = measure(a, "optimum", paths["hf"], peers_py)
    if "llamacpp" in only:
        for q in ("q8_0", "q4_1"):
            res[f"llamacpp_{q}"] = measure(a, "llamacpp", paths[q], peers_py)
    if "server" in only:
        res["server"] = measure(a, "server", paths["int8-wo"] if not paths["int8-wo"].startswith("unavail")
                                else paths["fp32"], sys.executable)
    res["load_average_at_end"] = os.getloadavg()[0]
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(table(res, a))


if __name__ == "__main__":
    main()
