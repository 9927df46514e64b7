"""`kiln eval ppl` vs plain transformers computing the same protocol on the same GGUF.

    python benchmarks/ppl_parity.py [--windows 8]

Plain transformers here loads the GGUF straight from the file (no llmkiln cache), tokenizes the corpus once
without special tokens, scores consecutive non-overlapping 512-token windows with log-softmax in float64.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import warnings


def plain_transformers(gguf_path: str, windows: int, seq_len: int) -> float:
    import torch
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.rsplit("/", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    nll, n = 0.0, 0
    with torch.inference_mode():
        for k in range(windows):
            w = torch.tensor([ids[k * seq_len:(k + 1) * seq_len]])
            logp = torch.log_softmax(model(w).logits[0].double(), -1)
            nll -= logp[:-1].gather(1, w[0, 1:, None]).sum().item()
            n += seq_len - 1
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    from compress.sources import fetch_alias

    gguf_path = str(fetch_alias("smollm2-135m"))
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "eval", "ppl", "smollm2-135m", "--windows",
                          str(args.windows), "--seq-len", str(args.seq_len), "--json"],
                         capture_output=True, text=True, check=True)
    ours = json.loads(out.stdout.strip().splitlines()[-1])["ppl"]
    ref = plain_transformers(gguf_path, args.windows, args.seq_len)
    print(json.dumps({"kiln": ours, "transformers": ref, "rel_diff": abs(ours - ref) / ref}))


if __name__ == "__main__":
    main()
