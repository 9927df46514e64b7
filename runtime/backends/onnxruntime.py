"""ONNX Runtime backend (CPU by default): IO binding straight into preallocated host KV buffers.

Portable artifacts read the past from one buffer and write past + new into another (``HostKVCache``); an
``--form ort`` artifact's GroupQueryAttention appends in place when past and present are bound to the same
[batch, kv_heads, capacity, head_dim] buffer (``SharedKVCache``), so its KV bindings change only when the
cache grows or its rows change.

A quantized cache (IO contract 3: int8 or FP8 codes plus float32 per-token scales, export/onnx/kvcache.py)
lives in a ``QuantHostKVCache``: the codes and the scales in two ping-pong slabs that move together. The ort
form's int8 cache (IO contract 4: static scales inside the graph, export/onnx/kvstatic.py) is codes only, in a
``SharedKVCache`` of int8 like the float one."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import EngineError
from .base import Backend, KVCache, step_inputs
from .hostcache import HostKVCache, QuantHostKVCache
from .sharedcache import SharedKVCache
from ..records import POSITIONS
from .ort_binding import c_binding, fast_binding

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
_ONNX_CODE = {np.float32: 1, np.float16: 10, np.int64: 7}  # TensorProto data types (cheaper to bind than dtypes)
# quantized cache codes: (host dtype, TensorProto type); FP8 bytes live in uint8 buffers bound as FLOAT8E4M3FN
_KV_CODES = {"tensor(int8)": (np.int8, 3), "tensor(float8e4m3fn)": (np.uint8, 17)}
SCALE = "_scale"


def _addr(a: np.ndarray) -> int:
    return a.ctypes.data


class _Bound:
    """The session's IO binding and logits buffer, one per cache (so separate caches can run concurrently)."""

    def _bind_to(self, sess):
        self.binding = sess.io_binding()
        self.cbinding = c_binding(self.binding)
        self.logits = np.zeros(0, dtype=np.float32)  # reused output buffer, grown on demand

    def logits_buffer(self, n: int, dtype) -> np.ndarray:
        if self.logits.size < n or self.logits.dtype != dtype:
            self.logits = np.empty(max(n, int(self.logits.size * 1.5)), dtype=dtype)
        return self.logits


class _OrtCache(_Bound, HostKVCache):
    def __init__(self, sess, *a):
        HostKVCache.__init__(self, *a)
        self._bind_to(sess)


class _OrtQuantCache(_Bound, QuantHostKVCache):
    def __init__(self, sess, *a, fp8=False):
        QuantHostKVCache.__init__(self, *a, fp8=fp8)
        self._bind_to(sess)


class _OrtSharedCache(_Bound, SharedKVCache):
    def __init__(self, sess, *a):
        SharedKVCache.__init__(self, *a)
        self._bind_to(sess)
        self.kv_bound = None  # (batch, capacity, address) the KV tensors are bound with


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, artifact_dir, manifest, threads=None, providers=None):
        import onnxruntime as ort

        root = Path(artifact_dir)
        model = root / "model.onnx"
        if not model.is_file():
            raise EngineError(f"{root}: model.onnx is missing; re-export the artifact")
        if threads is not None and threads < 1:
            raise EngineError(f"threads must be at least 1, got {threads}")
        arch = manifest.architecture
        self.layers, self.kv_heads, self.head_dim, self.vocab = arch.layers, arch.kv_heads, arch.head_dim, arch.vocab
        self.threads = threads
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(root))
        avail = ort.get_available_providers()
        providers = list(providers) if providers else ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in avail]
        if missing:
            raise EngineError(f"ONNX Runtime provider(s) {', '.join(missing)} not available here "
                              f"(available: {', '.join(avail)})")
        try:
            self.sess = ort.InferenceSession(str(model), so, providers=providers)
        except Exception as e:  # ORT raises its own exception types for a corrupt or unsupported graph
            msg = " ".join(str(e).split())[:300]
            raise EngineError(f"{model}: ONNX Runtime cannot load it ({msg}); re-export the artifact") from None
        self.providers = providers
        self.shared_kv = manifest.io is not None and manifest.io.form == "ort"
        self._check_io()
        self._cdev, self._csess = fast_binding(self.sess)

    # ---- IO contract ---------------------------------------------------------------------------------
    def _check_io(self) -> None:
        ins = {i.name: i for i in self.sess.get_inputs()}
        outs = {o.name: o for o in self.sess.get_outputs()}
        need_in = ["input_ids", "attention_mask", "position_ids"]
        need_out = ["logits"]
        for i in range(self.layers):
            need_in += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            need_out += [f"present.{i}.key", f"present.{i}.value"]
        miss = [n for n in need_in if n not in ins] + [n for n in need_out if n not in outs]
        if miss:
            raise EngineError(f"model.onnx does not follow the llmkiln IO contract: missing {', '.join(miss[:4])}"
                              f"{' ...' if len(miss) > 4 else ''}; re-export it with `kiln export onnx`")
        self.positions = POSITIONS in ins
        kv = ins["past_key_values.0.key"]
        self.kv_quantized = kv.type in _KV_CODES
        self.kv_dtype, kv_code = _KV_CODES[kv.type] if self.kv_quantized else (_ORT_TYPES.get(kv.type), None)
        if self.kv_dtype is None or outs["logits"].type not in _ORT_TYPES:
            raise EngineError(f"model.onnx: unsupported KV/logits types {kv.type}/{outs['logits'].type}")
        self.kv_code = kv_code or _ONNX_CODE[self.kv_dtype]
        self.kv_fp8 = kv.type == "tensor(float8e4m3fn)"
        self.logits_dtype = _ORT_TYPES[outs["logits"].type]
        self._names = [(f"past_key_values.{i}.{w}", f"present.{i}.{w}") for i in range(self.layers)
                       for w in ("key", "value")]
        # (past, present, TensorProto type, last dim) per bound KV tensor, in the cache's ptrs order
        self._kv_binds = [(pin, pout, self.kv_code, self.head_dim) for pin, pout in self._names]
        # the ort form's int8 cache keeps its scales in the graph (IO contract 4): codes only, shared in place
        self.kv_static = self.kv_quantized and self.shared_kv
        if self.kv_static and self.kv_fp8:
            raise EngineError("model.onnx: the ort form has an int8 KV cache or a float one, not FP8; re-export it")
        if self.kv_quantized and not self.kv_static:
            scales = [(pin + SCALE, pout + SCALE) for pin, pout in self._names]
            miss = [n for pin, pout in scales for n, have in ((pin, ins), (pout, outs)) if n not in have]
            if miss:
                raise EngineError(f"model.onnx has a {kv.type} KV cache but no {miss[0]}; re-export it with "
                                  "`kiln export onnx --kv-cache`")
            self._kv_binds += [(pin, pout, _ONNX_CODE[np.float32], 1) for pin, pout in scales]

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one row takes per position: codes plus their float32 scales for a quantized cache,
        twice for the portable graph's two buffers (past and present)."""
        per_head = self.head_dim * np.dtype(self.kv_dtype).itemsize + (4 if self.kv_quantized and not self.kv_static
                                                                         else 0)
        return self.layers * 2 * self.kv_heads * per_head * (1 if self.shared_kv else 2)

    # ---- Backend --------------------------------------------------------------------------------------
    def allocate(self, batch: int, max_len: int) -> KVCache:
        if self.kv_quantized and not self.kv_static:
            return _OrtQuantCache(self.sess, self.layers, self.kv_heads, self.head_dim, self.kv_dtype, batch,
                                  max_len, fp8=self.kv_fp8)
        cls = _OrtSharedCache if self.shared_kv else _OrtCache
        return cls(self.sess, self.layers, self.kv_heads, self.head_dim, self.kv_dtype, batch, max_len)

    def forward(self, cache, input_ids, attention_mask, position_ids, last_only=True):
        ids, mask, pos, t = step_inputs(cache, input_ids, attention_mask, position_ids)
        b, s = ids.shape
        p = t - s
        cache.batch = b
        cache.reserve(b, t)
        fast = self._cdev is not None and cache.cbinding is not None
        io = cache.cbinding if fast else cache.binding
        i64, ldt, dt = _ONNX_CODE[np.int64], _ONNX_CODE[self.logits_dtype], self.kv_code
        if fast:
            dev = self._cdev

            def bin_(n, dt, shape, ptr):
                io.bind_input(n, dev, dt, shape, ptr)

            def bout(n, dt, shape, ptr):
                io.bind_output(n, dev, dt, shape, ptr)
        else:
            def bin_(n, dt, shape, ptr):
                io.bind_input(n, "cpu", 0, dt, shape, ptr)

            def bout(n, dt, shape, ptr):
                io.bind_output(n, "cpu", 0, dt, shape, ptr)
        bin_("input_ids", i64, [b, s], _addr(ids))
        bin_("attention_mask", i64, [b, t], _addr(mask))
        bin_("position_ids", i64, [b, s], _addr(pos))
        k = 1 if last_only else s
        if self.positions:
            sel = np.arange(s - k, s, dtype=np.int64)
            bin_(POSITIONS, i64, [k], _addr(sel))
            out_s = k
        else:
            out_s = s
        logits = cache.logits_buffer(b * out_s * self.vocab, self.logits_dtype)
        bout("logits", ldt, [b, out_s, self.vocab], _addr(logits))
        kv, hd = self.kv_heads, self.head_dim
        if self.shared_kv:  # past and present are one buffer: GroupQueryAttention appends at column p
            key = (b, cache.capacity, cache.ptr(0))
            if cache.kv_bound != key:
                shape = [b, kv, cache.capacity, hd]
                for j, (pin, pout) in enumerate(self._names):
                    bin_(pin, dt, shape, cache.ptr(j))
                    bout(pout, dt, shape, cache.ptr(j))
                cache.kv_bound = key
        else:
            ptrs = cache.ptrs
            src, dst = ptrs[cache.side], ptrs[cache.side ^ 1]
            shapes = {hd: ([b, kv, p, hd], [b, kv, t, hd]), 1: ([b, kv, p, 1], [b, kv, t, 1])}
            for j, (pin, pout, code, last) in enumerate(self._kv_binds):
                past_shape, present_shape = shapes[last]
                bin_(pin, code, past_shape, src[j])
                bout(pout, code, present_shape, dst[j])
        try:
            if fast:
                self._csess.run_with_iobinding(io, None)
            else:
                self.sess.run_with_iobinding(io)
        except Exception as e:
            msg = " ".join(str(e).split())[:300]
            raise EngineError(f"ONNX Runtime failed to run the model: {msg}") from None
        cache.advance(b, s)
        out = logits[: b * out_s * self.vocab].reshape(b, out_s, self.vocab)
        if out_s != k:
            out = out[:, -k:]
        if out.dtype != np.float32:
            out = out.astype(np.float32)
        return out

    def describe(self) -> dict:
        return {"backend": self.name, "providers": self.providers,
                "threads": self.threads or os.cpu_count(), "logits_positions": self.positions,
                **({"kv_cache": "fp8" if self.kv_fp8 else "int8" + (" (static scales)" if self.kv_static else "")}
                   if self.kv_quantized else {})}

    def close(self) -> None:
        self.sess = None
