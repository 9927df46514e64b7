"""CUDA vs CPU for the layer-by-layer quantizer, on a random model with Llama-3.2-1B's shapes built on the
device (issue 14's GPU check; one prepared script, about 8 minutes on an H100/H200).

    python -m benchmarks.gpu.sequential_check --work /tmp/seqcheck [--shape 1b] [--schemes int8-wo,int4]

Builds the model with benchmarks.scale_build (bf16 shards), then for each scheme (GPTQ, 4 calibration
windows of 512) runs ``quantize_checkpoint`` with device=cuda and device=cpu, and reports the fraction of
identical codes per scheme, the wall time of each, and the peak CUDA memory. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def codes_of(ckpt: Path) -> dict:
    from compress.tensorfile import SafetensorsFiles, checkpoint_files

    st = SafetensorsFiles(checkpoint_files(ckpt))
    return {n: st.get(n, raw=True) for n in st.keys() if n.endswith(".weight") and st.dtype(n) in ("I8", "U8")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--schemes", default="int8-wo,int4")
    ap.add_argument("--samples", type=int, default=4)
    args = ap.parse_args()
    import numpy as np
    import torch

    from benchmarks.scale_build import SHAPES, build
    from compress.quant import config_for
    from compress.quant.entry import quantize_checkpoint

    if not torch.cuda.is_available():
        sys.exit("no CUDA device here: this check needs the lent GPU machine")
    work = Path(args.work)
    model = build(SHAPES[args.shape], work / "model")
    out = {"shape": args.shape, "gpu": torch.cuda.get_device_name(0), "schemes": {}}
    for scheme in args.schemes.split(","):
        res = {}
        for dev in ("cuda", "cpu"):
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            quantize_checkpoint(str(model), config_for(scheme, method="gptq"), work / f"{scheme}-{dev}",
                                calib_samples=args.samples, eval_windows=None, force=True, device=dev)
            res[dev] = {"seconds": round(time.perf_counter() - t0, 1),
                        "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        a, b = codes_of(work / f"{scheme}-cuda"), codes_of(work / f"{scheme}-cpu")
        same = sum(int((a[n] == b[n]).sum()) for n in a)
        total = sum(a[n].size for n in a)
        res["codes_identical"] = round(same / total, 6)
        res["passed"] = bool(same / total >= 0.999 and a.keys() == b.keys() and np.isfinite(same))
        out["schemes"][scheme] = res
    print(json.dumps(out))


if __name__ == "__main__":
    main()
