"""Item 13: an OSError during a command (a full disk, a file size limit, permission denied) and a kiln.json
field of the wrong type are one line on stderr and exit code 2, never a traceback; nothing half-written stays.

A full disk is simulated with a real file-size limit: RLIMIT_FSIZE in a child process (SIGXFSZ ignored) makes
the kernel fail the write that crosses it with EFBIG, a real OSError from the kernel on the same write path
as ENOSPC (no tmpfs can be mounted here without root)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kiln.cli import cli

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from kiln.cli import main
sys.argv = ["kiln"] + sys.argv[2:]
main()
"""


def _kiln_with_file_limit(limit: int, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", CHILD, str(limit), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_write_past_the_file_size_limit_is_one_line(tiny_dir, tmp_path):
    out = tmp_path / "art"
    p = _kiln_with_file_limit(64 << 10, "export", "onnx", tiny_dir, "-o", out, "--no-validate")
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert lines[-1].startswith(f"error: {out}: File too large (EFBIG)"), lines[-1]
    assert "free space or write the output elsewhere" in lines[-1]
    assert not out.exists() and not [x for x in tmp_path.iterdir() if x.name.startswith(".art.")]


def test_permission_denied_is_one_line(tiny_onnx, tmp_path):
    """Writing where one may not: a read-only dir (as root, which may write anywhere else, /sys)."""
    if os.getuid() == 0:
        repo = Path("/sys/kiln-test-repo")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        repo = tmp_path / "ro" / "repo"
    r = CliRunner().invoke(cli, ["export", "triton", str(tiny_onnx), "-o", str(repo)])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "(EPERM)" in r.stderr or "(EACCES)" in r.stderr


def _broken(art: Path, tmp_path: Path, edit) -> Path:
    import shutil

    dst = tmp_path / "broken"
    shutil.copytree(art, dst)
    kj = json.loads((dst / "kiln.json").read_text())
    edit(kj)
    (dst / "kiln.json").write_text(json.dumps(kj))
    return dst


@pytest.mark.parametrize("edit,field", [
    (lambda kj: kj.update(files=["model.onnx"]), "files: expected an object"),
    (lambda kj: kj["files"]["model.onnx"].update(size="12"), "files.model.onnx.size: expected an integer"),
    (lambda kj: kj["architecture"].update(max_position="2048"), "architecture.max_position: expected an integer"),
    (lambda kj: kj["architecture"].update(max_position=None), "architecture.max_position: expected an integer"),
])
@pytest.mark.parametrize("cmd", ["run", "info"])
def test_manifest_fields_of_the_wrong_type_are_one_line(tiny_onnx, tmp_path, edit, field, cmd):
    art = _broken(tiny_onnx, tmp_path, edit)
    args = ["run", str(art), "hi", "--max-new-tokens", "1"] if cmd == "run" else ["info", str(art)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert field in r.stderr, r.stderr
