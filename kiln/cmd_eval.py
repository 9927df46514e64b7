"""`kiln info` and `kiln eval ppl`."""
from __future__ import annotations

from pathlib import Path

import click

from .common import emit_json


def _is_runtime_artifact(source: str) -> bool:
    p = Path(source)
    if not (p / "kiln.json").is_file():
        return False
    from runtime.manifest import read_manifest

    return read_manifest(p).kind in ("onnx", "engine")


@click.command()
@click.argument("source")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) weights. Only for files you trust.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def info(source, allow_pickle, as_json):
    """Show architecture, parameter count, bytes per dtype and origin of SOURCE."""
    if _is_runtime_artifact(source):
        from runtime.manifest import read_manifest

        m = read_manifest(source)
        size = sum(f.size for f in m.files.values())
        d = m.to_dict()
        out = {"kind": m.kind, "path": str(Path(source).resolve()), "architecture": d["architecture"],
               "passes": d["passes"], "source": m.source, "bytes_on_disk": size}
    else:
        import dataclasses

        from compress.hfdir import architecture_from_config
        from compress.loading import load_model
        from runtime.strict import to_json

        model, _, src = load_model(source, allow_pickle=allow_pickle)
        by_dtype: dict[str, int] = {}
        unique = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        for t in unique.values():
            dt = str(t.dtype).replace("torch.", "")
            by_dtype[dt] = by_dtype.get(dt, 0) + t.numel() * t.element_size()
        params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        arch = dataclasses.asdict(architecture_from_config(model.config))
        out = {"kind": src.kind, "source": src.to_dict(), "architecture": arch, "parameters": params,
               "bytes_by_dtype": by_dtype, "passes": to_json(src.manifest.passes) if src.manifest else []}
        if "converted" in src.extra:
            out["converted_cache"] = src.extra["converted"]
    if as_json:
        emit_json(out)
        return
    a = out["architecture"]
    click.echo(f"source        {source} ({out['kind']})")
    click.echo(f"architecture  {a['model_type']}: {a['layers']} layers, hidden {a['hidden']}, "
               f"heads {a['heads']}/{a['kv_heads']} kv, head_dim {a['head_dim']}, mlp {a['intermediate']}, "
               f"vocab {a['vocab']}, tied embeddings {a['tied_embeddings']}")
    click.echo(f"rope          theta {a['rope_theta']:g}, scaling {a['rope_scaling']}; rms eps {a['rms_eps']:g}")
    if "parameters" in out:
        click.echo(f"parameters    {out['parameters']:,}")
        for dt, n in sorted(out["bytes_by_dtype"].items()):
            click.echo(f"bytes         {dt}: {n:,}")
    if out.get("bytes_on_disk"):
        click.echo(f"on disk       {out['bytes_on_disk']:,} bytes")
    for p in out.get("passes") or []:
        click.echo(f"pass          {p['kind']}: {p['config']}")


def _torch_ppl(source, text, seq_len, windows, allow_pickle, progress):
    """A model or checkpoint scored one decoder layer at a time (compress.evaluate.perplexity_streamed): the
    same protocol, memory about one layer; pickle weights load whole."""
    from compress.sources import resolve

    info = resolve(source, allow_pickle=allow_pickle, quiet=not progress)
    if info.allow_pickle and info.kind == "hf" and not list(info.path.glob("*.safetensors")):
        from compress.evaluate import perplexity
        from compress.loading import load_model

        model, tok, src = load_model(info)
        return src.kind, perplexity(model, tok, text=text, seq_len=seq_len, windows=windows, progress=progress)
    from transformers import AutoTokenizer

    from compress.evaluate import perplexity_streamed
    from compress.hfdir import quiet_transformers
    from compress.lazy import LazyModel
    from compress.quant.entry import source_dir

    root = source_dir(info, quiet=not progress)
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(str(root))
    specs = info.manifest.layer_specs() if info.manifest is not None else {}
    return info.kind, perplexity_streamed(LazyModel(root, specs), tok, text=text, seq_len=seq_len,
                                          windows=windows, progress=progress)


@click.command("ppl")
@click.argument("source")
@click.option("--text", "text", default="builtin:pydoc", show_default=True,
              help="Corpus: builtin:pydoc, a text file, or a JSONL file with a 'text' field.")
@click.option("--seq-len", type=click.IntRange(2, 1 << 20), default=512, show_default=True,
              help="Tokens per window (windows do not overlap).")
@click.option("--windows", type=click.IntRange(1, None), default=8, show_default=True,
              help="Score the first N windows of the corpus.")
@click.option("--chunk", type=click.IntRange(1, None), default=None,
              help="ONNX/engine artifacts: feed each window through the KV cache N tokens at a time, so attention "
                   "reads what the cache stored (a quantized cache's codes). Default: the whole window at once; "
                   "on a float cache whose window's logits would pass 64 MiB (a large vocabulary), as many tokens "
                   "as fit in it, the same perplexity within round-off.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) weights.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="Threads for ONNX Runtime artifacts.")
@click.option("--trust-engine-code", is_flag=True,
              help="Let a TensorRT engine built --version-compatible run the native code its plan carries. "
                   "Only for engines you built or trust.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object last on stdout.")
def ppl(source, text, seq_len, windows, chunk, allow_pickle, threads, trust_engine_code, as_json):
    """Perplexity of SOURCE: the corpus tokenized once without special tokens, consecutive
    non-overlapping windows of --seq-len tokens, the first --windows of them, log-softmax in float64.

    SOURCE may be a model, a compressed checkpoint, or an ONNX/engine artifact (scored through the runtime).
    """
    import time

    t0 = time.perf_counter()
    if _is_runtime_artifact(source):
        from runtime import Engine
        from runtime.evaluate import perplexity as rt_ppl

        eng = Engine.load(source, threads=threads, trust_engine_code=trust_engine_code)
        res = rt_ppl(eng, text=text, seq_len=seq_len, windows=windows, progress=not as_json, chunk=chunk)
        kind = eng.manifest.kind
    else:
        if chunk is not None:
            raise click.UsageError("--chunk feeds an ONNX or engine artifact's KV cache; a model or checkpoint "
                                   "is scored one pass per window")
        kind, res = _torch_ppl(source, text, seq_len, windows, allow_pickle, progress=not as_json)
    out = res.to_dict() | {"source": source, "kind": kind, "seconds": round(time.perf_counter() - t0, 2)}
    if chunk is not None:
        out["chunk"] = min(chunk, seq_len)
    if as_json:
        emit_json(out)
    else:
        fed = f", fed {out['chunk']} at a time" if "chunk" in out else ""
        click.echo(f"perplexity {res.ppl:.4f} over {res.tokens} tokens ({res.windows} x {res.seq_len}{fed}, "
                   f"{res.corpus})")
