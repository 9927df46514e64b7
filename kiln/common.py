"""Shared CLI plumbing: user errors become one line on stderr with exit code 2; --json output."""
from __future__ import annotations

import json
import sys

import click


def _user_errors() -> tuple[type[BaseException], ...]:
    from compress.errors import CompressError
    from export.errors import ExportError
    from runtime.errors import EngineError

    return (CompressError, ExportError, EngineError)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or e.__class__.__name__
    return " ".join(msg.split())


class KilnGroup(click.Group):
    """A click group whose commands report llmkiln errors as one line and exit 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _user_errors() as e:
            click.echo(f"error: {_one_line(e)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def emit_json(obj) -> None:
    """Print one JSON object as the last thing on stdout."""
    click.echo(json.dumps(obj, indent=None, default=str))


def stderr(msg: str) -> None:
    click.echo(msg, err=True)
    sys.stderr.flush()
