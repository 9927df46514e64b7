"""Is this engine runnable here? Pure checks of kiln.json's ``engine`` block against the local TensorRT and GPU.

TensorRT's compatibility rules (documentation, "Version Compatibility" / "Hardware Compatibility"):
- an engine runs only on the TensorRT version that built it, unless it was built with
  ``BuilderFlag.VERSION_COMPATIBLE`` — then on that version and any later one (10.x engines run on 11.x);
- an engine runs only on a GPU of the compute capability it was built for; another GPU model with the
  same compute capability works but may be slower (a warning, not an error).

Both mismatches say exactly what to rebuild: the ``kiln export tensorrt`` command with the recorded flags.
"""
from __future__ import annotations

import shlex

from ..errors import EngineError
from ..records import EngineInfo

INSTALL_HINT = "pip install 'llmkiln[gpu]' (TensorRT and cuda-python; needs an NVIDIA GPU)"


def parse_version(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(v).split("+")[0].split(".")[:3])
    except ValueError:
        raise EngineError(f"TensorRT version {v!r} is not of the form MAJOR.MINOR.PATCH") from None


def parse_cc(cc) -> tuple[int, int]:
    """'9.0' / [9, 0] / (9, 0) -> (9, 0)."""
    try:
        parts = cc.split(".") if isinstance(cc, str) else list(cc)
        major, minor = (int(p) for p in parts)
        return major, minor
    except (ValueError, TypeError, AttributeError):
        raise EngineError(f"compute capability {cc!r} is not of the form MAJOR.MINOR") from None


def rebuild_command(engine: EngineInfo, engine_dir: str) -> str:
    """The ``kiln export tensorrt`` command that rebuilds this engine with the same flags, here."""
    src = engine.source_artifact.path if engine.source_artifact else "ONNX_ARTIFACT"
    b = engine.build
    args = ["kiln", "export", "tensorrt", str(src), "-o", str(engine_dir), "--force",
            "--max-batch", str(b.max_batch), "--max-seq", str(b.max_seq), "--opt-seq", str(b.opt_seq)]
    if b.workspace_gb is not None:
        args += ["--workspace-gb", str(b.workspace_gb)]
    if b.version_compatible:
        args.append("--version-compatible")
    return " ".join(shlex.quote(a) for a in args)


def trust_refusal(engine_dir: str) -> str:
    """The one-line refusal of a version-compatible engine loaded without trust."""
    return (f"{engine_dir}: this TensorRT engine was built with --version-compatible, so its plan carries "
            "TensorRT's lean runtime (native code that runs when it loads); load it only if you trust where it "
            "came from, with --trust-engine-code (Engine.load(..., trust_engine_code=True)), or rebuild it on "
            "this machine without --version-compatible")


def check_engine_block(engine: EngineInfo | None, where: str) -> EngineInfo:
    """The ``engine`` record of an engine artifact's kiln.json (strictly parsed when it was read)."""
    if not isinstance(engine, EngineInfo):
        raise EngineError(f"{where}: kiln.json of kind 'engine' has no 'engine' block; re-create the engine "
                          "with kiln export tensorrt")
    return engine


def compatibility(engine: EngineInfo, *, trt_version: str, compute_capability, gpu_name: str,
                  engine_dir: str) -> list[str]:
    """Raise EngineError when the engine cannot run here; return warnings when it can but may be slower."""
    engine = check_engine_block(engine, engine_dir)
    built, here = parse_version(engine.tensorrt_version), parse_version(trt_version)
    cc_built, cc_here = parse_cc(engine.compute_capability), parse_cc(compute_capability)
    vc = engine.build.version_compatible
    problems = []
    if vc:
        if here < built:
            problems.append(f"it was built with TensorRT {engine.tensorrt_version} (version-compatible: runs "
                            f"on that version or newer) and this machine has older TensorRT {trt_version}")
    elif here != built:
        problems.append(f"it was built with TensorRT {engine.tensorrt_version} and this machine has "
                        f"TensorRT {trt_version} (engines run only on the version that built them unless built "
                        "with --version-compatible)")
    if cc_here != cc_built:
        problems.append(f"it was built for compute capability {cc_built[0]}.{cc_built[1]} "
                        f"({engine.gpu_name}) and this GPU ({gpu_name}) is {cc_here[0]}.{cc_here[1]}")
    if problems:
        raise EngineError(f"{engine_dir}: this TensorRT engine cannot run here: {'; '.join(problems)}. "
                          f"Rebuild it on this machine: {rebuild_command(engine, engine_dir)}")
    warnings = []
    if gpu_name != engine.gpu_name:
        warnings.append(f"{engine_dir}: built on {engine.gpu_name}, running on {gpu_name} (same compute "
                        f"capability; rebuild here for best speed: {rebuild_command(engine, engine_dir)})")
    return warnings
