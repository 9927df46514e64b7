"""Pure tensor primitives: scale choice, rounding, saturation, packing. No modules, no I/O.

Every function here is the exact numerics of docs/FORMATS.md (what the ONNX QDQ graph computes):
round half to even (``torch.round``), symmetric codes, E4M3FN saturating at +-448.
"""
from __future__ import annotations

import torch

INT8_MAX = 127.0  # weight codes and dynamic activations use [-127, 127]
INT4_MIN, INT4_MAX = -8.0, 7.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8 = torch.float8_e4m3fn


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """A zero scale (an all-zero row or group) becomes 1, so codes are 0 and nothing divides by zero."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


# ---- weights -----------------------------------------------------------------------------------------------
def int8_weight_scale(w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per output channel scale for symmetric INT8: max|w_row| * clip / 127.  w: [out, in] -> [out]."""
    return _safe(w.abs().amax(dim=1).float() * clip / INT8_MAX)


def int8_group_scale(w: torch.Tensor, group: int) -> torch.Tensor:
    """Per (row, group of inputs) scale for symmetric INT8: max|w_group| / 127.  w: [out, in] -> [out, in/group]."""
    out, inn = w.shape
    return _safe(w.float().reshape(out, inn // group, group).abs().amax(dim=2) / INT8_MAX)


def quantize_int8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes int8 [out, in] = clamp(round(w / s), -127, 127); s per row [out] or per group [out, in/group]."""
    w = w.float()
    if scale.dim() == 2:
        out, inn = w.shape
        q = torch.round(w.reshape(out, scale.shape[1], -1) / scale[:, :, None]).reshape(out, inn)
    else:
        q = torch.round(w / scale[:, None])
    return torch.clamp(q, -INT8_MAX, INT8_MAX).to(torch.int8)


def fp8_weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Per output channel scale for E4M3: max|w_row| / 448.  w: [out, in] -> [out]."""
    return _safe(w.abs().amax(dim=1).float() / FP8_MAX)


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Saturating cast to float8_e4m3fn (round to nearest even, clamp to +-448 first)."""
    return torch.clamp(x.float(), -FP8_MAX, FP8_MAX).to(FP8)


def quantize_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes float8_e4m3fn [out, in] = e4m3(clamp(w / scale[:, None], -448, 448))."""
    return to_fp8(w.float() / scale[:, None])


def group_size_for(in_features: int, preferred: int = 128) -> int:
    """The largest of preferred/64/32 (not above ``preferred``) dividing the input dim."""
    for g in (128, 64, 32):
        if g <= preferred and in_features % g == 0:
            return g
    raise ValueError(f"input dim {in_features} is not a multiple of 32; grouped weight scales need that")


def int4_scale(w: torch.Tensor, group: int, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per group symmetric scale, zero point 0: max|w_group| * clip / 7 (codes in [-8, 7]).  -> [out, in/group]."""
    out, inn = w.shape
    amax = w.float().reshape(out, inn // group, group).abs().amax(dim=2)
    return _safe(amax * clip / INT4_MAX)


def quantize_int4(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes int8 [out, in] in [-8, 7] = clamp(round(w / scale_group), -8, 7).  scale: [out, in/group]."""
    out, inn = w.shape
    group = inn // scale.shape[1]
    q = torch.round(w.float().reshape(out, -1, group) / scale[:, :, None])
    return torch.clamp(q, INT4_MIN, INT4_MAX).reshape(out, inn).to(torch.int8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] int8 in [-8, 7] -> [out, in/2] uint8: element 2j in the low nibble, 2j+1 in the high one."""
    u = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out, in/2] uint8 -> [out, in] int8 in [-8, 7] (two's complement nibbles)."""
    lo = (packed & 0xF).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    both = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 weight from codes (int8, int4-as-int8 or fp8) and per-channel [out] / per-group [out, G] scales."""
    c = codes.float()
    if scale.dim() == 1:
        return c * scale[:, None]
    out, inn = c.shape
    g = inn // scale.shape[1]
    return (c.reshape(out, -1, g) * scale[:, :, None]).reshape(out, inn)


# ---- activations ------------------------------------------------------------------------------------------
def fake_quant_int8_static(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """clamp(round(x / s), -128, 127) * s, per tensor."""
    return torch.clamp(torch.round(x / s), -128.0, 127.0) * s


def fake_quant_fp8_static(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """e4m3(clamp(x / s, -448, 448)) * s, per tensor."""
    return to_fp8(x / s).float() * s


def dynamic_token_scale(x: torch.Tensor) -> torch.Tensor:
    """Per token (last dim reduced) s_t = max|x_t| / 127; an all-zero token gets s_t = 1.  x: [..., in] -> [..., 1]."""
    return _safe(x.abs().amax(dim=-1, keepdim=True) / INT8_MAX)


def fake_quant_int8_dynamic(x: torch.Tensor) -> torch.Tensor:
    """Per token round(x / s_t) * s_t (codes stay within [-127, 127] by construction)."""
    s = dynamic_token_scale(x)
    return torch.round(x / s) * s


def fake_quant_int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """What ONNX Runtime's fast weight-only CPU kernel (MatMulNBits, accuracy level 4) does to its input:
    each row's inputs in blocks of ``block``, codes round-half-even(x * 127 / amax), dequantized with the float32
    scale amax / 127 (an all-zero block stays zero). x [..., in] with ``in`` divisible by ``block``."""
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], shape[-1] // block, block)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 127.0)).reshape(shape)


ACT_FAKE_QUANT = {"int8": fake_quant_int8_static, "fp8": fake_quant_fp8_static}


def static_scale(amax: torch.Tensor | float, act: str) -> torch.Tensor:
    """Per-tensor static scale mapping ``amax`` onto the top code (127 for int8, 448 for fp8)."""
    top = INT8_MAX if act == "int8" else FP8_MAX
    a = torch.as_tensor(amax, dtype=torch.float32)
    return _safe(a / top)


def pick_lowest_error(candidates):
    """Element-wise choice among (scale, error) pairs of equal shapes: the scale whose error is lowest
    (the first candidate wins ties)."""
    best_s = best_e = None
    for s, e in candidates:
        if best_e is None:
            best_s, best_e = s, e
        else:
            better = e < best_e
            best_s, best_e = torch.where(better, s, best_s), torch.where(better, e, best_e)
    return best_s
