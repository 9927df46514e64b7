"""Shared CLI plumbing: user errors, a missing optional dependency and any OSError (permission denied, a full
disk, a file too large, an address in use) become one line on stderr with exit code 2; --json output."""
from __future__ import annotations

import errno
import importlib.util
import json
import sys

import click

# optional dependency (import name) -> the llmkiln extra that installs it (pyproject.toml)
EXTRA_OF = {
    "onnx": "export",
    "safetensors": "export",
    "google.protobuf": "export",
    "torch": "compress",
    "transformers": "compress",
    "gguf": "compress",
    "accelerate": "compress",
    "yaml": "compress",
    "matplotlib": "report",
    "tensorrt": "gpu",
    "cuda": "gpu",
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from compress.errors import CompressError
    from export.errors import ExportError
    from runtime.errors import EngineError

    return (CompressError, ExportError, EngineError)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or e.__class__.__name__
    return " ".join(msg.split())


_DISK_FULL = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file grew past the size limit",
              errno.EDQUOT: "the disk quota is exhausted"}


def os_error_line(e: OSError) -> str:
    """One line for an OSError: the path(s) it names, what the system said, and the errno's name
    (``/out/model.onnx.data: No space left on device (ENOSPC): ...``)."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    code = errno.errorcode.get(e.errno, "") if isinstance(e.errno, int) else ""
    what = e.strerror or str(e) or type(e).__name__
    msg = f"{paths + ': ' if paths else ''}{what}{f' ({code})' if code else ''}"
    if e.errno in _DISK_FULL:
        msg += f"; {_DISK_FULL[e.errno]}: free space or write the output elsewhere"
    elif isinstance(e, PermissionError):
        msg += "; check that you may read the input and write the output there"
    return " ".join(msg.split())


def _not_installed(name: str) -> bool:
    if sys.modules.get(name) is not None:
        return False
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def missing_extra(e: BaseException, what: str = "this command", torch_stage: bool = True) -> str | None:
    """The one-line message for an optional dependency that is not installed, or None when ``e`` is anything
    else (an unknown module, or one that is installed but fails to import, is a real error: traceback).

    ``torch_stage``: the command also needs torch whenever it needs onnx or safetensors (everything but
    ``kiln export ...``), so name [compress] (which includes [export]) rather than send the user back twice."""
    if not isinstance(e, ModuleNotFoundError) or not e.name:
        return None
    dep = next((d for d in EXTRA_OF if e.name == d or e.name.startswith(d + ".")), None)
    if dep is None or not _not_installed(dep):
        return None
    extra = EXTRA_OF[dep]
    if extra == "export" and torch_stage and _not_installed("torch"):
        extra = "compress"
    return f"{what} needs {dep}, which is not installed: pip install 'llmkiln[{extra}]'"


class KilnGroup(click.Group):
    """A click group whose commands report llmkiln errors, a missing extra and OSErrors as one line and exit 2,
    never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _user_errors() as e:
            click.echo(f"error: {_one_line(e)}", err=True)
            ctx.exit(2)
        except ModuleNotFoundError as e:
            what = f"`{ctx.command_path} {ctx.invoked_subcommand}`"
            msg = missing_extra(e, what, torch_stage=self.name != "export")
            if msg is None:
                raise
            click.echo(f"error: {msg}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except OSError as e:  # permission denied, a full disk, a file too large, a port in use, ...
            click.echo(f"error: {os_error_line(e)}", err=True)
            ctx.exit(2)


def emit_json(obj) -> None:
    """Print one JSON object as the last thing on stdout."""
    click.echo(json.dumps(obj, indent=None, default=str))


def stderr(msg: str) -> None:
    click.echo(msg, err=True)
    sys.stderr.flush()


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_size(text: str, option: str) -> int:
    """'500MB', '2GB', '2.5GiB', '1048576' -> bytes; a click.BadParameter naming ``option`` otherwise."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 500MB, 2GB, 2.5GiB)", param_hint=option)
    return int(float(m.group(1)) * _UNITS[unit])
