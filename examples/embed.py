"""Embed the llmkiln runtime in your own program: load an artifact, stream a chat answer, then batch two prompts.

    python examples/embed.py ART ["your question"]

ART is a dir written by `kiln export onnx` or `kiln pipeline` (OUT/onnx). Only numpy, onnxruntime and
tokenizers are imported: no torch.
"""
import sys

from runtime import Engine


def main() -> None:
    art = sys.argv[1]
    question = sys.argv[2] if len(sys.argv) > 2 else "What is a Python list comprehension?"
    with Engine.load(art) as engine:
        messages = [{"role": "user", "content": question}]
        for delta in engine.stream(messages, max_new_tokens=64):  # text deltas, whole characters
            print(delta, end="", flush=True)
        print()
        results = engine.generate(["def fibonacci(n):", "The capital of France is"], max_new_tokens=16)
        for r in results:  # a list of prompts runs as one batch
            print(repr(r.text), r.finish_reason, f"{len(r.token_ids)} tokens")


if __name__ == "__main__":
    main()
