"""Item 12: what llmkiln writes gets the modes the umask gives a plain mkdir/open (an artifact written by one
user can be served by another), and the tmp dirs a killed run left beside an output are removed by the next
run only when they are clearly abandoned."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.fsutil import atomic_dir, atomic_write_text, clean_stale_tmp, current_umask


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask):
        os.umask(mask)

    yield set_
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


@pytest.mark.parametrize("mask,dmode,fmode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_exported_artifact_modes_follow_the_umask(tiny_dir, tmp_path, umask, mask, dmode, fmode):
    from export.onnx import export_onnx

    umask(mask)
    assert current_umask() == mask
    out = tmp_path / "art"
    export_onnx(str(tiny_dir), out, validate=False)
    got = _modes(out)
    assert "kiln.json" in got and "model.onnx.data" in got
    assert {n: m for n, m in got.items() if (out / n).is_dir()} == {".": dmode}
    assert {n: m for n, m in got.items() if not (out / n).is_dir()} == {n: fmode for n in got if n != "."}


@pytest.mark.parametrize("mask,fmode", [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_write_text_follows_the_umask(tmp_path, umask, mask, fmode):
    umask(mask)
    p = tmp_path / "report.json"
    atomic_write_text(p, "{}\n")
    assert stat.S_IMODE(os.stat(p).st_mode) == fmode and p.read_text() == "{}\n"
    atomic_write_text(p, "[]\n", private=True)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert [x.name for x in tmp_path.iterdir()] == ["report.json"]


def test_private_dirs_stay_with_the_owner(tmp_path, umask):
    umask(0o002)
    with atomic_dir(tmp_path / "cache", private=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("x")
    assert set(_modes(tmp_path / "cache").values()) <= {0o700, 0o600}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _tmpdir(parent: Path, name: str, age_s: float) -> Path:
    d = parent / name
    d.mkdir()
    (d / "shard.safetensors").write_bytes(b"\0" * 1024)
    t = time.time() - age_s
    os.utime(d, (t, t))
    return d


def test_stale_tmp_dirs_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    dead, hour = _dead_pid(), 3600
    stale = _tmpdir(tmp_path, f".art.{dead}.abcd_123.tmp", 2 * hour)
    keep = [
        _tmpdir(tmp_path, f".art.{dead}.fresh123.tmp", 60),  # recent: maybe a writer on another host
        _tmpdir(tmp_path, f".art.{os.getpid()}.alive123.tmp", 2 * hour),  # its pid is alive
        _tmpdir(tmp_path, f".art.{dead}.abcd.tmp", 2 * hour),  # not a name atomic_dir makes
        _tmpdir(tmp_path, f".other.{dead}.abcd1234.tmp", 2 * hour),  # another output's
        _tmpdir(tmp_path, f".art.old-{dead}", 2 * hour),  # the previous artifact of an interrupted --force
    ]
    target = _tmpdir(tmp_path, "elsewhere", 2 * hour)
    link = tmp_path / f".art.{dead}.link1234.tmp"
    link.symlink_to(target)  # a symlink named like ours: not followed, not removed
    locked = _tmpdir(tmp_path, f".art.{dead}.locked12.tmp", 2 * hour)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(locked)!r}, os.O_RDONLY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t = time.time() - 2 * hour
        os.utime(locked, (t, t))
        with atomic_dir(tmp_path / "art") as tmp:
            (tmp / "kiln.json").write_text("{}")
    finally:
        holder.kill()
        holder.wait()
    assert not stale.exists()
    for d in keep + [target, locked]:
        assert d.is_dir() and (d / "shard.safetensors").is_file(), d
    assert link.is_symlink()
    assert (tmp_path / "art" / "kiln.json").is_file()
    assert clean_stale_tmp(tmp_path / "art") == [locked]  # its writer is gone now


def test_a_running_writer_keeps_its_tmp_dir(tmp_path):
    """The writer's own tmp dir (its pid alive, its lock held) is never removed, however old."""
    with atomic_dir(tmp_path / "art") as tmp:
        t = time.time() - 7200
        os.utime(tmp, (t, t))
        assert clean_stale_tmp(tmp_path / "art", older_than_s=0) == []
        assert tmp.is_dir()
