"""`kiln export tensorrt` and `kiln export triton`."""
from __future__ import annotations

import click

from .common import emit_json, stderr


@click.command("tensorrt")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(), help="Engine dir to write (model.plan + kiln.json).")
@click.option("--max-batch", type=int, default=8, show_default=True, help="Largest batch the engine accepts.")
@click.option("--max-seq", type=int, default=2048, show_default=True,
              help="Largest total length (cached + new tokens) the engine accepts.")
@click.option("--opt-seq", type=int, default=512, show_default=True,
              help="Prompt length the prefill profile is tuned for (and cache length for decode).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file: read if present, written after the build (speeds up rebuilds).")
@click.option("--workspace-gb", type=float, default=None, help="Builder workspace limit in GiB (default: TensorRT's).")
@click.option("--version-compatible", is_flag=True,
              help="Build an engine later TensorRT versions can run (may be slower).")
@click.option("--force", is_flag=True, help="Replace ENGINE_DIR if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object last on stdout.")
def tensorrt_cmd(artifact, out, max_batch, max_seq, opt_seq, timing_cache, workspace_gb, version_compatible, force,
                 as_json):
    """Build a TensorRT engine from the portable ONNX artifact ARTIFACT (needs TensorRT and an NVIDIA GPU).

    Export ARTIFACT with plain ops for TensorRT: kiln export onnx MODEL -o ARTIFACT --opset 21.

    The network is strongly typed (precision comes from the graph's Q/DQ), with min/opt/max profiles for every
    dynamic input (prefill and decode), SPARSE_WEIGHTS when the model was pruned 2:4, and the graph checked
    against TensorRT's ONNX constraints first.
    """
    from export.tensorrt import ProfileFlags, TensorRTExport, export_tensorrt

    flags = ProfileFlags(max_batch=max_batch, max_seq=max_seq, opt_seq=opt_seq)
    options = TensorRTExport(timing_cache=timing_cache, workspace_gb=workspace_gb,
                             version_compatible=version_compatible)
    m = export_tensorrt(artifact, out, flags, options, force=force, progress=stderr)
    e = m.engine
    if as_json:
        from runtime.strict import to_json

        emit_json({"out": out, "kind": m.kind, "engine": to_json(e)})
    else:
        click.echo(f"wrote {out}: TensorRT {e.tensorrt_version} engine for {e.gpu_name} "
                   f"(compute capability {e.compute_capability}), built in {e.build.seconds} s")


@click.command("triton")
@click.argument("source", type=click.Path(file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(), help="Model repository dir to write or add to.")
@click.option("--name", default=None, help="Model name in the repository (default: SOURCE's dir name).")
@click.option("--version", "version", type=int, default=1, show_default=True, help="Numeric model version.")
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances per GPU (or on CPU).")
@click.option("--kind", "kind", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True,
              help="Where instances run; auto: GPU for engines, GPU for ONNX when Triton has one.")
@click.option("--force", is_flag=True, help="Replace that model version if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object last on stdout.")
def triton_cmd(source, out, name, version, instances, kind, force, as_json):
    """Write a Triton Inference Server model repository entry for an ONNX artifact or a TensorRT engine dir.

    Layout: OUT/NAME/config.pbtxt and OUT/NAME/VERSION/ with model.onnx (a dir holding model.onnx and its
    external data, for the onnxruntime backend) or model.plan (tensorrt backend). Serve with
    tritonserver --model-repository OUT.
    """
    from export.triton import TritonExport, export_triton

    opts = TritonExport(name=name, version=version, instances=instances, kind=kind)
    res = export_triton(source, out, opts, force=force)
    if as_json:
        emit_json(res)
    else:
        click.echo(f"wrote {res['model_dir']} ({res['platform']}, version {res['version']}); "
                   f"serve with: tritonserver --model-repository {out}")


COMMANDS = [tensorrt_cmd, triton_cmd]
