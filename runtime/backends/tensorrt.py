"""TensorRT backend: a prebuilt engine (model.plan), device buffers via cuda-python, KV cache on the GPU.

Load order: kiln.json's ``engine`` block is compared with the local TensorRT version and GPU compute
capability first (``tensorrt_compat``: a mismatch says exactly which command rebuilds the engine), then the
plan is deserialized. One execution context per optimization profile (``prefill`` = 0, ``decode`` = 1, as
``kiln export tensorrt`` builds them); a step with one new token against a cache runs the decode profile.

Per step (TensorRT 10.x / 11.x name-based API): ``set_input_shape`` for every input, ``set_tensor_address``
for every input and output (the KV past on one side of the device cache, the present on the other), then
``execute_async_v3(stream)``; only token ids, masks and positions go up and only the logits rows asked for come
down. ``tensorrt`` and cuda-python are imported when this backend is constructed, never before.

A version-compatible engine (``--version-compatible``) embeds TensorRT's lean runtime, native code that runs
when the plan is deserialized; it loads only with ``trust_engine_code=True`` (``--trust-engine-code``), never
because the artifact's own kiln.json says so.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import EngineError
from .base import Backend, KVCache, step_inputs
from .cuda_mem import INSTALL_HINT, Cuda, DeviceBuffer, load_cudart
from .devicecache import DeviceKVCache
from ..records import POSITIONS
from .tensorrt_compat import check_engine_block, compatibility, trust_refusal

log = logging.getLogger("llmkiln.tensorrt")
PLAN = "model.plan"


def _load_tensorrt():
    try:
        import tensorrt as trt
    except Exception as e:
        raise EngineError(f"the tensorrt backend needs TensorRT ({type(e).__name__}: {e}): {INSTALL_HINT}") from None
    return trt


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, artifact_dir, manifest, threads=None, providers=None, *, trt=None, cudart=None,
                 trust_engine_code: bool = False):
        root = Path(artifact_dir)
        engine_block = check_engine_block(manifest.engine, str(root))
        if engine_block.build.version_compatible and not trust_engine_code:
            # a version-compatible plan carries TensorRT's lean runtime: native code that runs when it loads
            raise EngineError(trust_refusal(str(root)))
        trt = trt or _load_tensorrt()
        self.trt = trt
        self.cuda = Cuda(cudart or load_cudart())
        self.warnings = compatibility(engine_block, trt_version=trt.__version__,
                                      compute_capability=self.cuda.compute_capability,
                                      gpu_name=self.cuda.gpu_name, engine_dir=str(root))
        for w in self.warnings:
            log.warning(w)
        arch = manifest.architecture
        self.layers, self.kv_heads, self.head_dim, self.vocab = arch.layers, arch.kv_heads, arch.head_dim, arch.vocab
        build = engine_block.build
        self.max_batch, self.max_seq = build.max_batch, build.max_seq
        plan = root / PLAN
        if not plan.is_file():
            raise EngineError(f"{root}: {PLAN} is missing; rebuild the engine with kiln export tensorrt")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        if build.version_compatible and trust_engine_code:
            self.runtime.engine_host_code_allowed = True  # the caller vouched for this plan's host code
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise EngineError(f"{plan}: TensorRT could not deserialize the engine; rebuild it with kiln export "
                              "tensorrt on this machine")
        self._check_io()
        self.contexts = []
        for k in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            if ctx is None or not ctx.set_optimization_profile_async(k, self.cuda.stream_handle):
                raise EngineError(f"{plan}: could not create an execution context for profile {k}")
            self.contexts.append(ctx)
        self._bufs = {n: DeviceBuffer(self.cuda) for n in ("input_ids", "attention_mask", "position_ids", POSITIONS,
                                                            "logits")}
        self._host_logits = np.zeros(0, dtype=self.logits_dtype)

    # ---- IO contract -------------------------------------------------------------------------------------
    def _check_io(self) -> None:
        trt, e = self.trt, self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        mode = {n: e.get_tensor_mode(n) for n in names}
        need_in = ["input_ids", "attention_mask", "position_ids"]
        need_out = ["logits"]
        for i in range(self.layers):
            need_in += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            need_out += [f"present.{i}.key", f"present.{i}.value"]
        bad = [n for n in need_in if mode.get(n) != trt.TensorIOMode.INPUT]
        bad += [n for n in need_out if mode.get(n) != trt.TensorIOMode.OUTPUT]
        if bad:
            raise EngineError(f"the engine does not follow the llmkiln IO contract (missing {', '.join(bad[:4])}); "
                              "rebuild it from an ONNX artifact with kiln export tensorrt")
        dt = {n: np.dtype(trt.nptype(e.get_tensor_dtype(n))) for n in need_in + need_out}
        if any(dt[n] != np.int64 for n in need_in[:3]):
            raise EngineError("the engine's token inputs are not int64; rebuild it from a current ONNX artifact")
        self.kv_dtype, self.logits_dtype = dt["past_key_values.0.key"], dt["logits"]
        self.positions = mode.get(POSITIONS) == trt.TensorIOMode.INPUT
        self._names = [(f"past_key_values.{i}.{w}", f"present.{i}.{w}") for i in range(self.layers)
                       for w in ("key", "value")]

    # ---- Backend -----------------------------------------------------------------------------------------
    def allocate(self, batch: int, max_len: int) -> KVCache:
        return DeviceKVCache(self.cuda, self.layers, self.kv_heads, self.head_dim, self.kv_dtype, batch, max_len)

    def _upload(self, name: str, host: np.ndarray) -> int:
        ptr = self._bufs[name].reserve(host.nbytes)
        self.cuda.h2d(ptr, host)
        return ptr

    def forward(self, cache, input_ids, attention_mask, position_ids, last_only=True):
        ids, mask, pos, t = step_inputs(cache, input_ids, attention_mask, position_ids)
        b, s = ids.shape
        p = t - s
        if b > self.max_batch or t > self.max_seq:
            raise EngineError(f"batch {b} x length {t} is outside the engine's profiles (max batch "
                              f"{self.max_batch}, max length {self.max_seq}); rebuild with larger --max-batch/--max-seq")
        ctx = self.contexts[1 if s == 1 and len(self.contexts) > 1 else 0]
        cache.batch = b
        cache.reserve(b, t)
        shapes = {"input_ids": (b, s), "attention_mask": (b, t), "position_ids": (b, s)}
        addrs = {"input_ids": self._upload("input_ids", ids), "attention_mask": self._upload("attention_mask", mask),
                 "position_ids": self._upload("position_ids", pos)}
        src, dst = cache.side, cache.side ^ 1
        for j, (pin, pout) in enumerate(self._names):
            shapes[pin] = (b, self.kv_heads, p, self.head_dim)
            addrs[pin], addrs[pout] = cache.ptr(src, j), cache.ptr(dst, j)
        k = 1 if last_only else s
        out_s = s
        if self.positions:  # the graph computes logits only for the positions asked for
            shapes[POSITIONS] = (k,)
            addrs[POSITIONS] = self._upload(POSITIONS, np.arange(s - k, s, dtype=np.int64))
            out_s = k
        isz = self.logits_dtype.itemsize
        addrs["logits"] = self._bufs["logits"].reserve(b * out_s * self.vocab * isz)
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise EngineError(f"the engine refused shape {list(shape)} for {name}")
        if tuple(ctx.get_tensor_shape("logits")) != (b, out_s, self.vocab):
            raise EngineError(f"the engine computes logits of shape {tuple(ctx.get_tensor_shape('logits'))}, "
                              f"expected {(b, out_s, self.vocab)}")
        for name, ptr in addrs.items():
            if not ctx.set_tensor_address(name, ptr):
                raise EngineError(f"the engine refused the device address of {name}")
        if not ctx.execute_async_v3(self.cuda.stream_handle):
            raise EngineError("TensorRT failed to run the engine (execute_async_v3 returned False)")
        n = b * k * self.vocab
        if self._host_logits.size < n:
            self._host_logits = np.empty(max(n, int(self._host_logits.size * 1.5)), dtype=self.logits_dtype)
        host = self._host_logits[:n]
        row = self.vocab * isz
        # rows (b, out_s-k .. out_s-1) of the [b, out_s, vocab] device logits -> [b, k, vocab] on the host
        self.cuda.copy2d(host.ctypes.data, k * row, addrs["logits"] + (out_s - k) * row, out_s * row, k * row, b,
                         kind=self.cuda.D2H)
        self.cuda.sync()
        cache.advance(b, s)
        out = host.reshape(b, k, self.vocab)
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def describe(self) -> dict:
        return {"backend": self.name, "tensorrt": self.trt.__version__, "gpu": self.cuda.gpu_name,
                "compute_capability": "{}.{}".format(*self.cuda.compute_capability), "profiles": len(self.contexts),
                "max_batch": self.max_batch, "max_seq": self.max_seq}

    def close(self) -> None:
        if getattr(self, "cuda", None) is None or self.cuda.stream is None:
            return
        self.cuda.sync()
        for buf in self._bufs.values():
            buf.free()
        self.contexts, self.engine = [], None
        self.cuda.close()
