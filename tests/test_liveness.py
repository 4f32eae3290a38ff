"""Liveness from kernel locks: PID namespaces, clock steps, takeover races.

Containers of one pod share /dev/shm but not PIDs, and hosts' clocks get
stepped. Whether the writer and each reader are alive is decided by
open-file-description locks (``shmcache.liveness``), never by pids or
start times: these tests hold a segment from another PID namespace
(``unshare --pid``), step what the old identity code read as boot time, and
race claimers against each other and against a claimer paused or killed at
every step of its claim.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import posix_ipc
import psutil
import pytest

import shmcache
import shmcache.writer
from shmcache import Reader, Writer, WriterBusyError
from shmcache.identity import pid_namespace
from shmcache.segment import sem_path

from claimers import BUSY, CAPACITY, WON, fork_claimer, fork_dead_writer, forked, racer_main
from ns_child import PROMPT, VALUES

#: ``ns_child.main`` run with the shmcache this process imported (the
#: checkout's or the installed one), so the child loads the kernels this
#: process compiled rather than compiling another copy's.
CHILD = ("import sys; sys.path[:0] = [{}, {}]; from ns_child import main; main(*sys.argv[1:])"
         .format(repr(str(Path(shmcache.__file__).parent.parent)), repr(str(Path(__file__).parent))))
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"]


def _unshare_problem() -> str | None:
    try:
        subprocess.run(UNSHARE + ["true"], check=True, capture_output=True, timeout=60)
    except FileNotFoundError:
        return "unshare (util-linux) is not installed on this machine"
    except subprocess.CalledProcessError as e:
        return f"unshare --pid is not permitted here ({e.stderr.decode().strip()}): it needs root or user namespaces"
    except subprocess.TimeoutExpired:
        return "unshare --pid did not finish within 60 s here"
    return None


_PROBLEM = _unshare_problem()
needs_unshare = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


class Holder:
    """``ns_child.py`` in a process of its own (in a new PID namespace with
    ``unshare``), talked to over its stdin/stdout."""

    def __init__(self, role: str, name: str, namespace: bool) -> None:
        cmd = (UNSHARE if namespace else []) + [sys.executable, "-c", CHILD, role, name]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid  # until the child is known: what close() would kill

    def start(self) -> "Holder":
        """Wait for the holder's ready line (it exits, and so ends the wait,
        if it fails); then know the python process itself: unshare's child
        when namespaced."""
        assert self.proc.stdout.readline().strip() == "ready", "the holder did not start"
        children = psutil.Process(self.proc.pid).children()
        self.pid = children[0].pid if children else self.proc.pid
        return self

    def ask(self, cmd: str) -> str:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        """SIGKILL the holder and wait until it is gone (its locks with it)."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(60)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture
def holders():
    made: list[Holder] = []
    yield lambda role, name, namespace=True: (made.append(Holder(role, name, namespace)) or made[-1]).start()
    for h in made:
        h.close()


@needs_unshare
def test_a_live_writer_in_another_pid_namespace_is_never_taken_over(shm_name, holders):
    writer = holders("writer", shm_name)
    for _ in range(3):
        with pytest.raises(WriterBusyError, match="another PID namespace"):
            Writer.open(shm_name)
    with Reader.attach(shm_name) as r:
        stats = r.stats()
        assert stats["writer_alive"] and stats["writer_pid_namespace"] != pid_namespace()
        assert r.match_prefix(PROMPT).values.tolist() == VALUES
    writer.kill()
    with Writer.open(shm_name) as w:  # at once: no grace period
        assert w.stats()["writer_epoch"] == 2 and w.stats()["writer_pid"] == os.getpid()
        assert w.match_prefix(PROMPT).values.tolist() == VALUES
        w.check()


@needs_unshare
def test_a_live_reader_in_another_pid_namespace_keeps_its_pins(shm_name, holders):
    with Writer.create(shm_name, capacity=64, block_size=4) as w:
        w.insert(PROMPT, VALUES)
        reader = holders("reader", shm_name)
        assert reader.ask("pins") == "8 1"
        for _ in range(5):
            assert w.reap_readers() == 0
            with Reader.attach(shm_name) as other:  # never steals the namespaced reader's slot
                assert other.match_and_pin(PROMPT).length == len(PROMPT)
        assert w.evict(64).tolist() == []
        assert w.stats()["reader_pinned_blocks"] == 8
        assert reader.ask("pins") == "8 1"
        reader.kill()
        assert w.reap_readers() == 1  # the first reap after the death: no grace period
        assert w.stats()["reader_pinned_blocks"] == 0
        assert sorted(w.evict(64).tolist()) == VALUES
        w.check()


def test_liveness_reads_no_clock_and_no_process_table():
    """Creating, claiming, attaching, pinning and reaping never import psutil
    (whose start times move with the wall clock) in a fresh interpreter."""
    code = (
        "import sys, uuid, numpy as np, shmcache\n"
        "name = 't-noclock-' + uuid.uuid4().hex[:12]\n"
        "try:\n"
        "    with shmcache.Writer.create(name, capacity=8, block_size=4) as w:\n"
        "        w.insert(np.arange(8), [1, 2])\n"
        "        with shmcache.Reader.attach(name) as r:\n"
        "            h = r.match_and_pin(np.arange(8)); r.stats(); w.reap_readers(); w.stats()\n"
        "    shmcache.Writer.open(name).close()\n"
        "finally:\n"
        "    shmcache.unlink(name)\n"
        "assert 'psutil' not in sys.modules, 'psutil was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_a_stepped_clock_changes_nothing(shm_name, holders, monkeypatch):
    """What the pid-and-start-time identity read moves when the wall clock
    is stepped (psutil's boot time is re-read from /proc/stat); shifting it
    here must neither displace a live writer nor reclaim a live reader."""
    writer = holders("writer", shm_name, namespace=False)
    real_boot = psutil.boot_time()
    monkeypatch.setattr(psutil, "boot_time", lambda: real_boot + 1.0)
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: real_boot + 1.0)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600.0)
    with pytest.raises(WriterBusyError, match=str(writer.pid)):
        Writer.open(shm_name)
    writer.kill()
    with Writer.open(shm_name) as w:
        reader = holders("reader", shm_name, namespace=False)
        assert w.reap_readers() == 0 and w.stats()["reader_pinned_blocks"] == 8
        assert reader.ask("pins") == "8 1"


def _race(commands, results, n: int) -> list[int]:
    """Have every racer claim at once; returns the indices of the winners."""
    for q in commands:
        q.put("open")
    got = [results.get(timeout=120) for _ in range(n)]
    assert all(kind in ("won", "busy") for _, kind, _ in got), got
    return [i for i, kind, _ in got if kind == "won"]


def _check_close(commands, results, winners: list[int]) -> None:
    for i in winners:
        commands[i].put("check_close")
        assert results.get(timeout=120) == (i, "checked", 0)


def _reap(pid: int) -> None:
    """Kill and reap a forked child that a failed assertion left behind."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _wait(pid: int) -> int:
    """Wait for a forked child to exit; returns its exit code (-signal if killed)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def racers(shm_name, spawn):
    """Eight spawned claimers of ``shm_name`` (a segment that exists)."""
    n = 8
    Writer.create(shm_name, capacity=CAPACITY, block_size=4).close()
    barrier, results = spawn.Barrier(n), spawn.Queue()
    commands = [spawn.Queue() for _ in range(n)]
    procs = [spawn.Process(target=racer_main, args=(shm_name, i, barrier, commands[i], results)) for i in range(n)]
    for p in procs:
        p.start()
    try:
        yield commands, results
    finally:
        for q in commands:
            q.put("quit")
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
                p.join()


def test_racing_claimers_of_a_killed_writer_exactly_one_wins(racers, shm_name):
    commands, results = racers
    for round_ in range(50):
        assert _wait(fork_dead_writer(shm_name, crash_step=1 + round_ % 23)) == -signal.SIGKILL
        winners = _race(commands, results, len(commands))
        assert len(winners) == 1, f"round {round_}: winners {winners}"
        _check_close(commands, results, winners)


@pytest.mark.parametrize("action", ["continue", "kill"])
def test_a_claimer_paused_or_killed_at_every_step_of_its_claim(racers, shm_name, action):
    """A claimer stopped at each step of its claim: before it holds the
    lock (steps 1-2) one racer wins meanwhile and it is refused once it
    goes on; from step 3 it holds the lock, every racer is refused, and it
    wins when it goes on, or, killed there, a racer wins after it."""
    commands, results = racers
    for step in range(1, shmcache.writer.CLAIM_STEPS + 1):
        assert _wait(fork_dead_writer(shm_name, crash_step=step)) == -signal.SIGKILL
        claimer = fork_claimer(shm_name, stop_at=step)
        try:
            _, status = os.waitpid(claimer, os.WUNTRACED)
            assert os.WIFSTOPPED(status), f"step {step}: claimer did not stop"
            winners = _race(commands, results, len(commands))
            assert len(winners) == (1 if step < 3 else 0), f"step {step}: winners {winners}"
            if action == "continue":
                os.kill(claimer, signal.SIGCONT)
                assert _wait(claimer) == (BUSY if step < 3 else WON), f"step {step}"
            else:
                os.kill(claimer, signal.SIGKILL)
                assert _wait(claimer) == -signal.SIGKILL
                if step >= 3:
                    winners = _race(commands, results, len(commands))
                    assert len(winners) == 1, f"step {step}: winners after the kill {winners}"
        finally:
            _reap(claimer)
        _check_close(commands, results, winners)


def test_the_semaphore_count_decides_nothing(shm_name):
    """The semaphore is only the gate of a claim: posted too often, left
    taken by a claimer that died inside it, or removed, the segment still
    has exactly one writer and can always be opened."""
    Writer.create(shm_name, capacity=8, block_size=4).close()
    gate = posix_ipc.Semaphore(sem_path(shm_name))
    try:
        for _ in range(5):
            gate.release()
        with Writer.open(shm_name):
            with pytest.raises(WriterBusyError):
                Writer.open(shm_name)
        while gate.value:
            gate.acquire(0)
        with Writer.open(shm_name):  # after GATE_WAIT_S, and heals the gate
            assert gate.value == 1
            with pytest.raises(WriterBusyError):
                Writer.open(shm_name)
    finally:
        gate.close()
    posix_ipc.unlink_semaphore(sem_path(shm_name))
    with Writer.open(shm_name) as w:
        w.check()
    assert Writer.open(shm_name).close() is None


def _in_fork(fn) -> int:
    """Run ``fn`` in a forked child; its exit code."""
    return _wait(forked(lambda: (fn(), 0)[1]))


def test_a_forked_child_closing_inherited_handles_leaves_the_parents_alone(shm_name):
    """A child made by fork shares its parent's lock descriptions: closing
    the Reader and Writer it inherited (or exiting) only unmaps them."""
    from ns_child import PROMPT, VALUES

    with Writer.create(shm_name, capacity=64, block_size=4) as w, Reader.attach(shm_name) as r:
        w.insert(PROMPT, VALUES)
        h = r.match_and_pin(PROMPT)
        assert _in_fork(lambda: (r.close(), w.close(unlink=True))) == 0
        assert r.stats()["pinned_entries"] == 8 and h.pinned
        assert w.reap_readers() == 0 and w.stats()["reader_pinned_blocks"] == 8
        with Reader.attach(shm_name) as other:
            assert other._slot != r._slot
        with pytest.raises(WriterBusyError):
            Writer.open(shm_name)
        assert w.evict(64).tolist() == []
        w.check()


def test_closing_with_unlink_never_removes_a_newer_segment_of_the_name(shm_name):
    old = Writer.create(shm_name, capacity=8, block_size=4)
    shmcache.unlink(shm_name)  # removed under its writer: a mistake, but a survivable one
    with Writer.create(shm_name, capacity=8, block_size=4) as new:
        old.close(unlink=True)
        new.insert(PROMPT[:8], [1, 2])
        assert shmcache.exists(shm_name)


def test_a_writer_that_fails_to_start_releases_the_segment(shm_name, monkeypatch):
    Writer.create(shm_name, capacity=8, block_size=4).close()

    def no_memory(*args):
        raise MemoryError

    monkeypatch.setattr(shmcache.writer, "new_arrays", no_memory)
    with pytest.raises(MemoryError):
        Writer.open(shm_name)
    monkeypatch.undo()
    with Writer.open(shm_name) as w:
        w.check()


def test_a_killed_embedded_writers_pins_are_gone_after_open_and_a_readers_stay(shm_name):
    """Writer pins are held through the Writer's handles: a SIGKILLed
    embedded writer's go with it; a live reader's pins stay."""
    with Writer.create(shm_name, capacity=64, block_size=4) as w:
        w.insert(PROMPT, VALUES)
        w.insert(PROMPT + 1000, [v + 1000 for v in VALUES])
    with Reader.attach(shm_name) as r:
        held = r.match_and_pin(PROMPT + 1000)

        def pin_and_die():
            killed = Writer.open(shm_name)
            assert killed.pin(PROMPT).length == len(PROMPT)
            os.kill(os.getpid(), signal.SIGKILL)

        assert _in_fork(pin_and_die) == -signal.SIGKILL
        with Writer.open(shm_name) as w:
            assert w.stats()["pinned_blocks"] == 0 and w.stats()["reader_pinned_blocks"] == 8
            assert sorted(w.evict(64).tolist()) == VALUES  # the dead writer's pins held nothing
            assert held.pinned and r.match_prefix(PROMPT + 1000).length == len(PROMPT)
            w.check()
