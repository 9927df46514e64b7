"""Peak RSS and wall time of a subprocess and everything it spawns, with a memory limit that kills it.

Three figures, the largest is reported:
- a poll of /proc every ``poll_s``: the sum of VmRSS over the child and all its live descendants
  (concurrent grandchildren count together), and each one's own VmHWM (high-water mark of its address space
  since its exec, so a short peak between two polls is not missed);
- the kernel's ``ru_maxrss`` from ``os.wait4`` (the child and the descendants it waited for, the largest
  single one), which also covers a peak in the child's last moments. Linux seeds a child's maxrss with the
  parent's memory at fork/exec, so it is used only when it exceeds this (the meter's) own VmHWM at spawn —
  then it can only be the child's. Keep the meter's process small (no torch) and that is the common case.
The limit is checked on the poll: past it the whole process group is killed and the record says at what size.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Measured:
    rc: int  # exit code; negative: killed by that signal
    wall_s: float
    peak_rss_bytes: int
    killed_at_bytes: int | None = None  # set when the memory limit killed it
    timed_out: bool = False
    cpu_s: float = 0.0  # user + system CPU seconds of the child and the descendants it waited for


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])  # fields after "(comm)": state ppid ...
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(pid: int) -> list[int]:
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _mem(pid: int | str) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes; zeros for a process that is gone (or a zombie)."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss, hwm


def tree_mem(pid: int) -> tuple[int, int]:
    """(resident bytes of ``pid`` plus all its live descendants now, the largest VmHWM among them)."""
    mems = [_mem(p) for p in _tree(pid)]
    return sum(r for r, _ in mems), max((h for _, h in mems), default=0)


def run_measured(argv: list[str], env: dict | None = None, cwd: str | Path | None = None,
                 limit_bytes: int | None = None, timeout_s: float | None = None, poll_s: float = 0.2,
                 stdout=None, stderr=None) -> Measured:
    """Run ``argv`` to the end (its own session, so a kill reaches its descendants) and measure it.
    ``stdout`` / ``stderr``: open files (or None to inherit)."""
    own_hwm = _mem("self")[1]
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=env, cwd=cwd, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    peak, killed, timed_out = 0, None, False
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        now, hwm = tree_mem(p.pid)
        peak = max(peak, now, hwm)
        over = limit_bytes is not None and now > limit_bytes
        late = timeout_s is not None and time.perf_counter() - t0 > timeout_s
        if (over or late) and killed is None and not timed_out:
            if over:
                killed = now
            else:
                timed_out = True
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            pid, status, ru = os.wait4(p.pid, 0)
            break
        time.sleep(poll_s)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    kernel = ru.ru_maxrss * 1024
    return Measured(rc=p.returncode, wall_s=wall, peak_rss_bytes=max(peak, kernel if kernel > own_hwm else 0),
                    killed_at_bytes=killed, timed_out=timed_out, cpu_s=ru.ru_utime + ru.ru_stime)
