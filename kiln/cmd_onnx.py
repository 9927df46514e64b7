"""`kiln export onnx`: ONNX graph built from the weights, self-validated on ONNX Runtime CPU."""
from __future__ import annotations

import click

from .common import emit_json, parse_size, stderr


@click.command("onnx")
@click.argument("source")
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False),
              help="Artifact dir to create (model.onnx, model.onnx.data, tokenizer, kiln.json).")
@click.option("--form", type=click.Choice(["portable", "ort"]), default="portable", show_default=True,
              help="portable: standard ONNX ops + QDQ (TensorRT and ONNX Runtime). ort: ONNX Runtime contrib ops "
                   "(GroupQueryAttention, SkipSimplifiedLayerNormalization, stacked q/k/v), faster decoding on "
                   "ONNX Runtime CPU; not for TensorRT, not for fp8/int8-sq.")
@click.option("--opset", type=int, default=None,
              help="23 (default): fused Attention/RotaryEmbedding/RMSNormalization; 21: the same with plain ops.")
@click.option("--exporter", type=click.Choice(["kiln", "optimum"]), default="kiln", show_default=True,
              help="kiln: our graph builder (every scheme). optimum: optimum-onnx's traced export, fp32 only, "
                   "for a model the builder refuses; same kiln.json, IO names and validation.")
@click.option("--optimum-python", type=click.Path(dir_okay=False), default=None, envvar="KILN_OPTIMUM_PYTHON",
              help="With --exporter optimum: the Python of a venv that has optimum-onnx "
                   "[env: KILN_OPTIMUM_PYTHON].")
@click.option("--kv-cache", type=click.Choice(["float", "int8", "fp8"]), default="float", show_default=True,
              help="How the graph stores the KV cache (about 1/4 of float32's bytes: more concurrent streams "
                   "per GB). --form portable: int8 or fp8 codes plus one float32 scale per token and KV head. "
                   "--form ort: int8 codes read directly by GroupQueryAttention, with static scales per KV head "
                   "and channel: the checkpoint's own (kiln compress quantize --kv-cache int8), else calibrated at "
                   "export on --calib.")
@click.option("--calib", "calib", default=None,
              help="With --form ort --kv-cache int8 and a source without recorded KV scales: the corpus they are "
                   "calibrated on (text or JSONL file; its end, never the windows evaluation reads). Default: "
                   "builtin:pydoc. Refused with any other form or cache, which calibrate nothing.")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs torch self-validation.")
@click.option("--validation", type=click.Choice(["auto", "whole-model", "per-layer"]), default="auto",
              show_default=True,
              help="whole-model: logits and 32 greedy tokens of the whole graph against the float32 torch model. "
                   "per-layer: each decoder layer's subgraph against the torch layer on the same input (memory: "
                   "one layer). auto: whole-model when both fit --max-memory, else per-layer.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Memory budget for the validation choice (e.g. 6GiB; default: the memory available now).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only after the new artifact is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object last on stdout.")
def onnx_cmd(source, out, form, opset, exporter, optimum_python, kv_cache, calib, no_validate, validation,
             max_memory, force, as_json):
    """Export SOURCE (model, GGUF, alias or compressed checkpoint) to an ONNX artifact dir with KV cache.

    The graph is written from the weights (no tracing), weights in model.onnx.data, and checked against
    the torch model on ONNX Runtime CPU unless --no-validate.

    --exporter optimum runs optimum-onnx's exporter instead, in the Python given by --optimum-python or
    KILN_OPTIMUM_PYTHON (optimum-onnx needs transformers 4.x, so it cannot share llmkiln's environment).
    fp32 sources only: a quantized checkpoint is refused, a pruned one is fine. Create that Python with:

    \b
      python3 -m venv .venv-optimum
      .venv-optimum/bin/pip install torch==2.13.0 optimum==2.1.0 \\
          optimum-onnx==0.1.0 transformers==4.57.6 onnxruntime
    """
    import time

    from export.onnx import export_onnx

    if calib is not None and not (form == "ort" and kv_cache == "int8"):
        raise click.UsageError("--calib is the corpus the ort form's int8 KV cache is calibrated on; it applies "
                               "to --form ort --kv-cache int8 only")
    t0 = time.perf_counter()
    m = export_onnx(source, out, form=form, opset=opset, validate=not no_validate, force=force,
                    progress=not as_json, exporter=exporter, optimum_python=optimum_python, validation=validation,
                    max_memory=parse_size(max_memory, "--max-memory") if max_memory else None, kv_cache=kv_cache,
                    calib_corpus=calib)
    secs = round(time.perf_counter() - t0, 2)
    from runtime.layerspec import summarize
    from runtime.strict import to_json

    size = sum(f.size for f in m.files.values())
    v = m.validation
    formats = summarize(s for s in m.layer_specs().values() if s.quantized)
    if as_json:
        emit_json({"out": out, "kind": m.kind, "exporter": exporter, "preset": m.preset(), "formats": formats,
                   "form": m.io.form, "opset": m.io.opset, "kv_cache": kv_cache, "bytes": size, "seconds": secs,
                   "timings": getattr(m, "timings", {}), "validation": to_json(v)})
        return
    if v is not None and v.passed and v.mode == "per-layer":
        stderr(f"validated layer by layer on ONNX Runtime CPU ({v.reason}): worst layer {v.value:.2e} of its output "
               f"range (tolerance {v.tolerance:g}), graph math "
               f"{max(c.graph for c in v.per_layer if c.graph is not None):.2e}")
    elif v is not None and v.passed:
        stderr(f"validated on ONNX Runtime CPU: max |Δlogits| {v.value:.2e} of the logit range "
               f"(tolerance {v.tolerance:g}), greedy {v.greedy_identical_prefix}/{v.greedy_tokens} identical")
    else:
        stderr("validation skipped (--no-validate)")
    via = " via optimum" if exporter == "optimum" else ""
    via += f", KV cache {kv_cache}{' (static scales)' if m.io.kv_static else ''}" if kv_cache != "float" else ""
    click.echo(f"wrote {out} ({m.preset()}, {m.io.form}, opset {m.io.opset}{via}, {size / 1e6:.1f} MB) "
               f"in {secs} s")


COMMANDS = [onnx_cmd]
