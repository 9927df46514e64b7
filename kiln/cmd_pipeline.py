"""`kiln pipeline`: the whole journey in one command."""
from __future__ import annotations

import click

from .common import emit_json, parse_size, stderr


@click.command()
@click.argument("source", required=False, default="smollm2-135m")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Output dir (one subdir per stage).")
@click.option("--recipe", "recipe_path", type=click.Path(), default=None,
              help="YAML recipe (see examples/recipes/). Default: int8-wo for cpu, fp8 for h100.")
@click.option("--target", type=click.Choice(["cpu", "h100"]), default="cpu", show_default=True,
              help="cpu: ONNX Runtime artifact. h100: fp8 and a TensorRT engine when TensorRT and a GPU are present.")
@click.option("--no-bench", is_flag=True, help="Skip the speed benchmark.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Memory budget (e.g. 2.5GiB; default: the memory available now). Compression and export run one "
                   "decoder layer at a time anyway; validation goes per layer and an artifact too big to load "
                   "for perplexity and speed is skipped, with the reason in the report.")
@click.option("--force", is_flag=True, help="Redo every stage even if a valid one exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object last on stdout.")
def pipeline(source, out, recipe_path, target, no_bench, max_memory, force, as_json):
    """Take SOURCE (default: smollm2-135m) through prune -> quantize -> export -> validate -> evaluate ->
    benchmark, and write OUT/report.json, OUT/report.md and OUT/report.png.

    Finished stages are reused on a rerun (same source and passes) unless --force.
    """
    from .pipeline import Pipeline
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path) if recipe_path else None
    report = Pipeline(source, out, recipe=recipe, target=target, force=force, log=stderr, bench=not no_bench,
                      max_memory=parse_size(max_memory, "--max-memory") if max_memory else None).run()
    if as_json:
        emit_json(report)
        return
    _table(report)


def _table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from .report import COLUMNS, cells

    t = Table(title=f"llmkiln pipeline: {report['source']} ({report['target']})")
    for name, _, _ in COLUMNS:
        t.add_column(name, justify="left" if name in ("stage", "kind") else "right")
    for row in report["stages"]:
        t.add_row(*cells(row))
    c = Console(width=max(Console().width, 130))
    c.print(t)
    for step in report["next_steps"]:
        c.print(f"next: {step}")
    c.print(f"artifact: {report['artifact']}   report: {report['output']}/report.md")


COMMANDS = [pipeline]
