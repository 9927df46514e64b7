"""Random Llama checkpoints with real shapes, written as a Hub-style bf16 sharded safetensors dir.

Streams: every tensor is generated in row chunks (numpy, seeded per tensor) and written straight into its
shard, so building needs a few tens of MB whatever the model size. numpy only (no torch): the builder's
own peak RSS is part of what benchmarks/scale.py reports.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

LINEAR_STD = 0.02  # keeps activations finite through 32 layers (residual grows ~ sqrt(L))
CHUNK_BYTES = 32 << 20  # float32 bytes generated at a time
DEFAULT_SHARD_BYTES = 2 * 10**9
MARKER = "scale_build.json"


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    rope_factor: float  # Llama-3 rope_scaling factor

    def tensors(self) -> list[tuple[str, tuple[int, int] | tuple[int], str]]:
        """(name, shape, init) in the order HF writes them; init is 'normal' or 'ones'."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        out = [("model.embed_tokens.weight", (self.vocab, h), "normal")]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "input_layernorm.weight", (h,), "ones"),
                    (p + "self_attn.q_proj.weight", (q, h), "normal"),
                    (p + "self_attn.k_proj.weight", (kv, h), "normal"),
                    (p + "self_attn.v_proj.weight", (kv, h), "normal"),
                    (p + "self_attn.o_proj.weight", (h, q), "normal"),
                    (p + "post_attention_layernorm.weight", (h,), "ones"),
                    (p + "mlp.gate_proj.weight", (i, h), "normal"),
                    (p + "mlp.up_proj.weight", (i, h), "normal"),
                    (p + "mlp.down_proj.weight", (h, i), "normal")]
        out.append(("model.norm.weight", (h,), "ones"))
        if not self.tied:
            out.append(("lm_head.weight", (self.vocab, h), "normal"))
        return out

    @property
    def params(self) -> int:
        return sum(int(np.prod(s)) for _, s, _ in self.tensors())

    def decoder_linears(self) -> list[tuple[int, int]]:
        """(in_features, out_features) of every decoder-layer Linear (what quantize / GPTQ processes)."""
        return [(s[1], s[0]) for n, s, _ in self.tensors() if n.startswith("model.layers.") and len(s) == 2]

    @property
    def linear_params(self) -> int:
        return sum(i * o for i, o in self.decoder_linears())

    @property
    def gptq_work(self) -> int:
        """sum over decoder Linears of in^2 * out = linear parameters x their parameter-weighted mean input dim."""
        return sum(i * i * o for i, o in self.decoder_linears())

    def config(self) -> dict:
        """config.json as Llama-3.x repos on the Hub write it (top-level rope_theta + rope_scaling)."""
        return {
            "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 1, "eos_token_id": 2,  # the tokenizer's (SmolLM2's) ids
            "head_dim": self.head_dim, "hidden_act": "silu", "hidden_size": self.hidden,
            "initializer_range": LINEAR_STD, "intermediate_size": self.intermediate,
            "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
            "num_attention_heads": self.heads, "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": self.rope_factor, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": self.tied, "torch_dtype": "bfloat16",
            "use_cache": True, "vocab_size": self.vocab,
        }


SHAPES = {
    "tiny": Shape("tiny", 2, 64, 128, 4, 2, 16, 49152, True, 32.0),
    "1b": Shape("1b", 16, 2048, 8192, 32, 8, 64, 128256, True, 32.0),     # Llama-3.2-1B
    "3b": Shape("3b", 28, 3072, 8192, 24, 8, 128, 128256, True, 32.0),    # Llama-3.2-3B
    "8b": Shape("8b", 32, 4096, 14336, 32, 8, 128, 128256, False, 8.0),   # Llama-3.1-8B
}
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.9}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def find_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer from llmkiln's converted-model cache (`kiln info smollm2-135m` fills it)."""
    cache = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "llmkiln"))
    for tj in sorted(glob.glob(str(cache / "converted" / "*" / "tokenizer.json"))):
        d = Path(tj).parent
        try:
            if json.loads((d / "config.json").read_text()).get("vocab_size") == 49152:
                return d
        except (OSError, ValueError):
            continue
    raise SystemExit(f"no SmolLM2 tokenizer under {cache}/converted/*/: run `kiln info smollm2-135m` once, "
                     "or pass --tokenizer DIR (any dir with a tokenizer.json)")


def _seed(seed: int, name: str) -> list[int]:
    return [seed, zlib.crc32(name.encode())]


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (inputs are finite)."""
    u = x.view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def tensor_chunks(name: str, shape: tuple, init: str, seed: int):
    """bf16 bytes of one tensor, in row chunks of at most CHUNK_BYTES of float32 work."""
    if init == "ones":
        yield np.full(shape, 0x3F80, dtype=np.uint16).tobytes()  # 1.0 in bf16
        return
    rng = np.random.default_rng(_seed(seed, name))
    rows, cols = shape
    step = max(1, CHUNK_BYTES // (4 * cols))
    for r in range(0, rows, step):
        x = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32)
        x *= LINEAR_STD
        yield bf16_bits(x).tobytes()


def plan_shards(tensors: list, shard_bytes: int) -> list[list]:
    shards, cur, size = [], [], 0
    for t in tensors:
        nbytes = 2 * int(np.prod(t[1]))
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def safetensors_header(tensors: list) -> bytes:
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in tensors:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors' own writer does
    return struct.pack("<Q", len(raw)) + raw


def is_complete(out: Path, shape: Shape, seed: int) -> bool:
    try:
        m = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if m.get("shape") != asdict(shape) or m.get("seed") != seed:
        return False
    return all((out / f).is_file() and (out / f).stat().st_size == n for f, n in m["files"].items())


def build(shape: Shape, out: Path, seed: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES,
          tokenizer_dir: Path | None = None, log=print) -> Path:
    """Write the model dir at ``out`` (atomically: built in a sibling, then renamed); reuse a complete one."""
    out = Path(out)
    if is_complete(out, shape, seed):
        log(f"[build {shape.name}] reusing {out}")
        return out
    if out.exists():
        shutil.rmtree(out)
    tok = Path(tokenizer_dir) if tokenizer_dir else find_tokenizer_dir()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = shape.tensors()
    shards = plan_shards(tensors, shard_bytes)
    total = sum(2 * int(np.prod(s)) for _, s, _ in tensors)
    log(f"[build {shape.name}] {shape.params / 1e9:.3f}B parameters, {total / 1e9:.2f} GB bf16 in "
        f"{len(shards)} shard(s) -> {out}")
    t0, done, weight_map, files = time.perf_counter(), 0, {}, {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        with open(tmp / fname, "wb") as f:
            f.write(safetensors_header(shard))
            for name, s, init in shard:
                f.writelines(tensor_chunks(name, s, init, seed))
                weight_map[name] = fname
                done += 2 * int(np.prod(s))
                if name.endswith(("down_proj.weight", "embed_tokens.weight")) or name == shard[-1][0]:
                    el = time.perf_counter() - t0
                    log(f"[build {shape.name}] shard {k}/{len(shards)} {name.rsplit('.', 1)[0]}: "
                        f"{done / 1e9:.2f}/{total / 1e9:.2f} GB, {el:.0f}s, "
                        f"eta {el / done * (total - done):.0f}s")
            f.flush()
            os.fsync(f.fileno())
        files[fname] = (tmp / fname).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        if (tok / f).is_file():
            shutil.copy(tok / f, tmp / f)
    if not (tmp / "tokenizer.json").is_file():
        raise SystemExit(f"{tok}: no tokenizer.json")
    for f in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        files[f] = (tmp / f).stat().st_size
    (tmp / MARKER).write_text(json.dumps({"shape": asdict(shape), "seed": seed, "shard_bytes": shard_bytes,
                                          "files": files}, indent=1) + "\n")
    os.replace(tmp, out)
    log(f"[build {shape.name}] done in {time.perf_counter() - t0:.0f}s")
    return out
