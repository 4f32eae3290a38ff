"""Liveness from the kernel: open-file-description locks on the segment object.

Whether a segment's writer, and each reader-table slot's holder, is alive
is decided by a write lock on one byte of the segment's shared-memory
object (``layout.LOCK_WRITER``, ``layout.reader_lock_byte``), taken with
``F_OFD_SETLK`` as libmdbx does for its reader table. The kernel drops an
open-file-description lock when the last descriptor and mapping of that
description go away, so a holder that dies (SIGKILL included) loses its
locks at once, and a live holder keeps them whatever PID namespace it runs
in, whatever pid the kernel hands out next, and whatever the wall clock
does. No pid, start time or clock is read to decide liveness: the pids the
segment records are for people (``shmcache.identity``).

Contract and caveats:

* A lock belongs to an open file description, not to a process or thread.
  Two descriptions of one object conflict even inside one process (two
  Writers of one segment in one process exclude each other), and asking
  through the holder's own description (``is_held``) answers "not held".
* A child made by ``fork`` shares its parent's descriptions and so their
  locks: the holder counts as alive until both have exited or closed them.
  The descriptors shmcache keeps are close-on-exec, so ``subprocess``
  children do not inherit them.
* Linux 3.15 or later (``F_OFD_*``). Processes that share a segment must
  share the ``/dev/shm`` mount it lives on (in Kubernetes, one
  ``emptyDir`` with ``medium: Memory`` mounted at ``/dev/shm`` in every
  container of the pod); they need not share anything about PIDs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from .errors import ShmCacheError

#: ``struct flock`` on 64-bit Linux: l_type, l_whence, l_start, l_len,
#: l_pid (0 for OFD locks), padded to 32 bytes.
_FLOCK = struct.Struct("@hhqqi4x")
_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
_GETLK = getattr(fcntl, "F_OFD_GETLK", None)


def _call(fd: int, cmd: int | None, kind: int, byte: int) -> bytes:
    if cmd is None:
        raise ShmCacheError("shmcache needs open-file-description locks (F_OFD_SETLK): Linux 3.15 or later")
    return fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))


def try_lock(fd: int, byte: int) -> bool:
    """Take the write lock on ``byte`` through ``fd``'s description without
    waiting. Returns True if this description holds it now (also when it
    already did), False if another description holds it."""
    try:
        _call(fd, _SETLK, fcntl.F_WRLCK, byte)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def unlock(fd: int, byte: int) -> None:
    """Release this description's lock on ``byte`` (a no-op if it holds none)."""
    _call(fd, _SETLK, fcntl.F_UNLCK, byte)


def is_held(fd: int, byte: int) -> bool:
    """Whether a description other than ``fd``'s holds the lock on ``byte``:
    whether the holder that byte stands for is alive."""
    return _FLOCK.unpack(_call(fd, _GETLK, fcntl.F_WRLCK, byte))[0] != fcntl.F_UNLCK
