"""Read the tensors a graph needs, one at a time, from a loaded model or a checkpoint's safetensors.

Every read checks presence and shape and names the tensor when it is wrong. Quantized checkpoints
(docs/FORMATS.md) are read from ``model.safetensors`` directly so the graph gets the real codes and scales,
never the fake-quant floats.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.layerspec import LayerSpec

from ..errors import ExportError



def to_numpy(t) -> np.ndarray:
    """A torch tensor (any dtype, incl. float8) or array as numpy; float8 comes back as its raw uint8 bytes."""
    if isinstance(t, np.ndarray):
        return t
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy()


class Weights:
    """``get(name, shape)`` -> numpy array; ``spec(module)`` -> the LayerSpec of a quantized Linear or None."""

    def __init__(self, source_desc: str, tensors, specs: dict[str, LayerSpec] | None = None):
        self.desc = source_desc
        self._t = tensors  # mapping-like: name -> torch tensor (state_dict or a safetensors handle wrapper)
        self.layers = {n: s for n, s in (specs or {}).items() if s.quantized}

    def has(self, name: str) -> bool:
        return name in self._t

    def get(self, name: str, shape: tuple | None = None, raw: bool = False) -> np.ndarray:
        if name not in self._t:
            raise ExportError(f"{self.desc}: tensor {name} is missing; the checkpoint is incomplete")
        arr = to_numpy(self._t[name])
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise ExportError(
                f"{self.desc}: tensor {name} has shape {list(arr.shape)}, expected {list(shape)} "
                "from the architecture; the checkpoint is inconsistent"
            )
        if not raw and arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        return arr

    def spec(self, module: str) -> LayerSpec | None:
        return self.layers.get(module)


def _float_linears(arch) -> dict:
    """Every Linear the graph reads: module -> (out, in)."""
    H, I, hd = arch.hidden, arch.intermediate, arch.head_dim
    mods = {}
    for i in range(arch.layers):
        p = f"model.layers.{i}"
        mods |= {f"{p}.self_attn.q_proj": (arch.heads * hd, H), f"{p}.self_attn.k_proj": (arch.kv_heads * hd, H),
                 f"{p}.self_attn.v_proj": (arch.kv_heads * hd, H), f"{p}.self_attn.o_proj": (H, arch.heads * hd),
                 f"{p}.mlp.gate_proj": (I, H), f"{p}.mlp.up_proj": (I, H), f"{p}.mlp.down_proj": (H, I)}
    return mods


def expected_shapes(arch, layers: dict[str, LayerSpec] | None) -> dict:
    """name -> shape of every tensor the graph reads (docs/FORMATS.md layouts for quantized modules)."""
    layers = layers or {}
    V, H = arch.vocab, arch.hidden
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(arch.layers):
        for n in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"model.layers.{i}.{n}.weight"] = (H,)
    mods = _float_linears(arch)
    if not arch.tied_embeddings:
        mods["lm_head"] = (V, H)
    for mod, (o, i) in mods.items():
        spec = layers.get(mod)
        if spec is None or not spec.quantized:
            shapes[f"{mod}.weight"] = (o, i)
        else:
            shapes |= _quant_shapes(mod, spec, o, i)
    head = layers.get("lm_head")
    if arch.tied_embeddings and head is not None and head.quantized:
        shapes |= _quant_shapes("model.embed_tokens", head, V, H)
    return shapes


def _quant_shapes(mod: str, spec: LayerSpec, o: int, i: int) -> dict:
    """Stored shapes of a quantized weight [o, i] (docs/FORMATS.md): int4 packs two codes per byte."""
    g = spec.group_size
    return {f"{mod}.weight": (o, i // 2) if spec.weight == "int4" else (o, i),
            f"{mod}.weight_scale": (o, i // g) if g else (o,)}


def precheck(info) -> None:
    """Before any model is loaded: every tensor the graph needs is in the safetensors files with its shape.
    (Transformers would silently re-initialize a missing tensor and reports a wrong shape without its name.)"""
    if info.kind not in ("hf", "checkpoint"):
        return
    from compress.tensorfile import SafetensorsFiles, TensorFileError, checkpoint_files

    try:
        files = checkpoint_files(Path(info.path))
    except TensorFileError as e:
        raise ExportError(str(e)) from None
    if not files:
        return
    try:
        from .direct import arch_of

        arch = arch_of(Path(info.path))
    except ExportError:
        raise
    except Exception:
        return  # the loader reports an unreadable config in its own words
    specs = info.manifest.layer_specs() if info.manifest is not None else {}
    try:
        st = SafetensorsFiles(files)
    except TensorFileError as e:
        raise ExportError(str(e)) from None
    have = {k: st.shape(k) for k in st.keys()}
    for name, shape in expected_shapes(arch, specs).items():
        if name not in have:
            raise ExportError(f"{info.path}: tensor {name} is missing from the safetensors files; "
                              "the checkpoint is incomplete")
        if have[name] != tuple(shape):
            raise ExportError(f"{info.path}: tensor {name} has shape {list(have[name])}, expected {list(shape)} "
                              "from config.json; the checkpoint is inconsistent")


def weights_for(model, info) -> Weights:
    """Weights of a loaded model: a quantized checkpoint reads its safetensors, anything else the state dict."""
    desc = str(info.path) if info is not None else "model"
    m = info.manifest if info is not None else None
    if m is not None and m.quantized:
        from compress.tensorfile import SafetensorsFiles, checkpoint_files

        files = checkpoint_files(Path(info.path))
        if not files:
            raise ExportError(f"{desc}: no *.safetensors in the checkpoint")
        return Weights(desc, SafetensorsFiles(files), m.layer_specs())
    state = model.state_dict()
    return Weights(desc, state)
