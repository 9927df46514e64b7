"""``kiln export triton``: a Triton Inference Server model repository entry for an ONNX artifact or an engine.

Layout written (Triton "Model Repository" docs)::

    REPO/NAME/config.pbtxt           ModelConfig in protobuf text format
    REPO/NAME/kiln.json, tokenizer*  the artifact's manifest and tokenizer, for clients (Triton ignores them)
    REPO/NAME/VERSION/model.plan     tensorrt_plan backend (engine dirs)
    REPO/NAME/VERSION/model.onnx/    onnxruntime_onnx backend: "a directory containing multiple files" —
                                     model.onnx plus its external data model.onnx.data

``max_batch_size`` is 0: the batch dimension is explicit in every tensor (the KV cache carries it), so
clients send whole batches and keep the cache between calls (present.* of one call are the next call's
past_key_values.*). A quantized cache (``kiln export onnx --kv-cache int8``, IO contract 3) is TYPE_INT8 codes
plus TYPE_FP32 ``*_scale`` tensors [-1, kv_heads, -1, 1], listed like the rest; Triton has no FP8 data type,
so an ``fp8`` cache is refused. The model dir is written atomically; an existing one is replaced only with ``force``.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from runtime.fsutil import atomic_dir
from runtime.manifest import Manifest, read_manifest, verify_files
from runtime.onnx_files import check_artifact_files, check_model_locations
from runtime.records import POSITIONS

from .errors import ExportError

ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 7: "TYPE_INT64", 6: "TYPE_INT32",
                  3: "TYPE_INT8", 2: "TYPE_UINT8", 9: "TYPE_BOOL", 11: "TYPE_FP64"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
GRAPH_FILES = ("model.onnx", "model.onnx.data", "model.plan")


@dataclass(frozen=True)
class TritonExport:
    name: str | None = None
    version: int = 1
    instances: int = 1
    kind: str = "auto"  # auto | gpu | cpu

    def __post_init__(self):
        if self.name is not None and not NAME_RE.match(self.name):
            raise ExportError(f"--name {self.name!r}: use letters, digits, '_', '-' and '.' (it is a directory name)")
        if not isinstance(self.version, int) or self.version < 1:
            raise ExportError(f"--version must be a positive integer (Triton ignores 0 and non-numeric dirs), "
                              f"got {self.version!r}")
        if not isinstance(self.instances, int) or self.instances < 1:
            raise ExportError(f"--instances must be a positive integer, got {self.instances!r}")
        if self.kind not in ("auto", "gpu", "cpu"):
            raise ExportError(f"--kind must be auto, gpu or cpu, got {self.kind!r}")


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # Triton TYPE_*
    dims: tuple[int, ...]  # -1 for a dynamic dim (batch included: max_batch_size is 0)


def contract_io(manifest: Manifest) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and outputs of the llmkiln IO contract for this architecture (used for engines)."""
    a = manifest.architecture
    kv = (-1, a.kv_heads, -1, a.head_dim)
    ins = [Tensor(n, "TYPE_INT64", (-1, -1)) for n in ("input_ids", "attention_mask", "position_ids")]
    ins.append(Tensor(POSITIONS, "TYPE_INT64", (-1,)))
    outs = [Tensor("logits", "TYPE_FP32", (-1, -1, a.vocab))]
    for i in range(a.layers):
        for k in ("key", "value"):
            ins.append(Tensor(f"past_key_values.{i}.{k}", "TYPE_FP32", kv))
            outs.append(Tensor(f"present.{i}.{k}", "TYPE_FP32", kv))
    return ins, outs


DTYPE_TO_TRITON = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                   "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


FP8_KV = ("Triton has no FP8 data type for the {what}'s FP8 KV cache; export it with --kv-cache int8 (or "
          "float) for Triton")


def manifest_io(manifest: Manifest) -> tuple[list[Tensor], list[Tensor]]:
    """IO from kiln.json's ``io`` block (names, dtypes, shapes as the exporter recorded them), else the contract."""
    io = manifest.io
    if io is None:
        return contract_io(manifest)
    if io.kv_quantized and io.kv_dtype not in DTYPE_TO_TRITON:
        raise ExportError(FP8_KV.format(what="engine"))
    try:
        conv = [[Tensor(t.name, DTYPE_TO_TRITON[t.dtype], tuple(d if isinstance(d, int) else -1 for d in t.shape))
                 for t in tensors] for tensors in (io.inputs, io.outputs)]
    except KeyError:
        return contract_io(manifest)
    return conv[0], conv[1]


def onnx_io(path: Path) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and outputs as the ONNX graph declares them (read without its external data)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}

    def conv(vi) -> Tensor:
        tt = vi.type.tensor_type
        if tt.elem_type == 17 and vi.name.startswith(("past_key_values.", "present.")):
            raise ExportError(f"{path}: " + FP8_KV.format(what="graph"))
        if tt.elem_type not in ONNX_TO_TRITON:
            raise ExportError(f"{path}: {vi.name} has ONNX element type {tt.elem_type}, which Triton cannot carry")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        return Tensor(vi.name, ONNX_TO_TRITON[tt.elem_type], dims)

    return [conv(v) for v in g.input if v.name not in inits], [conv(v) for v in g.output]


def _tensors(key: str, tensors: list[Tensor]) -> list[str]:
    lines = [f"{key} ["]
    for i, t in enumerate(tensors):
        dims = ", ".join(str(d) for d in t.dims)
        lines += ["  {", f'    name: "{t.name}"', f"    data_type: {t.data_type}", f"    dims: [ {dims} ]",
                  "  }" + ("," if i < len(tensors) - 1 else "")]
    return lines + ["]"]


def model_config(name: str, platform: str, inputs: list[Tensor], outputs: list[Tensor], *, instances: int,
                 kind: str, profiles: int = 0, compute_capability: str | None = None) -> str:
    """config.pbtxt text (Triton ModelConfig, protobuf text format). Pure."""
    filename = "model.plan" if platform == "tensorrt_plan" else "model.onnx"
    lines = [f'name: "{name}"', f'platform: "{platform}"', "max_batch_size: 0",
             f'default_model_filename: "{filename}"']
    lines += _tensors("input", inputs) + _tensors("output", outputs)
    group = ["instance_group [", "  {", f"    count: {instances}", f"    kind: {kind}"]
    if profiles:
        group.append("    profile: [ " + ", ".join(f'"{i}"' for i in range(profiles)) + " ]")
    lines += group + ["  }", "]"]
    if compute_capability:
        lines += ["cc_model_filenames {", f'  key: "{compute_capability}"', f'  value: "{filename}"', "}"]
    return "\n".join(lines) + "\n"


def export_triton(source: str | Path, repo: str | Path, opts: TritonExport = TritonExport(), *,
                  force: bool = False) -> dict:
    """Add ``source`` (an ONNX artifact or engine dir) to the model repository ``repo``; returns a summary."""
    source, repo = Path(source), Path(repo)
    m = read_manifest(source)
    if m.kind not in ("onnx", "engine"):
        raise ExportError(f"{source}: kind {m.kind!r}; Triton serves an ONNX artifact (kiln export onnx) or a "
                          "TensorRT engine dir (kiln export tensorrt)")
    check_artifact_files(source, m, error=ExportError)  # copied into the repository: plain files inside only
    verify_files(source, m)
    name = opts.name or source.resolve().name
    if not NAME_RE.match(name):
        raise ExportError(f"{source}: {name!r} is not a valid Triton model name; pass --name")
    if m.kind == "engine":
        platform = "tensorrt_plan"
        inputs, outputs = manifest_io(m)
        kind = "KIND_GPU" if opts.kind in ("auto", "gpu") else None
        if kind is None:
            raise ExportError("a TensorRT engine runs on a GPU only; drop --kind cpu")
        profiles = len(m.engine.profiles) if m.engine else 0
        cc = m.engine.compute_capability if m.engine else None
    else:
        platform = "onnxruntime_onnx"
        import onnx

        graph = onnx.load(str(source / "model.onnx"), load_external_data=False)
        check_model_locations(graph, source, m.files, error=ExportError)  # Triton's ORT reads them
        del graph
        inputs, outputs = onnx_io(source / "model.onnx")
        kind = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}[opts.kind]
        profiles, cc = 0, None
    text = model_config(name, platform, inputs, outputs, instances=opts.instances, kind=kind,
                        profiles=profiles, compute_capability=cc)
    model_dir = repo / name
    with atomic_dir(model_dir, force=force, error=ExportError) as tmp:
        vdir = tmp / str(opts.version)
        if m.kind == "engine":
            vdir.mkdir()
            shutil.copy2(source / "model.plan", vdir / "model.plan")
        else:
            (vdir / "model.onnx").mkdir(parents=True)
            for f in ("model.onnx", "model.onnx.data"):
                if (source / f).exists():
                    shutil.copy2(source / f, vdir / "model.onnx" / f)
        for f in sorted(m.files):
            if f not in GRAPH_FILES:
                (tmp / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / f, tmp / f)
        shutil.copy2(source / "kiln.json", tmp / "kiln.json")
        (tmp / "config.pbtxt").write_text(text, encoding="utf-8")
    return {"model_dir": str(model_dir), "name": name, "platform": platform, "version": opts.version,
            "inputs": len(inputs), "outputs": len(outputs)}
