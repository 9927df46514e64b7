"""The pipeline through the Python API: quantize, export (self-validated), score and benchmark.

    python examples/pipeline_api.py [SOURCE] [OUT]      (SOURCE defaults to smollm2-135m)

The same steps `kiln pipeline` runs, one library call each.
"""
import sys
from pathlib import Path

from compress.quant.config import Int8WeightOnly
from compress.quant.entry import quantize_checkpoint
from export.onnx import export_onnx
from runtime import Engine
from runtime.bench import BenchConfig, benchmark
from runtime.evaluate import perplexity


def main() -> None:
    source = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "out-api")
    quantize_checkpoint(source, Int8WeightOnly(), out / "int8", calib_samples=16, eval_windows=None, force=True)
    manifest = export_onnx(out / "int8", out / "onnx", force=True)  # validated against the fake-quant model
    v = manifest.validation
    print("validation:", v.passed, v.metric, v.value)
    with Engine.load(out / "onnx") as engine:
        print("perplexity:", round(perplexity(engine, windows=2).ppl, 4))
        speed = benchmark(engine, BenchConfig(new_tokens=32, runs=2, prefill_len=128))
        print("decode tokens/s:", round(speed["decode_tokens_per_s"], 1))
        print(engine.generate("def add(a, b):", max_new_tokens=24).text)


if __name__ == "__main__":
    main()
