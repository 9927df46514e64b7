"""The thin layer over TensorRT's Python API: import it, ask the GPU who it is, build a serialized plan.

Everything here takes the ``tensorrt`` and cuda-python modules as arguments so the call sequence can be
checked against the documented API with a recording test double where the real library cannot run. The
sequence (TensorRT 10.x / 11.x Python API):

    logger = trt.Logger(trt.Logger.WARNING); builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger); parser.parse_from_file(path)   # resolves model.onnx.data
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, bytes)        # only with --workspace-gb
    config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS / VERSION_COMPATIBLE)     # only these, never precision
    cache = config.create_timing_cache(previous_bytes_or_b""); config.set_timing_cache(cache, False)
    profile = builder.create_optimization_profile(); profile.set_shape(name, min, opt, max); ...
    config.add_optimization_profile(profile)                                 # one per Profile
    plan = builder.build_serialized_network(network, config)                 # None on failure
    cache_bytes = config.get_timing_cache().serialize()
"""
from __future__ import annotations

from ..errors import ExportError

INSTALL_HINT = "pip install 'llmkiln[gpu]' on a machine with an NVIDIA GPU (TensorRT 10.x/11.x and cuda-python)"


def load_tensorrt():
    """``(tensorrt, cudart)`` or ExportError saying what is missing and how to install it."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken install failing to load libnvinfer
        raise ExportError(f"TensorRT is not available ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    return trt, load_cudart()


def load_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except Exception as e:
            raise ExportError(f"cuda-python is not available ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    return cudart


def _ok(cudart, result, what: str):
    """cuda-python calls return (err, *values): check err, return the value(s)."""
    err, rest = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        raise ExportError(f"CUDA {what} failed ({err}); is an NVIDIA GPU and its driver present? {INSTALL_HINT}")
    return rest[0] if len(rest) == 1 else rest


def device_info(cudart, device: int = 0) -> dict:
    """Name and compute capability of GPU ``device`` (ExportError when there is none)."""
    err, n = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or not n or device >= n:
        raise ExportError(f"no NVIDIA GPU is visible (CUDA: {getattr(err, 'name', err)}, {n or 0} device(s)); "
                          f"{INSTALL_HINT}")
    prop = _ok(cudart, cudart.cudaGetDeviceProperties(device), "device properties")
    name = prop.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return {"gpu_name": str(name).strip(), "compute_capability": f"{prop.major}.{prop.minor}"}


def _network_inputs(network) -> dict[str, tuple]:
    return {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}


def _check_coverage(network, profiles) -> set[str]:
    """Every dynamic input of the parsed network must be in every profile; returns the network's input names
    (the parser may drop a graph input nothing uses; its profile entry is then skipped)."""
    inputs = _network_inputs(network)
    dyn = {n for n, s in inputs.items() if any(d < 0 for d in s)}
    for p in profiles:
        missing = sorted(dyn - set(p.shapes))
        if missing:
            raise ExportError(f"optimization profile {p.name!r} does not match the parsed network: dynamic "
                              f"input(s) without shapes: {', '.join(missing)}")
    return set(inputs)


def build_plan(trt, onnx_path: str, settings, profiles, *, timing_cache: bytes | None = None,
               workspace_bytes: int | None = None, log_level: str = "WARNING") -> tuple[bytes, bytes]:
    """Parse ``onnx_path`` and build a serialized engine; returns ``(plan_bytes, timing_cache_bytes)``."""
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder = trt.Builder(logger)
    flags = 0
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if settings.strongly_typed and strong is not None:  # 10.x: required; 11.x: deprecated, always on
        flags |= 1 << int(strong)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors[:5])
                          + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""))
    present = _check_coverage(network, profiles)
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for name in settings.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    cache = config.create_timing_cache(bytes(timing_cache or b""))
    if not config.set_timing_cache(cache, False):
        raise ExportError("TensorRT refused the timing cache (built by another TensorRT version or GPU); "
                          "delete the --timing-cache file and build again")
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, (mn, opt, mx) in p.shapes.items():
            if name in present:
                prof.set_shape(name, mn, opt, mx)
        if config.add_optimization_profile(prof) < 0:
            raise ExportError(f"TensorRT rejected optimization profile {p.name!r} ({p.to_dict()['shapes']})")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path}; rerun with KILN_TRT_LOG=VERBOSE "
                          "for the builder log")
    cache_bytes = bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(plan)), cache_bytes
