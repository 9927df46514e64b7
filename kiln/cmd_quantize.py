"""`kiln compress quantize`: calibrated INT8 / FP8 / INT4 quantization into a compressed checkpoint dir."""
from __future__ import annotations

import dataclasses

import click

from .common import emit_json, parse_size

SCHEME_NAMES = ("int8-wo", "fp8", "int8-sq", "int8-dyn", "int4", "int8-group")


@click.command()
@click.argument("source")
@click.option("--scheme", default=None, help=f"One of: {', '.join(SCHEME_NAMES)} (or --budget).")
@click.option("--budget", type=float, default=None,
              help="Instead of one scheme: the cheapest mix of --formats, group by group, whose perplexity ratio "
                   "on the exported artifact stays within this (e.g. 1.015); the artifact goes to OUT-onnx.")
@click.option("--formats", default=None, help="With --budget: candidate formats, e.g. fp8,int8-wo,float (h100) or "
                                              "int4,int8-wo,int8-fine,float (cpu; int8-fine: int8-wo with the "
                                              "fine kernel). Default: int4,int8-wo (cpu), fp8,int8-wo,float "
                                              "(h100).")
@click.option("--target", type=click.Choice(["cpu", "h100"]), default="cpu", show_default=True,
              help="With --budget: what the cost is (cpu: bytes per decode step; h100: Tensor Core time).")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Output checkpoint dir.")
@click.option("--method", type=click.Choice(["rtn", "gptq"]), default=None,
              help="How weights are rounded: rtn (round to nearest) or gptq (error-compensating, layer by layer "
                   "on the calibration windows). Default: the scheme's (gptq for int8-wo, int4, int8-group, "
                   "int8-sq; rtn for fp8, int8-dyn).")
@click.option("--kernel", type=click.Choice(["fast", "fine"]), default=None,
              help="int8-wo, int8-group, int4: how ONNX Runtime's CPU kernel runs these weights, recorded per Linear. "
                   "fine: activations quantized per 16 inputs instead of 32, closer to the checkpoint (+25% scale "
                   "bytes for int8; docs/QUANTIZATION.md). Default: fast.")
@click.option("--kv-cache", type=click.Choice(["int8"]), default=None,
              help="Also record static int8 KV-cache scales (one per layer, KV head and channel) measured on the "
                   "calibration windows through the quantized layers; `kiln export onnx --form ort --kv-cache int8` "
                   "then uses them instead of calibrating at export (docs/FORMATS.md).")
@click.option("--calib", default="builtin:pydoc", show_default=True,
              help="Calibration corpus (builtin:pydoc, a text file, or JSONL with 'text'); windows from its end.")
@click.option("--calib-samples", type=click.IntRange(1, None), default=16, show_default=True,
              help="Calibration windows.")
@click.option("--calib-seq-len", "--seq-len", "seq_len", type=click.IntRange(2, 1 << 16), default=512,
              show_default=True, help="Tokens per calibration (and evaluation) window.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where each decoder layer's forward, Hessians and GPTQ run (auto: cuda when torch sees a GPU); "
                   "weights are read and written one layer at a time either way.")
@click.option("--shard-size", default="2GB", show_default=True, metavar="SIZE",
              help="Largest output shard (decoder layers are never split): e.g. 500MB, 2GB, 5GiB.")
@click.option("--ignore", multiple=True, metavar="PATTERN",
              help="Keep matching layers float: a module name, a glob (model.layers.0.*), a last component "
                   "(down_proj, lm_head) or re:REGEX. Repeatable; added to the scheme's own (fp8 and int8-sq "
                   "keep lm_head float).")
@click.option("--float-inputs", multiple=True, metavar="PATTERN",
              help="fp8 / int8-sq / int8-dyn: these Linears keep float inputs and quantized weights "
                   "(weight-only), same pattern forms as --ignore. Repeatable (docs/QUANTIZATION.md).")
@click.option("--eval-windows", type=click.IntRange(0, None), default=8, show_default=True,
              help="Perplexity windows measured before/after (0 skips the measurement).")
@click.option("--eval-text", default=None, help="Corpus for the perplexity check (default: the calibration one, "
                                                "from its start).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object last on stdout.")
def quantize(source, scheme, budget, formats, target, out, method, kernel, kv_cache, calib, calib_samples, seq_len,
             device, shard_size, ignore, float_inputs, eval_windows, eval_text, force, as_json):
    """Quantize SOURCE with a calibrated scheme and write a compressed checkpoint to OUT.

    SOURCE is read one decoder layer at a time and each finished layer is written at once to OUT's shards,
    so memory is about one layer, whatever the model's size. A Hub id (meta-llama/Llama-3.2-1B) is taken
    from the Hugging Face cache (downloaded when the Hub is reachable and HF_HUB_OFFLINE is not set).

    \b
    int8-wo   INT8 weights per channel, float activations (CPU, memory)
    fp8       FP8 E4M3 weights + static per-tensor FP8 activations (H100 / TensorRT)
    int8-sq   SmoothQuant INT8 weights + static per-tensor INT8 activations (TensorRT)
    int8-dyn  SmoothQuant INT8 weights + per-token dynamic INT8 activations (ONNX Runtime CPU)
    int4      INT4 GPTQ weights in groups of 128/64/32, float activations
    int8-group  INT8 weights with a scale per group of 128/64/32 inputs, float activations

    fp8 and int8-sq keep a tied lm_head float (TensorRT's embedding Gather takes no INT8/FP8 table).
    The checkpoint records each Linear's format (kiln.json); `kiln export onnx` builds from that.
    """
    from compress.quant.config import ACTIVATION_SCHEMES, SCHEMES, config_for
    from compress.quant.entry import quantize_checkpoint

    if (scheme is None) == (budget is None):
        raise click.UsageError("give --scheme NAME, or --budget RATIO (with --formats)")
    if budget is not None:
        if kernel is not None or method is not None or kv_cache is not None:
            raise click.UsageError("--kernel, --method and --kv-cache apply to --scheme; --budget chooses per group")
        return _budget(source, out, budget, formats, target, calib, calib_samples, seq_len, eval_windows, eval_text,
                       force, as_json)

    if float_inputs and scheme in SCHEMES and scheme not in ACTIVATION_SCHEMES:
        raise click.UsageError(f"--float-inputs applies to {', '.join(ACTIVATION_SCHEMES[:-1])} and "
                               f"{ACTIVATION_SCHEMES[-1]} (activation-quantized schemes), not {scheme}")
    kw = {"float_inputs": tuple(float_inputs)} if float_inputs else {}
    if method is not None:
        kw["method"] = method
    if kernel is not None:
        if scheme in SCHEMES and not any(f.name == "kernel" for f in dataclasses.fields(SCHEMES[scheme])):
            raise click.UsageError(f"--kernel applies to the weight-only schemes (int8-wo, int8-group, int4), "
                                   f"not {scheme}")
        kw["kernel"] = kernel
    if ignore and scheme in SCHEMES:  # added to the preset's own (fp8 and int8-sq keep lm_head float)
        base = next(f.default for f in dataclasses.fields(SCHEMES[scheme]) if f.name == "ignore")
        kw["ignore"] = tuple(base) + tuple(p for p in ignore if p not in base)
    config = config_for(scheme, **kw)
    res = quantize_checkpoint(source, config, out, calib_text=calib, calib_samples=calib_samples, seq_len=seq_len,
                              eval_windows=eval_windows or None, eval_text=eval_text, force=force,
                              progress=not as_json, device=device, shard_size=parse_size(shard_size, "--shard-size"),
                              kv_cache=kv_cache)
    if as_json:
        emit_json(res)
        return
    formats = ", ".join(f"{n} {label}" for label, n in res["formats"].items())
    click.echo(f"wrote {res['output']} ({scheme}: {formats}; {res['quantize_seconds']} s)")
    click.echo(f"size on disk  {res['bytes_on_disk'] / 1e6:.1f} MB (weights {res['weights_bytes'] / 1e6:.1f} MB)")
    if "kv_cache" in res:
        kv = res["kv_cache"]
        click.echo(f"KV cache      int8 scales per layer, KV head and channel ({kv['windows']} x {kv['seq_len']} "
                   f"tokens) in {kv['file']}")
    if "perplexity" in res:
        p = res["perplexity"]
        click.echo(f"perplexity    {p['ppl']:.4f} vs float {p['ppl_float']:.4f}: ratio {p['ratio']:.4f} "
                   f"({p['windows']} x {p['seq_len']}, {p['corpus']})")


def _budget(source, out, budget, formats, target, calib, calib_samples, seq_len, eval_windows, eval_text, force,
            as_json) -> None:
    from compress.budget.search import DEFAULT_FORMATS

    from .budget import quantize_budget

    formats = formats or ",".join(DEFAULT_FORMATS[target])
    res = quantize_budget(source, out, budget=budget, formats=formats, target=target, calib_text=calib,
                          calib_samples=calib_samples, seq_len=seq_len, eval_text=eval_text,
                          eval_windows=eval_windows or 8, force=force, progress=not as_json)
    if as_json:
        emit_json(res)
        return
    last = res["rounds"][-1]
    share = ", ".join(f"{f} {v:.0%}" for f, v in sorted(res["weight_share"].items(), key=lambda kv: -kv[1]))
    head = f"; lm_head {res['lm_head']}" if res.get("lm_head") else ""
    click.echo(f"wrote {res['output']} and {res['artifact']} ({share} of the decoder Linears' weights{head})")
    click.echo(f"perplexity ratio: predicted {last['predicted_ratio']:.4f}, measured on the artifact "
               f"{last['measured_ratio']:.4f} (budget {budget}; {'met' if res['met'] else 'NOT met'} after "
               f"{len(res['rounds'])} round(s))")


COMMANDS = [quantize]
