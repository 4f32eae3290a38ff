"""Processes for tests/test_liveness.py's takeover races.

``racer_main`` runs in a spawned process and claims the segment when told
to, in step with the other racers (a barrier), so that they all call
``Writer.open`` at once. ``fork_dead_writer`` and ``fork_claimer`` fork the
test process itself: a writer to be killed and a claimer to be paused must
be cheap to make fifty times over. The parent has multiprocessing's queue
feeder threads running then; the children use nothing of theirs (only
shmcache, with its kernels already loaded, and ``os._exit``), so no lock a
feeder thread held at the fork can stop them.
"""

from __future__ import annotations

import os
import signal
import traceback

import numpy as np

BS = 4
CAPACITY = 64
#: Exit codes of a forked claimer.
WON, BUSY = 0, 2


def racer_main(name: str, index: int, barrier, commands, results) -> None:
    """Per command: ``"open"`` waits at the barrier, then tries
    ``Writer.open`` and reports ``(index, "won"|"busy", pid named)``;
    ``"check_close"`` makes a winner check the segment, close it and
    report ``(index, "checked")``; ``"quit"`` ends."""
    from shmcache import Writer, WriterBusyError

    w = None
    while True:
        cmd = commands.get()
        try:
            if cmd == "open":
                barrier.wait()
                try:
                    w = Writer.open(name)
                    results.put((index, "won", os.getpid()))
                except WriterBusyError as e:
                    results.put((index, "busy", e.pid))
            elif cmd == "check_close":
                w.check()
                w.close()
                w = None
                results.put((index, "checked", 0))
            else:
                return
        except Exception:
            results.put((index, "error", traceback.format_exc()))


def forked(fn) -> int:
    """Run ``fn`` in a forked child that exits with what it returns (1 if
    it raises); returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def fork_dead_writer(name: str, crash_step: int) -> int:
    """Fork a process that takes the segment over, starts an insert and is
    SIGKILLed at ``crash_step`` of it (by the writer's crash hook, or after
    the insert if it has fewer steps). Returns its pid, to wait for."""
    def run() -> int:
        from shmcache import Writer

        w = Writer.open(name)
        base = int(w.stats()["writer_epoch"]) * 1000
        w._crash_at_step(crash_step)
        w.insert(np.arange(base, base + 4 * BS, dtype=np.int64), np.arange(base, base + 4))
        os.kill(os.getpid(), signal.SIGKILL)
        return 1

    return forked(run)


def fork_claimer(name: str, stop_at: int) -> int:
    """Fork a process that calls ``Writer.open`` stopping itself (SIGSTOP)
    at claim step ``stop_at``; once continued, it exits WON after checking
    and closing the segment, or BUSY."""
    def run() -> int:
        from shmcache import Writer, WriterBusyError

        try:
            w = Writer.open(name, _stop_at_claim_step=stop_at)
        except WriterBusyError:
            return BUSY
        w.check()
        w.close()
        return WON

    return forked(run)
