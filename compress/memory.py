"""How much memory there is, and how much a whole-model step would need: the numbers the one-line refusals
and ``--max-memory`` budgets use."""
from __future__ import annotations


def available_bytes() -> int:
    """MemAvailable (runtime.sysinfo), else a large number (no limit known)."""
    from runtime.sysinfo import mem_available

    avail = mem_available()
    return avail if avail is not None else 1 << 50


def parameter_count(config) -> int:
    """Parameters of a Llama-style decoder from its config (embedding, layers, norms, untied lm_head)."""
    h, i, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or h // heads
    layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * i + 2 * h
    head = 0 if getattr(config, "tie_word_embeddings", False) else v * h
    return v * h + n * layer + h + head


def gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def give_back() -> None:
    """Return freed heap memory to the system (glibc's malloc_trim). Layer-by-layer work frees a layer's
    tensors after each layer, but glibc keeps the freed smaller blocks in its arenas, so the resident size
    would creep up by tens of MB a layer; no-op where there is no glibc."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None
