"""Read and write safetensors files one tensor at a time, with plain file reads (no torch, no mmap).

safetensors' own readers memory-map the file: every page a big model's read touches then counts in the
process's resident memory until the map closes, so streaming a 16 GB checkpoint layer by layer would still
show 16 GB resident. Here each tensor is read with one positioned read into memory that is freed when the
caller drops it. The format is the one safetensors writes (an 8-byte little-endian header length, a JSON
header of dtype / shape / data_offsets, then the bytes); the writer pads the header with spaces, which the
format allows, so shards can be written layer by layer without holding them in memory.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

# stored dtype -> numpy dtype of the raw bytes (BF16 as uint16 and float8 as uint8: numpy has neither)
RAW = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "F8_E4M3": np.uint8}
INDEX = "model.safetensors.index.json"


class TensorFileError(ValueError):
    """A safetensors file or index that cannot be read; the message names the file."""


def _header(path: Path) -> tuple[int, dict]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise TensorFileError(f"{path}: corrupt or truncated safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise TensorFileError(f"{path}: corrupt or truncated safetensors file (header length {n})")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TensorFileError(f"{path}: corrupt or truncated safetensors file (header: {e})") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: corrupt or truncated safetensors file (header is not an object)")
    return 8 + n, header


class SafetensorsFiles:
    """name -> numpy array read from the files on demand. ``get(name, raw=True)`` keeps BF16 as its uint16
    bits and FP8 as its bytes; otherwise BF16 is widened to float32."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, tuple] = {}
        for f in files:
            start, header = _header(Path(f))
            header.pop("__metadata__", None)
            data = Path(f).stat().st_size - start
            for name, meta in header.items():
                try:
                    dt, shape, (a, b) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
                except (KeyError, TypeError, ValueError):
                    raise TensorFileError(f"{f}: corrupt or truncated safetensors file (header entry for {name})") \
                        from None
                if dt not in RAW:
                    raise TensorFileError(f"{f}: {name} has dtype {dt}, which llmkiln does not read")
                if not 0 <= a <= b <= data or (b - a) != int(np.prod(shape)) * np.dtype(RAW[dt]).itemsize:
                    raise TensorFileError(f"{f}: corrupt or truncated safetensors file ({name} lies outside the "
                                          "file or has the wrong size)")
                if name in self._where:
                    raise TensorFileError(f"{f}: {name} is also in {self._where[name][0].name}")
                self._where[name] = (Path(f), start + a, b - a, dt, shape)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self):
        return self._where.keys()

    def shape(self, name: str) -> tuple:
        return self._where[name][4]

    def dtype(self, name: str) -> str:
        return self._where[name][3]

    def file_of(self, name: str) -> Path:
        return self._where[name][0]

    def nbytes(self, name: str) -> int:
        return self._where[name][2]

    def get(self, name: str, raw: bool = False, rows: slice | None = None) -> np.ndarray:
        """The tensor (or rows ``rows`` of a 2-D one) as a numpy array of its own memory."""
        path, off, n, dt, shape = self._where[name]
        if rows is not None:
            row = n // shape[0]
            lo, hi, _ = rows.indices(shape[0])
            off, n, shape = off + lo * row, (hi - lo) * row, (hi - lo,) + shape[1:]
        if dt == "BF16" and not raw:
            return _bf16_as_float32(path, off, n // 2, shape)
        return np.fromfile(path, dtype=RAW[dt], count=n // np.dtype(RAW[dt]).itemsize, offset=off).reshape(shape)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.get(name)


BF16_CHUNK = 1 << 22  # elements read and widened at a time (8 MB of bf16)


def _bf16_as_float32(path: Path, off: int, count: int, shape: tuple) -> np.ndarray:
    """bfloat16 values at ``off`` as float32, read a chunk at a time straight into the result: the only big
    allocation is the float32 array itself (a whole-table bf16 copy beside it would add half its size)."""
    out = np.empty(count, np.float32)
    bits = out.view(np.uint32)
    for lo in range(0, count, BF16_CHUNK):
        k = min(BF16_CHUNK, count - lo)
        chunk = np.fromfile(path, dtype=np.uint16, count=k, offset=off + 2 * lo)
        if chunk.size != k:
            raise TensorFileError(f"{path}: truncated while reading (expected {count} bfloat16 values)")
        bits[lo:lo + k] = chunk
        bits[lo:lo + k] <<= 16
    return out.reshape(shape)


def checkpoint_files(root: Path) -> list[Path]:
    """The safetensors files of an HF-format dir: those its index names, else every *.safetensors."""
    root = Path(root)
    index = root / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise TensorFileError(f"{index}: unreadable index ({e})") from None
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise TensorFileError(f"{index} names {missing[0]}, which is missing; the download is incomplete")
        return [root / n for n in names]
    return sorted(root.glob("*.safetensors"))


# ---- writing -------------------------------------------------------------------------------------------------
DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64",
               np.dtype(np.int32): "I32", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8",
               np.dtype(np.bool_): "BOOL", np.dtype(np.float64): "F64"}


class ShardWriter:
    """Write tensors into safetensors shards as they come, at most ``max_bytes`` of data per shard (a bigger
    group of tensors gets a shard of its own), then the HF index. Memory: only the tensors being written.

    ``add(tensors)`` writes a group (a decoder layer) into the current shard, starting a new shard when the
    group would overflow it. Each tensor is (numpy array, safetensors dtype name), so bf16 and fp8 bytes pass
    through as raw uint16 / uint8. ``close()`` names the shards model-0000k-of-0000N.safetensors and writes
    model.safetensors.index.json (or a single model.safetensors when one shard suffices)."""

    RESERVE = 1 << 17  # header bytes reserved at the start of each shard (padded with spaces)

    def __init__(self, out: Path, max_bytes: int = 2 << 30):
        if max_bytes < 1:
            raise ValueError("shard size must be positive")
        self.out, self.max_bytes = Path(out), int(max_bytes)
        self.shards: list[tuple[Path, dict]] = []  # (temporary path, header)
        self._fh = None
        self._header: dict = {}
        self._used = 0
        self.weight_map: dict[str, int] = {}

    def _open(self) -> None:
        path = self.out / f".shard-{len(self.shards):05d}.tmp"
        self._fh = open(path, "wb")
        self._fh.truncate(self.RESERVE)
        self._fh.seek(self.RESERVE)
        self._header, self._used = {}, 0
        self.shards.append((path, self._header))

    def _finish(self) -> None:
        if self._fh is None:
            return
        path, header = self.shards[-1]
        text = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
        if len(text) + 8 > self.RESERVE:  # rare: more tensors than the reserve holds -> rewrite with a bigger one
            self._fh.close()
            _rewrite_with_header(path, text, self.RESERVE)
        else:
            text += b" " * (self.RESERVE - 8 - len(text))
            self._fh.seek(0)
            self._fh.write(struct.pack("<Q", len(text)) + text)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        self._fh = None

    def add(self, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
        size = sum(a.nbytes for a, _ in tensors.values())
        if self._fh is None or (self._used and self._used + size > self.max_bytes):
            self._finish()
            self._open()
        for name, (arr, dt) in tensors.items():
            if name in self.weight_map:
                raise ValueError(f"tensor {name} written twice")
            arr = arr if arr.flags.c_contiguous else arr.copy()  # (ascontiguousarray would make a scalar 1-D)
            self._fh.write(arr.tobytes() if arr.ndim == 0 else memoryview(arr).cast("B"))
            self._header[name] = {"dtype": dt, "shape": list(arr.shape),
                                  "data_offsets": [self._used, self._used + arr.nbytes]}
            self._used += arr.nbytes
            self.weight_map[name] = len(self.shards) - 1

    def add_chunks(self, name: str, dt: str, shape: tuple, chunks) -> None:
        """One tensor written from an iterator of row blocks (numpy arrays whose bytes concatenate to it), in
        the current shard, for tables too big to hold (a 128k-row embedding)."""
        if name in self.weight_map:
            raise ValueError(f"tensor {name} written twice")
        itemsize = np.dtype(RAW[dt]).itemsize
        size = int(np.prod(shape)) * itemsize
        if self._fh is None or (self._used and self._used + size > self.max_bytes):
            self._finish()
            self._open()
        written = 0
        for c in chunks:
            c = np.ascontiguousarray(c)
            self._fh.write(memoryview(c).cast("B"))
            written += c.nbytes
        if written != size:
            raise ValueError(f"{name}: wrote {written} bytes for a tensor of {size}")
        self._header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [self._used, self._used + size]}
        self._used += size
        self.weight_map[name] = len(self.shards) - 1

    def close(self) -> list[str]:
        """Finish the last shard, give the shards their final names, write the index. Returns the file names."""
        self._finish()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (tmp, _), name in zip(self.shards, names):
            os.replace(tmp, self.out / name)
        if n > 1:
            total = sum(sum(m["data_offsets"][1] - m["data_offsets"][0] for m in h.values()) for _, h in self.shards)
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: names[v] for k, v in sorted(self.weight_map.items())}}
            (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            return names + [INDEX]
        return names


def _rewrite_with_header(path: Path, text: bytes, reserve: int) -> None:
    tmp = path.with_suffix(".rewrite")
    pad = b" " * (-(len(text) + 8) % 8)
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(struct.pack("<Q", len(text) + len(pad)) + text + pad)
        src.seek(reserve)
        while chunk := src.read(64 << 20):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
