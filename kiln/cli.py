"""`kiln`: one thin click command per stage. Heavy imports live inside command bodies so --help is instant."""
from __future__ import annotations

import sys

import click

from . import cmd_eval, cmd_onnx, cmd_pipeline, cmd_prune, cmd_quantize, cmd_runtime, cmd_tensorrt
from .common import KilnGroup


@click.group(cls=KilnGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmkiln", prog_name="kiln")
def cli():
    """llmkiln: shrink a trained Llama-style model and serve it fast.

    \b
    Stages:  compress (quantize, prune) -> export (onnx, tensorrt, triton) -> run | chat | bench | serve
    Or all at once:  kiln pipeline [SOURCE] -o OUT

    SOURCE is a Hugging Face checkpoint dir, a .gguf file, an llmkiln checkpoint, or the alias
    smollm2-135m (SmolLM2-135M-Instruct, fetched once into ~/.cache/llmkiln or $KILN_CACHE).
    """


@cli.group("compress", cls=KilnGroup)
def compress_group():
    """Make a model smaller in PyTorch: quantize (int8-wo, fp8, int8-sq, int8-dyn, int4) or prune."""


@cli.group("export", cls=KilnGroup)
def export_group():
    """Compile a model: ONNX graph from the weights, TensorRT engine, Triton model repository."""


@cli.group("eval", cls=KilnGroup)
def eval_group():
    """Measure quality: perplexity of a model, checkpoint or artifact."""


cli.add_command(cmd_eval.info)
eval_group.add_command(cmd_eval.ppl)
for c in cmd_quantize.COMMANDS + cmd_prune.COMMANDS:
    compress_group.add_command(c)
for c in cmd_onnx.COMMANDS + cmd_tensorrt.COMMANDS:
    export_group.add_command(c)
for c in cmd_runtime.COMMANDS + cmd_pipeline.COMMANDS:
    cli.add_command(c)


def main() -> None:
    cli(prog_name="kiln")


if __name__ == "__main__":
    sys.exit(main())
