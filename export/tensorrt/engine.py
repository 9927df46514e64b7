"""``export_tensorrt``: ONNX artifact dir -> engine artifact dir (model.plan + tokenizer + kiln.json).

Order matters: TensorRT, cuda-python and a GPU are checked first (fail at once, nothing read or written),
then the source artifact (kind, plain files inside the dir, file hashes, every external-data location of
the graph a listed file: ``runtime.onnx_files``), then ``check_onnx``, profiles and builder settings (all pure),
then the one slow call, then an atomic write. A failed build leaves no ENGINE_DIR and never touches the
source artifact or an existing timing cache.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.fsutil import atomic_dir, atomic_write_bytes
from runtime.manifest import Manifest, read_manifest, verify_files
from runtime.onnx_files import check_artifact_files, check_model_locations
from runtime.records import BuildRecord, EngineInfo, SourceArtifact
from runtime.strict import to_json

from ..errors import ExportError
from .build import build_plan, device_info, load_tensorrt
from .check import check_onnx
from .flags import check_device, select_settings
from .profiles import ProfileFlags, derive_profiles, graph_inputs

PLAN_NAME = "model.plan"
GRAPH_FILES = ("model.onnx", "model.onnx.data")


@dataclass(frozen=True)
class TensorRTExport:
    """Options of ``kiln export tensorrt`` beyond the profile flags."""

    timing_cache: str | None = None
    workspace_gb: float | None = None
    version_compatible: bool = False

    def __post_init__(self):
        if self.workspace_gb is not None and not (isinstance(self.workspace_gb, (int, float))
                                                  and self.workspace_gb > 0):
            raise ExportError(f"--workspace-gb must be a positive number of GiB, got {self.workspace_gb!r}")


def source_hash(manifest: Manifest) -> str:
    """sha256 over the (name, sha256) of every file of the source artifact, as verified against kiln.json."""
    h = hashlib.sha256()
    for name in sorted(manifest.files):
        h.update(f"{name}\0{manifest.files[name].sha256}\n".encode())
    return h.hexdigest()


def _read_source(artifact: Path) -> Manifest:
    m = read_manifest(artifact)
    if m.kind != "onnx":
        raise ExportError(f"{artifact}: kiln.json kind is {m.kind!r}; kiln export tensorrt takes an ONNX artifact "
                          "(make one with kiln export onnx)")
    missing = [f for f in GRAPH_FILES[:1] if f not in m.files]
    if missing:
        raise ExportError(f"{artifact}: kiln.json lists no {missing[0]}; re-create the ONNX artifact")
    check_artifact_files(artifact, m, error=ExportError)  # plain files inside the dir, before any is read
    verify_files(artifact, m, full=True)
    return m


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def export_tensorrt(artifact: str | Path, out: str | Path, flags: ProfileFlags | None = None,
                    options: TensorRTExport | None = None, *, force: bool = False, trt=None,
                    cudart=None, progress=None) -> Manifest:
    """Build a TensorRT engine from the ONNX artifact ``artifact`` into ``out``; returns the engine manifest.

    ``trt``/``cudart`` default to the installed ``tensorrt`` and cuda-python modules (tests pass doubles).
    """
    artifact, out = Path(artifact), Path(out)
    flags, options = flags or ProfileFlags(), options or TensorRTExport()
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if trt is None:
        trt, cudart = load_tensorrt()
    dev = device_info(cudart)  # no GPU -> one-line error before anything is read or written
    note = progress or (lambda msg: None)
    source = _read_source(artifact)
    import onnx

    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    # every external-data location of the graph is a file kiln.json lists (TensorRT's parser reads them)
    check_model_locations(graph, artifact, source.files, error=ExportError)
    summary = check_onnx(artifact, trt_version=trt.__version__)
    a = source.architecture
    profiles = derive_profiles(graph_inputs(graph), flags, layers=a.layers, kv_heads=a.kv_heads,
                               head_dim=a.head_dim)
    del graph
    settings = select_settings(source.layer_specs(), version_compatible=options.version_compatible)
    cc = tuple(int(x) for x in dev["compute_capability"].split("."))
    check_device(settings, cc, dev["gpu_name"])
    cache_in = None
    if options.timing_cache and Path(options.timing_cache).is_file():
        cache_in = Path(options.timing_cache).read_bytes()
    workspace = int(options.workspace_gb * (1 << 30)) if options.workspace_gb else None
    note(f"building a TensorRT {trt.__version__} engine for {dev['gpu_name']} "
         f"(profiles: {', '.join(p.name for p in profiles)}; flags: {', '.join(settings.builder_flags) or 'none'})")
    t0 = time.perf_counter()
    plan, cache_out = build_plan(trt, str(artifact / "model.onnx"), settings, profiles, timing_cache=cache_in,
                                 workspace_bytes=workspace, log_level=os.environ.get("KILN_TRT_LOG", "WARNING"))
    seconds = round(time.perf_counter() - t0, 1)
    engine_block = EngineInfo(
        tensorrt_version=trt.__version__,
        gpu_name=dev["gpu_name"],
        compute_capability=dev["compute_capability"],
        settings=settings.record(),
        build=BuildRecord(max_batch=flags.max_batch, max_seq=flags.max_seq, opt_seq=flags.opt_seq,
                          workspace_gb=options.workspace_gb, version_compatible=options.version_compatible,
                          seconds=seconds),
        profiles=tuple(p.record() for p in profiles),
        timing_cache_sha256=hashlib.sha256(cache_out).hexdigest(),
        source_artifact=SourceArtifact(path=str(artifact.resolve()), sha256=source_hash(source),
                                       onnx_check=to_json({k: v for k, v in summary.items() if k != "path"})),
    )
    manifest = Manifest(kind="engine", architecture=source.architecture, source=source.source,
                        passes=source.passes, io=source.io, engine=engine_block)
    with atomic_dir(out, force=force, error=ExportError) as tmp:
        (tmp / PLAN_NAME).write_bytes(plan)
        for name in sorted(source.files):
            if name in GRAPH_FILES or name.endswith(".onnx"):
                continue
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(artifact / name, dst)
        manifest.record_files(tmp)
        manifest.save(tmp)
    if options.timing_cache:
        _write_bytes_atomic(Path(options.timing_cache), cache_out)
    return manifest


