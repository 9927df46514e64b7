"""How far a quantized checkpoint's own torch model moves between float32 and float64 arithmetic.

    KILN_CACHE=/tmp/kc .venv/bin/python -m benchmarks.parity_floor CKPT [CKPT ...]

For each compressed checkpoint: logits of the export-validation prompt from the fake-quant torch model in
float32 and in float64, reported as max |Δlogits| / logit range (the metric of `kiln export onnx`'s
self-validation). With activation quantization, rounding-boundary flips make this nonzero; it is the floor
below which no other float32 implementation (ONNX Runtime, TensorRT) can be expected to agree with torch.
"""
from __future__ import annotations

import argparse
import json
import sys


def floor(path: str, max_tokens: int = 24) -> dict:
    import torch

    from compress.loading import load_model
    from compress.quant import primitives as P
    from compress.quant.modules import QuantLinear
    from export.onnx.validate import PROMPT

    model, tok, _ = load_model(path, quiet=True)
    ids = torch.tensor([tok.encode(PROMPT)[:max_tokens]])
    with torch.no_grad():
        a = model(ids).logits.double()
        model.double()
        for m in model.modules():
            if isinstance(m, QuantLinear) and m.input_scale is not None:
                m.input_scale = m.input_scale.double()
        orig = QuantLinear.forward

        def forward64(self, x):  # the fp8 fake quant casts through float8 -> float32; keep float64 around it
            if self.act == "int8-dyn":
                x = P.fake_quant_int8_dynamic(x)
            elif self.act is not None:
                x = P.ACT_FAKE_QUANT[self.act](x, self.input_scale).to(x.dtype)
            return torch.nn.functional.linear(x, self.weight, self.bias)

        QuantLinear.forward = forward64
        try:
            b = model(ids).logits
        finally:
            QuantLinear.forward = orig
    rng = float(a.max() - a.min())
    return {"checkpoint": path, "tokens": int(ids.shape[1]), "max_abs_diff": float((a - b).abs().max()),
            "relative_to_range": float((a - b).abs().max()) / rng}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    args = ap.parse_args(argv)
    for c in args.checkpoints:
        print(json.dumps(floor(c)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
