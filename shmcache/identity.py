"""Process identity that survives pid reuse: (pid, start time), as psutil sees it.

The writer lock and the reader table record both words; a holder is alive
only if a process with that pid exists, is not a zombie, and started at the
recorded time. A recycled pid has a different start time.
"""

from __future__ import annotations

import os

import psutil


def start_time_us(pid: int) -> int | None:
    """Start time of a running process in microseconds since the epoch, or None."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return round(proc.create_time() * 1e6)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def is_gone(pid: int) -> bool:
    """Whether no running process has this pid (a zombie counts as gone)."""
    return pid <= 0 or start_time_us(pid) is None


def is_alive(pid: int, start_us: int) -> bool:
    """Whether the process recorded as ``(pid, start_us)`` is still running."""
    if pid <= 0:
        return False
    now = start_time_us(pid)
    return now is not None and now == start_us


def me() -> tuple[int, int]:
    """``(pid, start time)`` of this process."""
    pid = os.getpid()
    start = start_time_us(pid)
    assert start is not None
    return pid, start
