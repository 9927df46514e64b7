"""Leaf helpers for Hugging Face checkpoint dirs: which architectures llmkiln takes, the manifest's
architecture block from a config, config.json and safetensors checks, and the state dict as it is saved.
Imports nothing else of compress but its error type, so loading and saving can both use it."""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

from runtime.manifest import Architecture

from .errors import CompressError

SUPPORTED_ARCHITECTURES = ("llama",)
# Llama-like in their configs, but nothing here handles Mistral's sliding-window attention or Qwen2's
# per-layer window switches, so they are refused rather than exported wrongly.
REFUSED = {"mistral": "sliding-window attention", "qwen2": "sliding-window attention and q/k/v biases"}


def unsupported(mt, where: str = "") -> CompressError:
    why = f" (llmkiln does not handle its {REFUSED[mt]} yet)" if mt in REFUSED else ""
    return CompressError(f"{where}unsupported architecture {mt!r}{why}; llmkiln supports Llama-style decoders "
                         f"(model_type: {', '.join(SUPPORTED_ARCHITECTURES)})")


def architecture_from_config(config) -> Architecture:
    """The manifest's architecture block from a transformers config (v4 and v5 rope fields)."""
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_ARCHITECTURES:
        raise unsupported(mt)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    scaling = getattr(config, "rope_scaling", None)
    if rope and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    heads = config.num_attention_heads
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return Architecture(
        model_type=mt,
        layers=config.num_hidden_layers,
        hidden=hidden,
        intermediate=config.intermediate_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        max_position=config.max_position_embeddings,
        rope_theta=float(theta),
        rms_eps=float(config.rms_norm_eps),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope_scaling=dict(scaling) if scaling else None,
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=getattr(config, "eos_token_id", None),
        hidden_act=getattr(config, "hidden_act", "silu"),
    )


def check_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CompressError(f"{path}/config.json: unreadable ({e})") from None
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_ARCHITECTURES:
        raise unsupported(mt, f"{path}: ")
    return cfg


def check_safetensors(files: list[Path]) -> None:
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                keys = list(h.keys())
                if keys:  # touching one tensor catches truncation of the data section
                    h.get_slice(keys[-1])[...]
        except Exception as e:
            raise CompressError(f"{f}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None



def state_for_saving(model) -> dict:
    """The model's tensors, contiguous, with a tied lm_head stored once (as the embedding)."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


@contextlib.contextmanager
def quiet_transformers():
    """Inside: no per-tensor progress bars, warnings or info logs from transformers (its rope and loading
    chatter); outside, its settings as they were. llmkiln shows its own per-layer progress."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def read_tensor(files, name: str):
    """Tensor ``name`` of a compress.tensorfile.SafetensorsFiles as torch: floats as float32, codes in their
    stored dtype (int8, uint8, float8_e4m3fn)."""
    import torch

    dt = files.dtype(name)
    arr = files.get(name, raw=dt == "F8_E4M3")
    if dt == "F8_E4M3":
        return torch.from_numpy(arr).view(torch.float8_e4m3fn)
    t = torch.from_numpy(arr)
    return t.float() if t.is_floating_point() else t
