"""Atomic artifact writes and file hashing (shared by every stage).

``atomic_dir(out)`` builds into a sibling ``.NAME.PID.RANDOM.tmp`` dir, fsyncs it, gives it the modes a plain
``mkdir``/``open`` would have (``0777 & ~umask`` for dirs, ``0666 & ~umask`` for files: an artifact written by
one user can be served by another, as the umask allows), renames it to ``out`` and fsyncs the parent.
``private=True`` keeps it to the owner (``0700`` / ``0600``: caches). A run that was killed leaves its tmp dir
behind; the next ``atomic_dir`` of the same ``out`` removes such dirs when they are clearly abandoned: the exact
name pattern, a real dir owned by this user, older than an hour, its pid not alive here, and the lock its
writer held (``flock`` on the dir) free.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; stale tmp dirs are then left alone
    fcntl = None

STALE_AFTER_S = 3600  # a tmp dir untouched this long, whose writer is gone, is abandoned
_UMASK_LOCK = threading.Lock()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc/self/status), else by setting
    and restoring it under a lock."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def modes(private: bool = False) -> tuple[int, int]:
    """(dir mode, file mode) of what llmkiln writes: what mkdir/open would give under the umask, or
    owner-only."""
    if private:
        return 0o700, 0o600
    mask = current_umask()
    return 0o777 & ~mask, 0o666 & ~mask


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (makes a rename inside it durable); a filesystem that cannot is left alone."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _finish_tree(root: Path, dir_mode: int, file_mode: int) -> None:
    """fsync every file and dir under root (root included) and give them the modes; symlinks are left alone."""
    dirs = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                if stat.S_IMODE(st.st_mode) != file_mode:
                    os.chmod(p, file_mode)
        dirs += [Path(dirpath) / d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    for d in reversed(dirs):
        os.chmod(d, dir_mode)
        fsync_dir(d)


def _tmp_pattern(name: str) -> re.Pattern:
    # exactly what tempfile.mkdtemp(prefix=f".{name}.{pid}.", suffix=".tmp") creates
    return re.compile(rf"\.{re.escape(name)}\.(\d+)\.[a-z0-9_]{{8}}\.tmp")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's (EPERM)
        return True
    return True


def _lock(path: Path, blocking: bool) -> int | None:
    """An fd holding an exclusive flock on dir ``path``, or None when another process holds it (or flock
    is not available)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        if blocking:
            raise
        return None
    return fd


def clean_stale_tmp(out: str | os.PathLike, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the tmp dirs a killed ``atomic_dir(out)`` left beside ``out``; returns what was removed.

    Only dirs named exactly as atomic_dir names them, real dirs (not symlinks) owned by this user, not
    modified for ``older_than_s``, whose recorded pid is not a live process here and whose lock is free."""
    out = Path(out)
    pat = _tmp_pattern(out.name)
    removed = []
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        m = pat.fullmatch(e.name)
        if not m:
            continue
        try:
            st = os.lstat(e.path)
        except OSError:
            continue
        if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or now - st.st_mtime < older_than_s
                or _pid_alive(int(m.group(1)))):
            continue
        try:
            fd = _lock(Path(e.path), blocking=False)
        except OSError:
            continue
        if fd is None:
            continue  # its writer still holds it
        try:
            shutil.rmtree(e.path)
            removed.append(Path(e.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False, error: type[Exception] = FileExistsError,
               private: bool = False):
    """Yield a temporary sibling dir; on success fsync it, give it the umask's modes (owner-only with
    ``private``), rename it to `out` and fsync the parent.

    On any exception the temporary dir is removed and `out` is left as it was.
    An existing `out` is refused unless `force`; with `force` it is replaced only
    after the new one is complete. Tmp dirs a killed run left for the same `out` are removed first
    (``clean_stale_tmp``).
    """
    out = Path(out)
    if out.exists() and not force:
        raise error(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    lock = None
    try:
        lock = _lock(tmp, blocking=True)  # held while this run writes: clean_stale_tmp leaves it alone
        yield tmp
        _finish_tree(tmp, *modes(private))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file: name the output
            e.filename = str(out)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, private: bool = False) -> None:
    """Write ``path`` through a fsynced temporary sibling and a rename: readers see the old file or the new
    one, never half of it. The file gets ``0666 & ~umask`` (``0600`` with ``private``); the parent is fsynced."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), modes(private)[1])
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, private: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), private=private)
