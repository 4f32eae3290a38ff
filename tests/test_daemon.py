"""The daemon and its clients, in real separate processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import shmcache
from shmcache import Client, DaemonUnavailableError, InvalidInputError, Reader, Writer

from daemon_proc import Served, checking_reader, producer
from helpers import owned_values


@pytest.fixture
def served(shm_name):
    d = Served(shm_name, 4096)
    yield d
    d.kill()


def test_serve_prints_ready_and_stops_cleanly(shm_name):
    d = Served(shm_name, 1000)
    try:
        assert d.ready.startswith(f"ready name={shm_name} socket=/dev/shm/shmcache.{shm_name}.sock capacity=1000 block_size=4")
        assert os.stat(f"/dev/shm/shmcache.{shm_name}.sock").st_mode & 0o777 == 0o600
        with Client.connect(shm_name) as c:
            assert c.insert(np.arange(8), [1, 2]) == 0
        assert d.stop() == 0
    finally:
        d.kill()
    assert not os.path.exists(f"/dev/shm/shmcache.{shm_name}")
    assert not os.path.exists(f"/dev/shm/shmcache.{shm_name}.sock")
    assert not os.path.exists(f"/dev/shm/sem.shmcache.{shm_name}.writer")


def test_serve_refuses_a_segment_held_by_a_live_writer(shm_name):
    with Writer.create(shm_name, capacity=8, block_size=4):
        done = subprocess.run([sys.executable, "-m", "shmcache.cli", "serve", shm_name, "--capacity", "8"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {os.getpid()}" in lines[0] and "cannot start" in lines[0]


def test_client_round_trip_errors_and_local_match(served):
    with Client.connect(served.name) as c:
        assert c.insert(np.arange(16), [1, 2, 3, 4]) == 0
        assert c.insert(np.arange(16).tolist(), [9, 9, 9, 9]) == 16
        assert c.match_prefix(np.arange(18)).values.tolist() == [1, 2, 3, 4]
        assert c.match_prefix.__self__ is c.reader  # the Reader's own method: no extra layer
        with pytest.raises(InvalidInputError, match="already cached"):
            c.insert(np.arange(8) + 100, [1, 7])
        with pytest.raises(InvalidInputError, match="token 1 is -1"):
            c.insert([0, -1, 2, 3], [5])
        assert c.pin(np.arange(8)) == 8 and c.unpin(np.arange(8)) == 8
        assert c.remove([3]) == 2
        assert c.match_prefix(np.arange(16)).length == 8


def test_producers_in_parallel_and_eviction_delivered_exactly_once(shm_name, spawn):
    d = Served(shm_name, 64)
    done = [spawn.Event() for _ in range(2)]
    drain, release, stop, matching = spawn.Event(), spawn.Event(), spawn.Event(), spawn.Event()
    results, checks = spawn.Queue(), spawn.Queue()
    # The producers start once the reader is matching, so it runs alongside them.
    procs = [spawn.Process(target=producer, args=(shm_name, i, 300, matching, done[i], drain, release, results)) for i in range(2)]
    reader = spawn.Process(target=checking_reader, args=(shm_name, 2, 300, matching, stop, checks))
    procs.append(reader)
    try:
        for p in procs:
            p.start()
        for e in done:
            assert e.wait(300)
        stop.set()
        matches, hits, wrong = checks.get(timeout=60)
        assert wrong == 0 and matches > 100 and hits > 0, (matches, hits, wrong)
        drain.set()
        got = {}
        for _ in range(2):
            index, client, inserted, evicted = results.get(timeout=60)
            got[client] = (set(inserted), evicted)
        with Reader.attach(shm_name) as r:
            live = owned_values(r._map.data, r._map.geometry)
            r.check()
        for client, (inserted, evicted) in got.items():
            assert len(evicted) == len(set(evicted)), "a value was delivered twice"
            assert set(evicted) <= inserted
            assert inserted - set(evicted) == live.get(client, set()), "a dropped value was never delivered"
        assert sum(len(e) for _, e in got.values()) == 2 * 600 - 64
        release.set()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        with Client.connect(shm_name) as c:  # one round trip: the producers' disconnects are processed
            c.remove([])
            assert c.reader.stats()["live_blocks"] == 0
        assert d.stop() == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        d.kill()


def _insert_and_die(name, how):
    from shmcache import Client

    c = Client.connect(name)
    c.insert(np.arange(40, 56), [40, 41, 42, 43])
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    c.close()


@pytest.mark.parametrize("how", ["close", "kill"])
def test_a_departed_client_takes_its_blocks_and_pins(served, spawn, how):
    with Client.connect(served.name) as keeper:
        keeper.insert(np.arange(40, 48), [1, 2])  # a prefix the dying client extends
        p = spawn.Process(target=_insert_and_die, args=(served.name, how))
        p.start()
        p.join(120)
        keeper.remove([])
        assert keeper.match_prefix(np.arange(40, 56)).values.tolist() == [1, 2]
        assert keeper.reader.stats()["live_blocks"] == 2


def test_daemon_killed_clients_fail_fast_readers_answer_and_a_new_daemon_takes_over(shm_name):
    d = Served(shm_name, 256)
    try:
        c = Client.connect(shm_name)
        c.insert(np.arange(16), [1, 2, 3, 4])
        d.kill()
        with pytest.raises(DaemonUnavailableError):
            c.insert(np.arange(16) + 50, [5, 6, 7, 8])
        with pytest.raises(DaemonUnavailableError):
            c.insert(np.arange(16) + 50, [5, 6, 7, 8])
        assert c.match_prefix(np.arange(16)).values.tolist() == [1, 2, 3, 4]
        d = Served(shm_name, 256)
        assert d.ready.startswith("ready")
        assert c.match_prefix(np.arange(16)).values.tolist() == [1, 2, 3, 4]
        with Client.connect(shm_name) as c2:
            assert c2.insert(np.arange(16) + 50, [5, 6, 7, 8]) == 0
            c2.reader.check()
        c.close()
        assert d.stop() == 0
    finally:
        d.kill()
        shmcache.unlink(shm_name)


def test_no_daemon_is_a_clear_error(shm_name):
    with Writer.create(shm_name, capacity=8, block_size=4):
        with pytest.raises(DaemonUnavailableError, match="shmcache serve"):
            Client.connect(shm_name)


def test_keep_on_disconnect_leaves_a_clients_blocks(shm_name, spawn):
    d = Served(shm_name, 256, "--on-disconnect", "keep")
    try:
        p = spawn.Process(target=_insert_and_die, args=(shm_name, "kill"))
        p.start()
        p.join(120)
        with Client.connect(shm_name) as c:
            c.remove([])
            assert c.match_prefix(np.arange(40, 56)).values.tolist() == [40, 41, 42, 43]
        assert d.stop() == 0
    finally:
        d.kill()


@pytest.mark.parametrize("args, fragment", [
    (["--capacity", "0"], "capacity must be between"),
    (["--capacity", "64", "--block-size", "0"], "block_size must be between"),
    (["--capacity", "64", "--socket", "/x" * 80], "too long for a Unix socket"),
    (["--capacity", "64", "--spin-us", "-1"], "spin_us must be"),
    (["--capacity", str(min(2**31 - 1, os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize // 80))],
     "/dev/shm cannot hold"),
])
def test_serve_bad_arguments_exit_1_with_one_line(shm_name, args, fragment):
    done = subprocess.run([sys.executable, "-m", "shmcache.cli", "serve", shm_name, *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], done.stderr
    assert not shmcache.exists(shm_name)


def test_daemon_reclaims_a_dead_readers_pins_within_its_interval(served, spawn):
    """A reader process pins blocks and is SIGKILLed; the idle daemon frees
    its reader slot and pins within its reap interval (1 s), and the room
    they held can be used again."""
    from churn import pin_and_hold

    with Client.connect(served.name) as keeper:
        pinned = np.arange(100_000, 100_000 + 4 * 1024)
        keeper.insert(pinned, np.arange(1024))
        ready, release, out = spawn.Event(), spawn.Event(), spawn.Queue()
        p = spawn.Process(target=pin_and_hold, args=(served.name, [pinned], ready, release, out))
        p.start()
        try:
            assert ready.wait(120)
            assert len(out.get(timeout=10)[0]) == 1024
            with pytest.raises(shmcache.CacheFullError):
                keeper.insert(np.arange(4 * 4096), np.arange(10_000, 14_096))  # needs the pinned room
            p.kill()
            p.join(30)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 10 and _reader_slot_of(keeper.reader, p.pid) is not None:
                time.sleep(0.01)
            reclaimed_s = time.monotonic() - t0
        finally:
            if p.is_alive():
                p.kill()
            p.join()
        assert _reader_slot_of(keeper.reader, p.pid) is None
        assert reclaimed_s < 3.0, f"reclaimed after {reclaimed_s:.2f} s"
        assert keeper.insert(np.arange(4 * 4096), np.arange(10_000, 14_096)) == 0
    print(f"dead reader's 1,024 pins reclaimed {reclaimed_s * 1e3:.0f} ms after SIGKILL")


def _reader_slot_of(reader, pid):
    from shmcache.layout import RD_PID, reader_word

    w = reader._wdata
    return next((s for s in range(256) if int(w[reader_word(s, RD_PID)]) == pid), None)


def test_a_client_releases_only_its_own_pins(served):
    with Client.connect(served.name) as a, Client.connect(served.name) as b:
        a.insert(np.arange(16), [1, 2, 3, 4])
        assert a.pin(np.arange(16)) == 16
        with pytest.raises(InvalidInputError, match="not pinned by this client"):
            b.unpin(np.arange(16))
        assert a.reader.stats()["pinned_blocks"] == 4
        a.remove([4])  # the pinned leaf goes, pin and all
        assert a.insert(np.arange(16), [1, 2, 3, 5]) == 12
        assert a.unpin(np.arange(16)) == 12  # exactly the three blocks it still held
        assert a.reader.stats()["pinned_blocks"] == 0


def test_a_restarted_daemon_drops_the_pins_of_the_clients_it_lost(shm_name):
    """A daemon's clients pin through it; when it dies, the new daemon has
    none of those clients, so none of their writer pins, while the pins a
    client's reader holds in its own slot (match_and_pin) stay."""
    d = Served(shm_name, 64)
    try:
        c = Client.connect(shm_name, timeout=5)
        c.insert(np.arange(16), [1, 2, 3, 4])
        c.insert(np.arange(16) + 100, [5, 6, 7, 8])
        assert c.pin(np.arange(16)) == 16
        held = c.match_and_pin(np.arange(16) + 100)
        assert c.reader.stats()["pinned_blocks"] == 4
        d.kill()
        d = Served(shm_name, 64)
        with Client.connect(shm_name) as other:
            assert other.reader.stats()["pinned_blocks"] == 0  # the lost client's writer pin is gone
            assert other.reader.stats()["writer_epoch"] == 2
            other.insert(np.arange(4 * 60) + 1000, np.arange(60) + 1000)  # needs 4 blocks evicted
        assert c.match_prefix(np.arange(16)).length == 0
        assert c.match_prefix(np.arange(16) + 100).values.tolist() == [5, 6, 7, 8]  # its reader pins held
        assert held.pinned
        c.close()
        assert d.stop() == 0
    finally:
        d.kill()
