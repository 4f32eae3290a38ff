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

import shmcache.writer
from shmcache import Reader, Writer, WriterBusyError
from shmcache.identity import pid_namespace
from shmcache.segment import sem_path

from claimers import BUSY, CAPACITY, WON, fork_claimer, fork_dead_writer, racer_main
from ns_child import PROMPT, VALUES

CHILD = str(Path(__file__).with_name("ns_child.py"))
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"]


def _unshare_problem() -> str | None:
    try:
        subprocess.run(UNSHARE + ["true"], check=True, capture_output=True, timeout=60)
    except FileNotFoundError:
        return "unshare (util-linux) is not installed on this machine"
    except subprocess.CalledProcessError as e:
        return f"unshare --pid is not permitted here ({e.stderr.decode().strip()}): it needs root or user namespaces"
    return None


needs_unshare = pytest.mark.skipif(bool(_unshare_problem()), reason=str(_unshare_problem()))


class Holder:
    """``ns_child.py`` in a process of its own (in a new PID namespace with
    ``unshare``), talked to over its stdin/stdout."""

    def __init__(self, role: str, name: str, namespace: bool) -> None:
        cmd = (UNSHARE if namespace else []) + [sys.executable, CHILD, role, name]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready", f"{role} holder did not start"
        # The python process itself: unshare's child when namespaced.
        self.pid = psutil.Process(self.proc.pid).children()[0].pid if namespace else self.proc.pid

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
    yield lambda role, name, namespace=True: made.append(Holder(role, name, namespace)) or made[-1]
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
        started = time.monotonic()
        assert w.reap_readers() == 1
        assert time.monotonic() - started < 1.0
        assert w.stats()["reader_pinned_blocks"] == 0
        assert sorted(w.evict(64).tolist()) == VALUES
        w.check()


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
