"""compress.load_model(source) -> (model, tokenizer, SourceInfo) for HF dirs, GGUF files, aliases and checkpoints.

A GGUF is de-quantized by transformers' GGUF loader once and the result is
cached as an ordinary safetensors checkpoint under the cache dir, keyed by the GGUF's sha256, so later loads
take a second or two. The conversion's ``source.json`` records every file's size and sha256 (and mtime);
on use each file is checked by size, and hashed again when its size or mtime moved: a cached conversion that
fails is converted again. The cache dirs must be the user's own and writable by nobody else
(``sources.check_cache_dir``).
"""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from runtime.fsutil import atomic_dir, atomic_write_text, sha256_file

from .errors import CompressError
from .hfdir import (SUPPORTED_ARCHITECTURES, architecture_from_config, check_config, check_safetensors,
                    quiet_transformers, state_for_saving, unsupported)
from .sources import ALIASES, SourceInfo, cache_path, check_cache_dir, resolve, reuse_cached

__all__ = ["load_model", "architecture_from_config", "cached_conversion", "gguf_sha256"]

def _load_hf_dir(path: Path, allow_pickle: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_config(path)
    files = sorted(path.glob("*.safetensors"))
    check_safetensors(files)
    with quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, use_safetensors=bool(files) or not allow_pickle,
                low_cpu_mem_usage=True,
            )
        except Exception as e:
            raise CompressError(f"{path}: could not load the weights ({str(e).splitlines()[0][:300]})") from None
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise CompressError(f"{path}: no usable tokenizer ({str(e).splitlines()[0][:200]})") from None
    model.eval()
    return model, tok


SOURCE_RECORD = "source.json"


def _gguf_cache(gguf: Path, sha: str) -> Path:
    return cache_path("converted") / sha[:16]


def _file_record(root: Path) -> dict:
    """{name: {size, sha256, mtime_ns}} of every file under root but the record itself."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != SOURCE_RECORD:
            st = p.stat()
            out[str(p.relative_to(root))] = {"size": st.st_size, "sha256": sha256_file(p), "mtime_ns": st.st_mtime_ns}
    return out


def _conversion_problem(out: Path, sha: str) -> str | None:
    """None when ``out`` is a usable conversion of the GGUF with sha256 ``sha``, else why not. Every recorded
    file is checked by size, and by sha256 when its size or mtime is not the recorded one (the record is then
    refreshed, so a copied cache is hashed once); no file may be missing, added or a symlink. A conversion an
    older llmkiln wrote (no file record) is hashed once and recorded."""
    check_cache_dir(out)
    try:
        rec = json.loads((out / SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {SOURCE_RECORD}"
    if not isinstance(rec, dict) or rec.get("sha256") != sha:
        return "made from another GGUF"
    files = rec.get("files")
    if files is None:  # written before the record existed: adopt it, in a dir only this user can write
        if not (out / "config.json").is_file():
            return "incomplete"
        rec["files"] = _file_record(out)
        atomic_write_text(out / SOURCE_RECORD, json.dumps(rec) + "\n", private=True)
        return None
    if not isinstance(files, dict) or "config.json" not in files:
        return f"{SOURCE_RECORD} has no file record"
    present = {str(p.relative_to(out)) for p in out.rglob("*")
               if p.name != SOURCE_RECORD and (p.is_symlink() or not p.is_dir())}
    if present != set(files):
        extra, missing = sorted(present - set(files)), sorted(set(files) - present)
        return f"files {'added: ' + ', '.join(extra[:3]) if extra else 'missing: ' + ', '.join(missing[:3])}"
    moved = False
    for name, meta in files.items():
        st = os.lstat(out / name)
        if not stat.S_ISREG(st.st_mode):
            return f"{name} is not a regular file"
        if st.st_size != meta.get("size"):
            return f"{name} has {st.st_size} bytes, {meta.get('size')} were written"
        if st.st_mtime_ns != meta.get("mtime_ns"):
            if sha256_file(out / name) != meta.get("sha256"):
                return f"{name}: sha256 differs from the one recorded when it was written"
            meta["mtime_ns"], moved = st.st_mtime_ns, True
    if moved:
        atomic_write_text(out / SOURCE_RECORD, json.dumps(rec) + "\n", private=True)
    return None


def gguf_sha256(info: SourceInfo) -> str:
    """The GGUF's sha256 (the alias's published one, else hashed once and kept in ``info.extra``)."""
    sha = info.extra.get("sha256") or (ALIASES[info.alias].file_sha256 if info.alias else sha256_file(info.path))
    info.extra["sha256"] = sha
    return sha


def cached_conversion(info: SourceInfo) -> Path | None:
    """The de-quantized safetensors dir of a GGUF source when it is already cached (recorded in
    ``info.extra["converted"]`` as load_model does), else None."""
    out = _gguf_cache(info.path, gguf_sha256(info))
    if not out.is_dir() or _conversion_problem(out, info.extra["sha256"]) is not None:
        return None
    info.extra["converted"] = str(out)
    return out


def _convert_gguf(gguf: Path, sha: str, quiet: bool) -> Path:
    """De-quantize a GGUF with transformers and cache it as a safetensors HF dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _gguf_cache(gguf, sha)
    if reuse_cached(out, lambda o: _conversion_problem(o, sha),
                    lambda why: f"the cached conversion {out} failed verification ({why}); converting again", quiet):
        return out
    try:
        from gguf import GGUFReader

        arch = GGUFReader(str(gguf)).fields["general.architecture"]
        arch = bytes(arch.parts[arch.data[0]]).decode()
    except Exception as e:
        raise CompressError(f"{gguf}: corrupt or truncated GGUF file ({str(e).splitlines()[0][:200]})") from None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise unsupported(arch, f"{gguf}: ")
    if not quiet:
        print(f"llmkiln: converting {gguf.name} to float32 safetensors (once; cached in {out})",
              file=sys.stderr, flush=True)
    with quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as e:
            raise CompressError(f"{gguf}: could not load the GGUF ({str(e).splitlines()[0][:300]})") from None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    from safetensors.torch import save_file

    with atomic_dir(out, force=True, private=True) as tmp:
        save_file(state_for_saving(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(str(tmp))
        model.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        record = {"gguf": str(gguf), "sha256": sha, "files": _file_record(tmp)}
        (tmp / SOURCE_RECORD).write_text(json.dumps(record) + "\n")
    return out


def hf_dir_of_gguf(info: SourceInfo, quiet: bool = False) -> Path:
    """The de-quantized safetensors dir of a GGUF source (converted and cached on first use)."""
    conv = _convert_gguf(info.path, gguf_sha256(info), quiet)
    info.extra["converted"] = str(conv)
    return conv


def load_model(source: str | SourceInfo, allow_pickle: bool = False, quiet: bool = False):
    """Load a model for the PyTorch stages.

    Returns (model, tokenizer, SourceInfo). ``source`` is an alias (``smollm2-135m``), a ``.gguf`` file,
    a Hugging Face checkpoint dir (safetensors; pickle only with ``allow_pickle``), or an llmkiln
    checkpoint dir (kiln.json kind "checkpoint", possibly quantized: rebuilt with exact fake-quant numerics).
    """
    info = source if isinstance(source, SourceInfo) else resolve(source, allow_pickle=allow_pickle, quiet=quiet)
    if info.kind == "gguf":
        conv = _convert_gguf(info.path, gguf_sha256(info), quiet)
        model, tok = _load_hf_dir(conv)
        info.extra["converted"] = str(conv)
        return model, tok, info
    if info.kind == "checkpoint" and info.manifest.quantized:
        from .quant.checkpoint import load_quantized

        model, tok = load_quantized(info.path, info.manifest)
        return model, tok, info
    model, tok = _load_hf_dir(info.path, allow_pickle=info.allow_pickle)
    return model, tok, info
