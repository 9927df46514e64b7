"""Entry point behind ``kiln compress quantize``: load -> calibrate -> quantize_ -> save -> measure."""
from __future__ import annotations

import time
from pathlib import Path

from runtime.corpus import BUILTIN, CorpusError
from runtime.layerspec import summarize

from ..errors import CompressError


def quantize_checkpoint(source: str, config, out, *, calib_text: str = BUILTIN, calib_samples: int = 16,
                        seq_len: int = 512, eval_windows: int | None = 8, eval_text: str | None = None,
                        force: bool = False, progress: bool = False) -> dict:
    """Quantize ``source`` (model, alias or float/pruned llmkiln checkpoint) into checkpoint dir ``out``.

    Calibration windows come from the end of ``calib_text``; perplexity (when ``eval_windows``) is measured
    on the first windows of ``eval_text`` (default: the calibration corpus) for the float and the quantized
    model. The input is only read.
    """
    from ..calib import calibration_batches, forward_loop
    from ..checkpoint import source_record
    from ..evaluate import corpus_ids, perplexity
    from ..loading import load_model
    from .api import quantize_
    from .checkpoint import save_quantized

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not force:
        raise CompressError(f"{out} already exists; pass --force to replace it")
    model, tok, info = load_model(source, quiet=not progress)
    earlier = list(info.manifest.passes) if info.manifest is not None else []
    if info.manifest is not None and info.manifest.quantized:
        raise CompressError(f"{source} is already quantized ({info.manifest.preset()}); "
                            "quantize the float or pruned checkpoint it came from")
    if Path(source).resolve() == out.resolve():
        raise CompressError("the output dir must differ from the input")
    try:
        calib_ids = corpus_ids(tok, calib_text)
    except CorpusError as e:
        raise CompressError(str(e)) from None
    batches = calibration_batches(tok, calib_text, calib_samples, seq_len, ids=calib_ids)
    base = None
    ids = None
    if eval_windows:
        ids = calib_ids if eval_text in (None, calib_text) else corpus_ids(tok, eval_text)
        base = perplexity(model, tok, text=eval_text or calib_text, seq_len=seq_len, windows=eval_windows,
                          ids=ids, progress=progress)
    t1 = time.perf_counter()
    report = quantize_(model, config, calib=forward_loop(batches, "calibrate" if progress else None),
                       progress=progress)
    report.stats["calibration"] = {"text": calib_text, "samples": calib_samples, "seq_len": seq_len}
    tq = time.perf_counter() - t1
    result = {"output": str(out.resolve()), "scheme": config.scheme, "quantized_layers": len(report.layers),
              "formats": summarize(report.layers.values()), "quantize_seconds": round(tq, 1)}
    if eval_windows:
        q = perplexity(model, tok, text=eval_text or calib_text, seq_len=seq_len, windows=eval_windows, ids=ids,
                       progress=progress)
        ev = {"corpus": q.corpus, "windows": q.windows, "seq_len": seq_len, "ppl_float": round(base.ppl, 4),
              "ppl": round(q.ppl, 4), "ratio": round(q.ppl / base.ppl, 5)}
        report.stats["perplexity"] = ev
        result["perplexity"] = ev
    manifest = save_quantized(model, tok, out, source=source_record(info), earlier_passes=earlier, force=force)
    result["bytes_on_disk"] = sum(f.size for f in manifest.files.values())
    result["weights_bytes"] = manifest.files["model.safetensors"].size
    if info.kind in ("hf", "checkpoint"):
        result["source_weights_bytes"] = sum(p.stat().st_size for p in info.weight_files())
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result
