"""Quantized checkpoint dirs (docs/FORMATS.md): the real low-precision tensors in model.safetensors, the
LayerSpecs in the kiln.json quantize passes; ``load_quantized`` rebuilds the exact fake-quant torch model."""
from __future__ import annotations

from pathlib import Path

import torch

from runtime.layerspec import LayerSpec
from runtime.records import QuantPass

from ..checkpoint import save_checkpoint
from ..errors import CompressError
from ..hfdir import check_config, quiet_transformers, read_tensor, state_for_saving
from . import primitives as P
from .api import STATE_ATTR, quant_state
from .modules import QuantLinear, is_tied, set_module

CODE_DTYPES = {"int8": torch.int8, "fp8": P.FP8, "int4": torch.uint8}


def _codes_to_store(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    return P.pack_int4(codes) if fmt == "int4" else codes.contiguous()


def quantized_tensors(model) -> dict:
    """The tensors to store: float ones as they are, quantized Linears as codes + scales (+ factors)."""
    state = state_for_saving(model)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            state[f"{name}.weight"] = _codes_to_store(m.codes, m.spec.weight)
            state[f"{name}.weight_scale"] = m.weight_scale.clone()
            if m.input_scale is not None:
                state[f"{name}.input_scale"] = m.input_scale.reshape(()).clone()
            if m.smooth_factor is not None:
                state[f"{name}.smooth_factor"] = m.smooth_factor.float().clone()
    head = quant_state(model)["lm_head"]
    if head is not None:  # tied: the embedding table holds the lm_head codes
        state["model.embed_tokens.weight"] = _codes_to_store(head["codes"], head["spec"].weight)
        state["model.embed_tokens.weight_scale"] = head["scale"].contiguous()
    return state


def save_quantized(model, tokenizer, out, *, source: dict, earlier_passes: list | None = None,
                   force: bool = False):
    """Write the quantized model as a checkpoint dir (atomically); passes = the earlier prune passes, then
    every quantize pass the model carries (read from its checkpoint, then made in this process)."""
    state = quant_state(model)
    if not state["passes"]:
        raise CompressError("the model is not quantized; call quantize_(model, config, calib=...) first")
    quant = [p if isinstance(p, QuantPass) else p.to_pass() for p in state["passes"]]
    passes = [p for p in (earlier_passes or []) if not isinstance(p, QuantPass)] + quant
    return save_checkpoint(model, tokenizer, out, source=source, passes=passes, force=force,
                           tensors=quantized_tensors(model))


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise CompressError(f"{where}: {msg}; the checkpoint is corrupt or from another tool — re-create it")


def read_codes(get, prefix: str, spec: LayerSpec, where: str):
    """(codes, scale) of quantized weight ``prefix`` (int4 unpacked), checked against ``spec``.
    ``get(name)`` returns a stored tensor or None."""
    stored, scale = get(f"{prefix}.weight"), get(f"{prefix}.weight_scale")
    for name, t in ((f"{prefix}.weight", stored), (f"{prefix}.weight_scale", scale)):
        if t is None:
            raise CompressError(f"{where}: tensor {name} is missing from the checkpoint; re-create it")
    scale = scale.float()
    dtype = CODE_DTYPES[spec.weight]
    _check(stored.dtype == dtype and stored.dim() == 2, where,
           f"{prefix}.weight has dtype {stored.dtype}, expected {dtype} [out, in]")
    codes = P.unpack_int4(stored) if spec.weight == "int4" else stored
    out, inn = codes.shape
    g = spec.group_size
    if g:
        _check(inn % g == 0 and tuple(scale.shape) == (out, inn // g), where,
               f"{prefix}: weight_scale shape {tuple(scale.shape)} does not match group_size {g}")
    else:
        _check(tuple(scale.shape) == (out,), where, f"{prefix}.weight_scale must be [{out}]")
    return codes, scale


def quant_linear_from(get, name: str, spec: LayerSpec, linear, where: str) -> QuantLinear:
    """The QuantLinear of Linear ``name`` (shaped like ``linear``) from its stored tensors."""
    codes, scale = read_codes(get, name, spec, where)
    _check(tuple(codes.shape) == (linear.out_features, linear.in_features), where, f"{name}: weight shape mismatch")
    inp = get(f"{name}.input_scale")
    _check((inp is not None) == spec.static_act, where, f"{name}: input_scale present iff static act")
    return QuantLinear(codes, scale, spec, inp, get(f"{name}.bias"), get(f"{name}.smooth_factor"))


def load_quantized(path, manifest):
    """(model, tokenizer) with QuantLinear modules reproducing the stored numerics (the whole model in memory;
    compress.lazy.LazyModel reads one layer at a time)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ..tensorfile import SafetensorsFiles, TensorFileError, checkpoint_files

    path = Path(path)
    layers = {n: s for n, s in manifest.layer_specs().items() if s.quantized}
    if not layers:
        raise CompressError(f"{path}/kiln.json: the quantize passes list no layers; re-create the checkpoint")
    check_config(path)
    try:
        files = SafetensorsFiles(checkpoint_files(path))
    except TensorFileError as e:
        raise CompressError(str(e)) from None
    with quiet_transformers():
        cfg = AutoConfig.from_pretrained(str(path))
        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise CompressError(f"{path}: no usable tokenizer ({str(e).splitlines()[0][:200]})") from None
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(path))
    where = str(path)
    tied = is_tied(model)
    head = None
    used = set()

    def get(name):
        if name not in files:
            return None
        used.add(name)
        return read_tensor(files, name)

    for name, spec in layers.items():
        if name == "lm_head" and tied:
            _check(spec.act is None, where, "the tied lm_head can only be weight-only")
            codes, scale = read_codes(get, "model.embed_tokens", spec, where)
            head = {"spec": spec, "codes": codes, "scale": scale}
            continue
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise CompressError(f"{where}: kiln.json names layer {name}, which this architecture lacks") from None
        set_module(model, name, quant_linear_from(get, name, spec, lin, where))
    state = {n: read_tensor(files, n) for n in files.keys() if n not in used}
    if head is not None:
        state["model.embed_tokens.weight"] = P.dequantize(head["codes"], head["scale"])
    quantized = {f"{n}.weight" for n in layers}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in quantized and not (tied and k == "lm_head.weight")]
    _check(not missing and not unexpected, where,
           f"tensors missing {missing[:3]} / unexpected {unexpected[:3]} in the safetensors files")
    if tied:
        model.tie_weights()
    model.eval()
    object.__setattr__(model, STATE_ATTR, {"passes": manifest.quant_passes(), "lm_head": head})
    return model, tok
