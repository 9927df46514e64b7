"""H100 check of the fp8 and int8-sq checkpoints: real tensor-core kernels against our simulated numerics.

    KILN_CACHE=... python -m benchmarks.gpu.fp8_check --fp8 CKPT_FP8 --int8 CKPT_INT8_SQ [--json OUT]
    python -m benchmarks.gpu.fp8_check --make DIR      # first quantize smollm2-135m into DIR/fp8, DIR/int8-sq
    python -m benchmarks.gpu.fp8_check --cpu ...       # plumbing only: emulates the kernels on the CPU

For every QuantLinear (real inputs captured from one 512-token window of builtin:pydoc, first 256 tokens):
  fp8     : torch._scaled_mm(e4m3(x / s_in), W_codes^T, scale_a = s_in per row, scale_b = weight_scale)
  int8-sq : torch._int_mm(clamp(round(x / s_in)), W_codes^T) * s_in * weight_scale   (int32 accumulation)
against the fake-quant torch module (float32); relative error (Frobenius) must be <= 1e-2.
Then GEMM time of each distinct Linear shape vs bf16 at M = 1, 16, 256, 4096 (median of CUDA-event timings;
torch._int_mm needs M > 16, so M = 1 and 16 are padded to 32 and reported as such).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

TOL = 1e-2
MS = (1, 16, 256, 4096)


def capture_inputs(model, tok, tokens: int = 256) -> dict:
    """{module name: input [tokens, in] float32} for every QuantLinear, from one pydoc window."""
    import torch

    from compress.evaluate import corpus_ids
    from compress.quant.modules import QuantLinear

    ids = torch.tensor([corpus_ids(tok)[:tokens]])
    seen, hooks = {}, []
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            hooks.append(m.register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, a[0][0].float().clone())))
    with torch.inference_mode():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


def kernel_fp8(x, m, emulate: bool):
    import torch

    from compress.quant import primitives as P

    xq = P.to_fp8(x / m.input_scale)  # [M, in] e4m3
    if emulate:
        return (xq.float() * m.input_scale) @ (m.codes.float() * m.weight_scale[:, None]).T
    sa = m.input_scale.reshape(1, 1).expand(x.shape[0], 1).contiguous()
    sb = m.weight_scale.reshape(1, -1).contiguous()
    return torch._scaled_mm(xq, m.codes.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16).float()


def kernel_int8(x, m, emulate: bool):
    import torch

    xq = torch.clamp(torch.round(x / m.input_scale), -128, 127).to(torch.int8)
    if emulate:
        acc = xq.to(torch.int64) @ m.codes.to(torch.int64).T
    else:
        pad = max(0, 17 - xq.shape[0])
        xp = torch.nn.functional.pad(xq, (0, 0, 0, pad)) if pad else xq
        acc = torch._int_mm(xp, m.codes.t())[: xq.shape[0]]
    return acc.float() * m.input_scale * m.weight_scale[None, :]


def check(path: str, scheme: str, device: str, emulate: bool) -> list[dict]:
    import torch

    from compress.loading import load_model
    from compress.quant.modules import QuantLinear

    model, tok, _ = load_model(path)
    xs = capture_inputs(model, tok)
    kern = kernel_fp8 if scheme == "fp8" else kernel_int8
    rows = []
    for n, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        if m.act != ("fp8" if scheme == "fp8" else "int8"):
            raise SystemExit(f"{path}: {n} has act {m.act}, expected a {scheme} checkpoint")
        m = m.to(device)
        x = xs[n].to(device)
        with torch.inference_mode():
            sim = m(x)
            real = kern(x, m, emulate)
        rel = float((real - sim).norm() / sim.norm().clamp(min=1e-30))
        rows.append({"layer": n, "scheme": scheme, "shape": list(m.codes.shape), "rel_err": rel, "ok": rel <= TOL})
    return rows


def _time(fn, reps: int = 50) -> float:
    import torch

    for _ in range(5):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1000.0)  # us
    return statistics.median(ts)


def timings(shapes) -> list[dict]:
    import torch

    out = []
    for (n_out, n_in) in sorted(set(shapes)):
        w16 = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16)
        w8 = w16.to(torch.float8_e4m3fn)
        wi = torch.randint(-127, 128, (n_out, n_in), device="cuda", dtype=torch.int8)
        sb = torch.ones(1, n_out, device="cuda")
        for M in MS:
            x16 = torch.randn(M, n_in, device="cuda", dtype=torch.bfloat16)
            x8 = x16.to(torch.float8_e4m3fn)
            Mi = max(M, 32) if M <= 16 else M
            xi = torch.randint(-127, 128, (Mi, n_in), device="cuda", dtype=torch.int8)
            sa = torch.ones(M, 1, device="cuda")
            row = {"shape": [n_out, n_in], "M": M, "bf16_us": _time(lambda: x16 @ w16.t())}
            row["fp8_us"] = _time(lambda: torch._scaled_mm(x8, w8.t(), scale_a=sa, scale_b=sb,
                                                           out_dtype=torch.bfloat16))
            row["int8_us"] = _time(lambda: torch._int_mm(xi, wi.t()))
            row["int8_M"] = Mi
            out.append(row)
    return out


def make(root: str) -> tuple[str, str]:
    from pathlib import Path

    from compress.quant.config import config_for
    from compress.quant.entry import quantize_checkpoint

    paths = []
    for s in ("fp8", "int8-sq"):
        p = Path(root) / s
        if not (p / "kiln.json").is_file():
            quantize_checkpoint("smollm2-135m", config_for(s), p, eval_windows=None, progress=True)
        paths.append(str(p))
    return paths[0], paths[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp8")
    ap.add_argument("--int8")
    ap.add_argument("--make", help="quantize smollm2-135m into DIR/fp8 and DIR/int8-sq first")
    ap.add_argument("--cpu", action="store_true", help="emulate the kernels on the CPU (plumbing check)")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    import torch

    if args.make:
        args.fp8, args.int8 = make(args.make)
    if not (args.fp8 or args.int8):
        ap.error("give --fp8 and/or --int8 checkpoint dirs, or --make DIR")
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run on an H100 (or pass --cpu to check the plumbing only)")
    rows = []
    for path, scheme in ((args.fp8, "fp8"), (args.int8, "int8-sq")):
        if path:
            rows += check(path, scheme, device, args.cpu)
    worst = {s: max((r["rel_err"] for r in rows if r["scheme"] == s), default=None) for s in ("fp8", "int8-sq")}
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (emulated kernels)",
              "tolerance": TOL, "worst_rel_err": worst, "failed": [r for r in rows if not r["ok"]],
              "layers": len(rows)}
    if device == "cuda":
        result["gemm_us"] = timings([tuple(r["shape"]) for r in rows])
    print(json.dumps({k: v for k, v in result.items() if k != "gemm_us"}))
    for t in result.get("gemm_us", []):
        print(f"{t['shape']} M={t['M']}: bf16 {t['bf16_us']:.1f} us, fp8 {t['fp8_us']:.1f} us "
              f"({t['bf16_us'] / t['fp8_us']:.2f}x), int8 {t['int8_us']:.1f} us at M={t['int8_M']} "
              f"({t['bf16_us'] / t['int8_us']:.2f}x)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result | {"rows": rows}, f, indent=1)
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
