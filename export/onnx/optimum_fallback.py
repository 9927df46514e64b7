"""``--exporter optimum``: an fp32 ONNX artifact made by optimum-onnx's exporter instead of our graph builder.

optimum-onnx pins transformers 4.x, so it runs in its own interpreter (``--optimum-python`` or
$KILN_OPTIMUM_PYTHON) as ``PY -m optimum.commands.optimum_cli export onnx --task text-generation-with-past``.
Its traced graph is checked against the IO contract (docs/CONTRACTS.md) without ``logits_positions``, its
symbolic dims renamed to the contract's, given the ``logits_positions`` input (graphedit), re-saved with the
weights in model.onnx.data, then validated against the torch model of the same source exactly like the
builder's graph and written atomically with the same kiln.json.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..errors import ExportError

ENV = "KILN_OPTIMUM_PYTHON"
REQUIREMENTS = "torch==2.13.0 optimum==2.1.0 optimum-onnx==0.1.0 transformers==4.57.6 onnxruntime"
HOW = (f"create one with `python3 -m venv .venv-optimum && .venv-optimum/bin/pip install {REQUIREMENTS}` "
       f"and pass --optimum-python .venv-optimum/bin/python (or set {ENV})")
TASK = "text-generation-with-past"
# optimum's symbolic dim names -> the contract's (the names kiln.json `io` uses)
DIMS = {"batch_size": "batch", "sequence_length": "seq", "past_sequence_length": "past_seq",
        "past_sequence_length + sequence_length": "total_seq"}
DTYPES = {"int64": 7, "float32": 1}  # onnx.TensorProto codes


def optimum_interpreter(path: str | None = None) -> str:
    """The Python that has optimum-onnx: ``path``, else $KILN_OPTIMUM_PYTHON (not resolved: a venv's python
    is a symlink that must stay one)."""
    path = path or os.environ.get(ENV)
    if not path:
        raise ExportError(f"--exporter optimum runs optimum-onnx in a separate Python (it needs transformers 4.x) "
                          f"and none is configured: {HOW}")
    exe = shutil.which(str(Path(path).expanduser()))
    if exe is None:
        raise ExportError(f"{path}: not an executable Python; {HOW}")
    return exe


def refuse_quantized(info) -> None:
    if info.manifest is not None and info.manifest.quantized:
        raise ExportError(f"{info.path} is a quantized checkpoint ({info.manifest.preset()}); --exporter optimum "
                          "exports fp32 only: use --exporter kiln for it, or export the unquantized source")


def hf_input(hf: Path, work: Path) -> Path:
    """The HF dir optimum reads. Transformers 5 keeps rope_theta (and a non-default rope type) only in
    rope_parameters, which transformers 4.x ignores (it would fall back to theta 10000): then a copy of
    the dir, weights symlinked, with rope_theta / rope_scaling written back. The input is never modified."""
    cfg = json.loads((hf / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in rope:
        return hf
    scaled = rope.get("rope_type", "default") != "default"
    if "rope_theta" in cfg and (cfg.get("rope_scaling") or not scaled):
        return hf
    cfg["rope_theta"] = rope["rope_theta"]
    if scaled and not cfg.get("rope_scaling"):
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    src = work / "model"
    src.mkdir()
    for f in hf.iterdir():
        if f.name != "config.json":
            (src / f.name).symlink_to(f.resolve())
    (src / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return src


def run_optimum(python: str, model_dir: Path, out_dir: Path) -> Path:
    """Run optimum's exporter into ``out_dir``; returns its model.onnx."""
    cmd = [python, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(model_dir),
           "--task", TASK, str(out_dir)]
    # its own packages only, and no hub look-ups for a model on disk
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        p = subprocess.run(cmd, cwd=str(out_dir.parent), env=env, capture_output=True, text=True, check=False,
                           stdin=subprocess.DEVNULL)
    except OSError as e:
        raise ExportError(f"cannot run {python} ({e}); {HOW}") from None
    onnx_path = out_dir / "model.onnx"
    if p.returncode == 0 and onnx_path.is_file():
        return onnx_path
    err = p.stderr or p.stdout or ""
    if "No module named 'optimum" in err:
        raise ExportError(f"{python} has no optimum-onnx; {HOW}")
    tail = " ".join(err.split())[-400:]
    raise ExportError(f"optimum's exporter failed (exit {p.returncode}, {python}): ...{tail}")


def _shape(v) -> list:
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
            for d in v.type.tensor_type.shape.dim]


def traced_contract(arch) -> tuple[list, list]:
    """(inputs, outputs) TensorSpecs a traced graph has before ``logits_positions`` is added: no such input,
    logits for every position."""
    from runtime.records import POSITIONS, TensorSpec

    from .decoder import io_tensors

    inputs, outputs = io_tensors(arch)
    logits = TensorSpec("logits", "float32", ("batch", "seq", arch.vocab))
    return [t for t in inputs if t.name != POSITIONS], [logits if t.name == "logits" else t for t in outputs]


def conform_io(model, inputs: list, outputs: list) -> None:
    """Check optimum's graph against the contract (names, output order, dtypes, fixed dims, dynamic axes) and
    rename its symbolic dims to the contract's; one-line ExportError when it differs."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    want_in = [x.name for x in inputs]
    want_out = [x.name for x in outputs]
    have_in = [i.name for i in g.input if i.name not in inits]
    have_out = [o.name for o in g.output]
    where = "optimum's graph does not follow the llmkiln IO contract (docs/CONTRACTS.md)"
    if set(have_in) != set(want_in) or set(have_out) != set(want_out):
        missing = [n for n in want_in + want_out if n not in have_in + have_out]
        extra = [n for n in have_in + have_out if n not in want_in + want_out]
        raise ExportError(f"{where}: missing {', '.join(missing[:4]) or 'nothing'}, "
                          f"unexpected {', '.join(extra[:4]) or 'nothing'}")
    if have_out != want_out:
        raise ExportError(f"{where}: outputs in the order {', '.join(have_out[:3])} ..., expected "
                          f"{', '.join(want_out[:3])} ...")
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in DIMS:
                d.dim_param = DIMS[d.dim_param]
    vis = {v.name: v for v in list(g.input) + list(g.output)}
    for x in list(inputs) + list(outputs):
        v = vis[x.name]
        have = _shape(v)
        if v.type.tensor_type.elem_type != DTYPES[x.dtype] or have != list(x.shape):
            raise ExportError(f"{where}: {x.name} is {v.type.tensor_type.elem_type}{have}, expected "
                              f"{x.dtype}{list(x.shape)}")


def export_with_optimum(source, out, *, validate: bool = True, force: bool = False, progress: bool = False,
                        optimum_python: str | None = None, before_rename=None):
    """``export_onnx(..., exporter="optimum")``: see the module doc. Returns the written Manifest."""
    out = Path(out)
    from runtime.fsutil import atomic_dir
    from runtime.onnx_files import check_model_locations

    from .artifact import check_graph, load_source, whole_model_validator, write_artifact
    from .decoder import io_spec
    from .graphedit import add_logits_positions

    t0 = time.perf_counter()

    def check(info):  # both before the weights load
        refuse_quantized(info)
        optimum_interpreter(optimum_python)

    model, tok, info, arch = load_source(source, out, force, progress, check)
    python = optimum_interpreter(optimum_python)
    hf = Path(info.extra.get("converted") or info.path)
    traced_in, traced_out = traced_contract(arch)
    t_load = time.perf_counter() - t0

    import onnx

    with atomic_dir(out, force=force, error=ExportError) as tmp:
        work = tmp / ".optimum"  # optimum's own output and the patched config; removed before kiln.json
        work.mkdir()
        if progress:
            print(f"llmkiln: exporting {hf} with optimum-onnx ({python})", file=sys.stderr, flush=True)
        traced = run_optimum(python, hf_input(hf, work), work / "onnx")
        g = onnx.load(str(traced), load_external_data=False)
        # optimum's own output, but read only plain files inside its dir before loading the weights
        check_model_locations(g, traced.parent, error=ExportError)
        onnx.load_external_data_for_model(g, str(traced.parent))
        conform_io(g, traced_in, traced_out)
        if not add_logits_positions(g.graph):
            raise ExportError("optimum's graph: the lm_head product in front of `logits` was not found, so "
                              "the logits_positions input of the IO contract cannot be added")
        opset = next((o.version for o in g.opset_import if o.domain in ("", "ai.onnx")), None)
        for k, v in {"exporter": "optimum", "preset": "fp32", "form": "portable"}.items():
            e = g.metadata_props.add()
            e.key, e.value = k, v
        onnx_path = tmp / "model.onnx"
        onnx.save_model(g, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data")
        del g
        shutil.rmtree(work)
        check_graph(onnx_path)
        t_export = time.perf_counter() - t0 - t_load
        io = io_spec(arch, form="portable", opset=opset, exporter="optimum")
        validator = whole_model_validator(model, tok, arch, {}) if validate else None
        manifest = write_artifact(tmp, model, tok, info, arch, onnx_path, {}, io, validator, before_rename)
        t_val = time.perf_counter() - t0 - t_load - t_export
    manifest.timings = {"load_s": round(t_load, 3), "export_s": round(t_export, 3), "validate_s": round(t_val, 3)}
    return manifest
