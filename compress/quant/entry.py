"""Entry point behind ``kiln compress quantize``: source -> quantize layer by layer -> sharded checkpoint.

The source is read one decoder layer at a time (compress.lazy) and every finished layer is written at once
to the output shards (compress.tensorfile.ShardWriter): peak memory is one layer in float32, its
calibration activations and GPTQ's matrices, whatever the model's size. The embedding and lm_head tables
are read and written a block of rows at a time.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from runtime.corpus import BUILTIN, CorpusError
from runtime.fsutil import atomic_dir
from runtime.layerspec import LayerSpec, summarize
from runtime.manifest import Manifest
from runtime.strict import to_json

from ..errors import CompressError
from .gptq import HeadFactor
from .kvobserve import KV_FORMATS, KVObserver
from .modules import QuantLinear

ROWS = 8192  # rows of the embedding / lm_head table per block
SIDE_FILES = ("generation_config.json",)


def pick_device(device: str) -> str:
    """``auto``: cuda when torch sees a GPU, else cpu."""
    if device not in ("auto", "cpu", "cuda"):
        raise CompressError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CompressError("--device cuda: torch sees no CUDA GPU here (a CPU build of torch, or no driver); "
                            "use --device cpu")
    return device


def _np(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy(), "F8_E4M3"
    if t.is_floating_point():
        return t.float().numpy(), "F32"
    return t.numpy(), {torch.int8: "I8", torch.uint8: "U8"}[t.dtype]


def layer_tensors(lazy, i: int, layer) -> dict[str, tuple[np.ndarray, str]]:
    """What checkpoint shards store of decoder layer ``i`` (docs/FORMATS.md): codes, scales and factors of
    its QuantLinears; its other tensors as the source stored them, or float32 where a pass changed them."""
    from ..lazy import version_of
    from . import primitives as P

    prefix = f"model.layers.{i}."
    out, quant = {}, []
    for rel, m in layer.named_modules():
        if isinstance(m, QuantLinear):
            quant.append(rel + ".")
            full = prefix + rel
            out[f"{full}.weight"] = _np(P.pack_int4(m.codes) if m.spec.weight == "int4" else m.codes)
            out[f"{full}.weight_scale"] = _np(m.weight_scale)
            for key, t in (("input_scale", m.input_scale), ("smooth_factor", m.smooth_factor), ("bias", m.bias)):
                if t is not None:
                    out[f"{full}.{key}"] = _np(t.reshape(()) if key == "input_scale" else t)
    versions = lazy.versions.get(i, {})
    for name, t in layer.state_dict().items():
        if any(name.startswith(q) for q in quant):
            continue
        full = prefix + name
        if full in lazy.files and versions.get(name) is not None and versions.get(name) == version_of(layer, name):
            out[full] = lazy.raw(full)  # untouched: the source's own bytes (bf16 stays bf16)
        else:
            out[full] = _in_source_dtype(t, lazy.files.dtype(full) if full in lazy.files else "F32")
    return out


def _in_source_dtype(t: torch.Tensor, dt: str) -> tuple[np.ndarray, str]:
    """A changed float tensor in the source's dtype when that holds it exactly (pruning only zeroes values),
    else float32."""
    half = {"BF16": torch.bfloat16, "F16": torch.float16}.get(dt)
    if half is not None and t.is_floating_point():
        h = t.detach().cpu().to(half)
        if torch.equal(h.float(), t.detach().cpu().float()):
            return (h.view(torch.int16).numpy().view(np.uint16), "BF16") if half is torch.bfloat16 else \
                (h.numpy(), "F16")
    return _np(t)


def _rows(lazy, name: str, convert=None):
    n = lazy.files.shape(name)[0]
    for lo in range(0, n, ROWS):
        block = lazy.files.get(name, raw=True, rows=slice(lo, min(lo + ROWS, n)))
        yield block if convert is None else convert(block)


def write_tables(lazy, writer, head_spec: LayerSpec | None, head_gptq=None) -> LayerSpec | None:
    """The embedding, final norm and lm_head: as stored, or the lm_head (and a tied table with it) quantized
    weight-only to ``head_spec``, a block of rows at a time: by GPTQ with ``head_gptq`` (a ``HeadFactor``'s factor; the
    rows are independent), else by round to nearest. Returns the head's spec."""
    from . import primitives as P
    from .transforms import head_codes

    tied = bool(getattr(lazy.config, "tie_word_embeddings", False))
    emb = "model.embed_tokens.weight"
    for name in ("model.norm.weight",) + (() if tied and head_spec else (emb,)):
        writer.add_chunks(name, lazy.files.dtype(name), lazy.files.shape(name), _rows(lazy, name))
    has_head = not tied and lazy.has("lm_head.weight")
    if head_spec is None:
        if has_head:
            writer.add_chunks("lm_head.weight", lazy.files.dtype("lm_head.weight"),
                              lazy.files.shape("lm_head.weight"), _rows(lazy, "lm_head.weight"))
        return None
    base = "model.embed_tokens" if tied else "lm_head"
    rows, cols = lazy.files.shape(emb if tied else "lm_head.weight")
    scales = []

    def codes():
        from ..memory import give_back

        for lo in range(0, rows, ROWS):
            c, s = head_codes(lazy.head_rows(lo, min(lo + ROWS, rows)), head_spec, head_gptq)
            scales.append(s)
            yield _np(P.pack_int4(c) if head_spec.weight == "int4" else c)[0]
            give_back()

    dt = {"int8": "I8", "int4": "U8", "fp8": "F8_E4M3"}[head_spec.weight]
    shape = (rows, cols // 2) if head_spec.weight == "int4" else (rows, cols)
    writer.add_chunks(f"{base}.weight", dt, shape, codes())
    writer.add({f"{base}.weight_scale": _np(torch.cat(scales))})
    return head_spec


def source_dir(info, quiet: bool) -> Path:
    """The HF-format dir (config.json + safetensors) of a float source; a GGUF is converted (and cached) once."""
    if info.kind == "gguf":
        from ..loading import hf_dir_of_gguf

        return hf_dir_of_gguf(info, quiet)
    if info.allow_pickle and not list(Path(info.path).glob("*.safetensors")):
        raise CompressError(f"{info.path}: streamed compression reads safetensors; convert the pickle weights "
                            "first (transformers: model.save_pretrained(dir, safe_serialization=True))")
    return Path(info.path)


def open_float_source(source, out: Path, force: bool, progress: bool, quantized: str):
    """(SourceInfo, HF-format dir) of a source a streamed pass reads: ``out`` must not exist (unless
    ``force``) nor be the source; a quantized source is refused with ``quantized`` (one line)."""
    from ..sources import SourceInfo, resolve

    if out.exists() and not force:
        raise CompressError(f"{out} already exists; pass --force to replace it")
    info = source if isinstance(source, SourceInfo) else resolve(str(source), quiet=not progress)
    if info.manifest is not None and info.manifest.quantized:
        raise CompressError(f"{source} is already quantized ({info.manifest.preset()}); {quantized}")
    root = source_dir(info, quiet=not progress)
    if out.resolve() in (root.resolve(), Path(info.path).resolve()):
        raise CompressError("the output dir must differ from the input")
    return info, root


def quantize_checkpoint(source: str, config, out, *, calib_text: str = BUILTIN, calib_samples: int = 16,
                        seq_len: int = 512, eval_windows: int | None = 8, eval_text: str | None = None,
                        force: bool = False, progress: bool = False, device: str = "auto",
                        shard_size: int = 2 << 30, activation_budget: int | None = None,
                        kv_cache: str | None = None) -> dict:
    """Quantize ``source`` (model, alias, Hub id or float/pruned llmkiln checkpoint) into checkpoint dir ``out``.

    Calibration windows come from the end of ``calib_text``; perplexity (when ``eval_windows``) is measured
    on the first windows of ``eval_text`` (default: the calibration corpus) for the source and the written
    checkpoint, both layer by layer. Calibration activations go to temporary files when they pass
    ``activation_budget`` bytes (default: a quarter of the memory available). ``kv_cache="int8"`` also
    records static int8 KV-cache scales measured on the calibration stream (compress.quant.kvobserve). The input
    is only read.
    """
    from transformers import AutoTokenizer

    from ..calib import calibration_batches, forward_loop
    from ..checkpoint import source_record
    from ..evaluate import corpus_ids, perplexity_streamed
    from ..hfdir import architecture_from_config, quiet_transformers
    from ..lazy import LazyModel
    from ..sequential import Streamed
    from ..tensorfile import ShardWriter
    from .api import check, run_pass

    t0 = time.perf_counter()
    if kv_cache is not None and kv_cache not in KV_FORMATS:
        raise CompressError(f"--kv-cache records static scales for {', '.join(KV_FORMATS)}, not {kv_cache!r} (the "
                            "portable graph's int8 and fp8 caches use per-token scales, which need no calibration)")
    out = Path(out)
    info, root = open_float_source(source, out, force, progress,
                                   "quantize the float or pruned checkpoint it came from")
    dev = pick_device(device)
    lazy = LazyModel(root, device=dev)
    with quiet_transformers():
        try:
            tok = AutoTokenizer.from_pretrained(str(root))
        except Exception as e:
            raise CompressError(f"{root}: no usable tokenizer ({str(e).splitlines()[0][:200]})") from None
    check(lazy.config, config, True)
    try:
        calib_ids = corpus_ids(tok, calib_text)
    except CorpusError as e:
        raise CompressError(str(e)) from None
    batches = calibration_batches(tok, calib_text, calib_samples, seq_len, ids=calib_ids)
    ids = None
    base = None
    if eval_windows:
        ids = calib_ids if eval_text in (None, calib_text) else corpus_ids(tok, eval_text)
        base = perplexity_streamed(lazy, tok, text=eval_text or calib_text, seq_len=seq_len, windows=eval_windows,
                                   ids=ids, progress=progress)
    sel = config.selection
    targets = {f"model.layers.{i}.{n}" for i in range(lazy.num_layers) for n in lazy.linear_names
               if sel(f"model.layers.{i}.{n}")}
    head = sel("lm_head")
    if not targets and not head:
        raise CompressError(f"no Linear matches targets {list(config.targets)} minus ignore {list(config.ignore)}")
    earlier = list(info.manifest.passes) if info.manifest is not None else []
    with atomic_dir(out, force=force, error=CompressError) as tmp:
        writer = ShardWriter(tmp, shard_size)
        layers: dict[str, LayerSpec] = {}

        def done(i, layer):
            for rel, m in layer.named_modules():
                if isinstance(m, QuantLinear):
                    layers[f"model.layers.{i}.{rel}"] = m.spec
            writer.add(layer_tensors(lazy, i, layer))

        t1 = time.perf_counter()
        loop = forward_loop(batches, "calibrate" if progress else None)
        if activation_budget is None:
            from ..memory import available_bytes

            activation_budget = available_bytes() // 4
        hidden = lazy.config.hidden_size
        hf = HeadFactor(lazy.norm(), hidden, config.damp) if HeadFactor.wanted(config, head) else None
        kv = KVObserver(lazy.config) if kv_cache else None
        stats = run_pass(Streamed(lazy), config, targets, loop, progress, done=done,
                         activation_budget=activation_budget, last=hf, observe=kv.watching if kv else None)
        kv_record = kv.save(tmp, calib_text, len(batches), seq_len) if kv else None
        head_spec = write_tables(lazy, writer, config.head_spec(hidden) if head else None, hf.factor if hf else None)
        if head_spec is not None:
            layers["lm_head"] = head_spec
        files = writer.close()
        tq = time.perf_counter() - t1
        lazy.config.save_pretrained(str(tmp))
        for name in SIDE_FILES:
            if (root / name).is_file():
                shutil.copyfile(root / name, tmp / name)
        tok.save_pretrained(str(tmp))
        stats["calibration"] = {"text": calib_text, "samples": calib_samples, "seq_len": seq_len}
        result = {"output": str(out.resolve()), "scheme": config.scheme, "quantized_layers": len(layers),
                  "formats": summarize(layers.values()), "quantize_seconds": round(tq, 1), "device": dev,
                  "shards": [f for f in files if f.endswith(".safetensors")]}
        if eval_windows:
            q = perplexity_streamed(LazyModel(tmp, layers), tok, text=eval_text or calib_text, seq_len=seq_len,
                                    windows=eval_windows, ids=ids, progress=progress)
            ev = {"corpus": q.corpus, "windows": q.windows, "seq_len": seq_len, "ppl_float": round(base.ppl, 4),
                  "ppl": round(q.ppl, 4), "ratio": round(q.ppl / base.ppl, 5)}
            stats["perplexity"] = ev
            result["perplexity"] = ev
        from runtime.records import QuantPass

        passes = earlier + [QuantPass(config=config.to_dict(), layers=layers, stats=stats)]
        manifest = Manifest(kind="checkpoint", architecture=architecture_from_config(lazy.config),
                            source=source_record(info), passes=passes, kv_cache=kv_record)
        if kv_record is not None:
            result["kv_cache"] = to_json(kv_record)
        manifest.record_files(tmp)
        manifest.save(tmp)
    result["bytes_on_disk"] = sum(f.size for f in manifest.files.values())
    result["weights_bytes"] = sum(f.size for n, f in manifest.files.items() if n.endswith(".safetensors"))
    if info.kind in ("hf", "checkpoint"):
        result["source_weights_bytes"] = sum(p.stat().st_size for p in info.weight_files())
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result
