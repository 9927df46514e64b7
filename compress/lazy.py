"""A checkpoint read one decoder layer at a time: ``LazyModel(path)``.

The module tree is built on torch's ``meta`` device (no memory); a decoder layer gets real float32 weights
only while it is processed (``layer(i)`` ... ``release(i)``). The embedding is looked up row by row from the
file (``LazyEmbedding``), so capturing the first layer's calibration inputs reads a few thousand rows, never
the table. Quantized llmkiln checkpoints come back with their ``QuantLinear`` modules (exact fake-quant
numerics), like ``load_model``. Peak memory is one layer in float32 plus what the caller keeps.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CompressError
from .hfdir import check_config, quiet_transformers, read_tensor
from .tensorfile import SafetensorsFiles, TensorFileError, checkpoint_files

EMBED = "model.embed_tokens.weight"


class LazyEmbedding(nn.Module):
    """nn.Embedding whose rows are read from the checkpoint file when looked up (float32)."""

    def __init__(self, files: SafetensorsFiles, name: str, rows_of=None):
        super().__init__()
        self.files, self.name = files, name
        self.rows_of = rows_of  # ids -> float32 rows [n, H]; None: read the stored float rows
        self.num_embeddings, self.embedding_dim = files.shape(name)[0], files.shape(name)[-1]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        uniq, inv = torch.unique(ids.reshape(-1), return_inverse=True)
        if self.rows_of is not None:
            rows = self.rows_of(uniq.tolist())
        else:
            rows = torch.from_numpy(np.stack([self.files.get(self.name, rows=slice(r, r + 1))[0].astype(np.float32)
                                              for r in uniq.tolist()]))
        return rows[inv].reshape(*ids.shape, -1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids)


class LazyModel:
    """``path``: an HF-format dir (single or sharded safetensors) or an llmkiln checkpoint, float or quantized.
    ``specs``: the quantized Linears' LayerSpecs (``manifest.layer_specs()``), {} for a float model."""

    def __init__(self, path: str | Path, specs: dict | None = None, device: str = "cpu"):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.root = Path(path)
        check_config(self.root)
        try:
            files = checkpoint_files(self.root)
            if not files:
                raise CompressError(f"{self.root}: no *.safetensors weights")
            self.files = SafetensorsFiles(files)
        except TensorFileError as e:
            raise CompressError(str(e)) from None
        self.specs = {n: s for n, s in (specs or {}).items() if s.quantized}
        self.device = torch.device(device)
        with quiet_transformers():
            self.config = AutoConfig.from_pretrained(str(self.root))
            with torch.device("meta"):
                self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        inner = self.skeleton.model
        inner.rotary_emb = type(inner.rotary_emb)(config=self.config)  # real inv_freq buffers (tiny)
        head = self.specs.get("lm_head")
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        rows_of = self._quantized_rows if (tied and head is not None) else None
        inner.embed_tokens = LazyEmbedding(self.files, EMBED, rows_of)
        self.num_layers = len(inner.layers)
        self.linear_names = [n for n, m in inner.layers[0].named_modules() if isinstance(m, nn.Linear)]
        self.versions: dict[int, dict[str, int]] = {}  # per loaded layer: tensor -> version after loading

    # ---- tensors --------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.files

    def raw(self, name: str) -> tuple[np.ndarray, str]:
        """(stored bytes as numpy, safetensors dtype name): bf16 as uint16, fp8 as uint8."""
        return self.files.get(name, raw=True), self.files.dtype(name)

    def tensor(self, name: str) -> torch.Tensor | None:
        """A float tensor as float32, or codes in their stored dtype (int8, uint8, float8); None if absent."""
        return read_tensor(self.files, name) if name in self.files else None

    def _quantized_rows(self, ids: list[int]) -> torch.Tensor:
        """Rows of a tied, quantized embedding table, dequantized exactly as the fake-quant model holds them."""
        from .quant import primitives as P

        spec = self.specs["lm_head"]
        out = []
        for r in ids:
            codes = torch.from_numpy(self.files.get(EMBED, rows=slice(r, r + 1)))
            scale = torch.from_numpy(self.files.get(f"{EMBED.rsplit('.', 1)[0]}.weight_scale", rows=slice(r, r + 1)))
            if spec.weight == "int4":
                codes = P.unpack_int4(codes)
            if spec.weight == "fp8":
                codes = codes.view(torch.float8_e4m3fn)
            out.append(P.dequantize(codes, scale.float().reshape(1, -1) if scale.dim() == 2 else scale.float()))
        return torch.cat(out)

    # ---- layers ---------------------------------------------------------------------------------------
    def layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` with its weights (QuantLinear where the checkpoint is quantized), on the device."""
        from .quant.checkpoint import quant_linear_from

        layer = self.skeleton.model.layers[i]
        layer.to_empty(device=self.device)
        prefix = f"model.layers.{i}."
        quant = {n[len(prefix):]: s for n, s in self.specs.items() if n.startswith(prefix)}
        for rel, spec in quant.items():
            q = quant_linear_from(self.tensor, prefix + rel, spec, layer.get_submodule(rel), str(self.root))
            _set(layer, rel, q.to(self.device))
        state = {}
        for name, p in list(layer.named_parameters()) + list(layer.named_buffers()):
            if any(name.startswith(r + ".") for r in quant):
                continue
            full = prefix + name
            if full not in self.files:
                if name.endswith("bias"):
                    continue
                raise CompressError(f"{self.root}: tensor {full} is missing; the checkpoint is incomplete")
            t = self.tensor(full)
            if tuple(t.shape) != tuple(p.shape):
                raise CompressError(f"{self.root}: tensor {full} has shape {list(t.shape)}, expected "
                                    f"{list(p.shape)} from config.json")
            state[name] = t
        layer.load_state_dict(state, strict=False, assign=False)
        layer.eval()
        self.versions[i] = {n: version_of(layer, n) for n in layer.state_dict()}
        return layer

    def release(self, i: int) -> None:
        """Drop layer ``i``'s weights (back to meta)."""
        from .memory import give_back

        layer = self.skeleton.model.layers[i]
        self.skeleton.model.layers[i] = layer.to("meta")
        self.versions.pop(i, None)
        give_back()

    def norm(self) -> nn.Module:
        norm = self.skeleton.model.norm.to_empty(device=self.device)
        norm.weight.data.copy_(self.tensor("model.norm.weight"))
        return norm

    def head_rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi of the lm_head weight [V, H] as float32 (the tied embedding's, dequantized if quantized)."""
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        if tied and "lm_head" in self.specs:
            return self._quantized_rows(list(range(lo, hi)))
        name = EMBED if tied or "lm_head.weight" not in self.files else "lm_head.weight"
        if "lm_head" in self.specs and not tied:
            from .quant import primitives as P

            codes = torch.from_numpy(self.files.get("lm_head.weight", rows=slice(lo, hi)))
            scale = torch.from_numpy(self.files.get("lm_head.weight_scale", rows=slice(lo, hi))).float()
            spec = self.specs["lm_head"]
            codes = P.unpack_int4(codes) if spec.weight == "int4" else codes
            return P.dequantize(codes.view(torch.float8_e4m3fn) if spec.weight == "fp8" else codes, scale)
        return torch.from_numpy(self.files.get(name, rows=slice(lo, hi)).astype(np.float32))

    def capture(self, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
        """(hidden [1, S, H], kwargs) as decoder layer 0 receives them, one per calibration window."""
        from .calib import forward_loop
        from .quant.calibrate import capture_layer_inputs

        return capture_layer_inputs(self.skeleton, forward_loop(batches))


def tensor_of(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def version_of(module: nn.Module, name: str) -> int | None:
    """The in-place modification counter of a module tensor (None for inference-mode tensors, which have none)."""
    try:
        return tensor_of(module, name)._version
    except RuntimeError:
        return None


def _set(parent: nn.Module, name: str, new: nn.Module) -> None:
    owner, _, child = name.rpartition(".")
    setattr(parent.get_submodule(owner) if owner else parent, child, new)
