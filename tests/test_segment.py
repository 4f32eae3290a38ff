"""The POSIX side: exclusive creation, modes, header validation, read-only readers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import posix_ipc
import pytest

import shmcache
from shmcache import (
    IncompatibleSegmentError,
    Reader,
    SegmentExistsError,
    SegmentNotFoundError,
    SegmentPermissionError,
    Writer,
)
from shmcache.layout import H_MAGIC, H_VERSION, LAYOUT_VERSION, MAGIC


def test_created_private_and_exclusive(shm_name):
    with Writer.create(shm_name, capacity=8, block_size=4):
        assert os.stat(f"/dev/shm/shmcache.{shm_name}").st_mode & 0o777 == 0o600
        assert os.stat(f"/dev/shm/sem.shmcache.{shm_name}.writer").st_mode & 0o777 == 0o600
    with pytest.raises(SegmentExistsError, match="Writer.open"):
        Writer.create(shm_name, capacity=8, block_size=4)


@pytest.mark.parametrize(
    "word, value, fragment",
    [(H_VERSION, LAYOUT_VERSION + 1, "layout version"), (H_MAGIC, MAGIC ^ 1, "bad magic"), (3, 9, "header word")],
)
def test_header_mismatch_is_refused_with_a_typed_error(shm_name, word, value, fragment):
    with Writer.create(shm_name, capacity=8, block_size=4) as w:
        good = int(w._map.data[word])
        w._map.data[word] = value
        try:
            with pytest.raises(IncompatibleSegmentError, match=fragment):
                Reader.attach(shm_name)
        finally:
            w._map.data[word] = good
        Reader.attach(shm_name).close()


@pytest.mark.parametrize("delta", [65536, -65536], ids=["grown", "shrunk"])
def test_resized_segment_is_refused_and_noticed_by_mapped_handles(shm_name, delta):
    """Attach refuses a resized object; handles that mapped it before notice
    it in check(), which asks the kernel and touches no page (a shrunk
    object's missing pages would raise SIGBUS)."""
    with Writer.create(shm_name, capacity=8, block_size=4) as w, Reader.attach(shm_name) as r:
        w.insert(np.arange(8), [1, 2])
        size = w.geometry.total_bytes
        shm = posix_ipc.SharedMemory(f"/shmcache.{shm_name}")
        try:
            os.ftruncate(shm.fd, size + delta)
            for attach in (Reader.attach, Writer.open):
                with pytest.raises(IncompatibleSegmentError, match="truncated or resized"):
                    attach(shm_name)
            for handle in (r, w):
                with pytest.raises(IncompatibleSegmentError, match="while mapped here"):
                    handle.check()
            os.ftruncate(shm.fd, size)
        finally:
            shm.close_fd()
        r.check()
        w.check()
        assert r.match_prefix(np.arange(8)).values.tolist() == [1, 2]
        Reader.attach(shm_name).close()


def test_a_segment_larger_than_dev_shm_fails_at_create_and_leaves_nothing(shm_name):
    """The space is reserved at create (posix_fallocate), so a /dev/shm that
    cannot hold the segment is a SegmentSpaceError there, never a SIGBUS
    later. Asking for more than the whole filesystem fails at once: the
    kernel refuses it before allocating a page."""
    fs = os.statvfs("/dev/shm")
    capacity = fs.f_blocks * fs.f_frsize // 80  # > 80 bytes a block, so more than /dev/shm holds
    assert capacity <= 2**31 - 1, "/dev/shm is larger than the biggest segment: this test needs a smaller one"
    with pytest.raises(shmcache.SegmentSpaceError, match="free space there or ask for a smaller capacity"):
        Writer.create(shm_name, capacity=capacity, block_size=16)
    assert not shmcache.exists(shm_name)
    assert not os.path.exists(f"/dev/shm/sem.shmcache.{shm_name}.writer")


def test_precreated_semaphore_is_never_adopted(shm_name):
    """Someone else's semaphore under a segment's writer name is refused: at
    create (exclusive), and at open when ours was replaced."""
    sem = posix_ipc.Semaphore(f"/shmcache.{shm_name}.writer", posix_ipc.O_CREX, mode=0o666, initial_value=1)
    try:
        with pytest.raises(SegmentExistsError, match="never adopted"):
            Writer.create(shm_name, capacity=8, block_size=4)
        assert not shmcache.exists(shm_name)
        assert sem.value == 1  # untouched
    finally:
        sem.unlink()
        sem.close()
    w = Writer.create(shm_name, capacity=8, block_size=4)
    w.close()
    posix_ipc.unlink_semaphore(f"/shmcache.{shm_name}.writer")
    old = os.umask(0)
    try:
        sem = posix_ipc.Semaphore(f"/shmcache.{shm_name}.writer", posix_ipc.O_CREX, mode=0o666, initial_value=1)
    finally:
        os.umask(old)
    try:
        with pytest.raises(SegmentPermissionError, match="writer semaphore"):
            Writer.open(shm_name)
        assert sem.value == 1
    finally:
        sem.close()


def test_precreated_socket_path_is_never_adopted(shm_name, tmp_path):
    """The daemon's socket path holding something that is not a dead
    daemon's socket is refused, and left alone."""
    from shmcache.daemon import Daemon

    squatter = tmp_path / "squat.sock"
    squatter.write_text("not a socket")
    with pytest.raises(shmcache.ShmCacheError, match="not a socket of yours"):
        Daemon(shm_name, capacity=8, block_size=4, sock_path=str(squatter))
    assert squatter.read_text() == "not a socket"
    assert not shmcache.exists(shm_name)  # the daemon that could not listen removed what it created


def test_precreated_world_writable_object_is_never_adopted(shm_name):
    shm = posix_ipc.SharedMemory(f"/shmcache.{shm_name}", posix_ipc.O_CREX, mode=0o666, size=1 << 16)
    os.fchmod(shm.fd, 0o666)
    shm.close_fd()
    with pytest.raises(SegmentPermissionError, match="writable by other users"):
        Reader.attach(shm_name)
    with pytest.raises(SegmentExistsError):
        Writer.create(shm_name, capacity=8, block_size=4)


def test_reader_maps_cache_data_read_only(shm_name):
    with Writer.create(shm_name, capacity=8, block_size=4) as w, Reader.attach(shm_name) as r:
        w.insert(np.arange(8), [1, 2])
        with pytest.raises(ValueError, match="read-only"):
            r._map.data[0] = 0
        assert r.match_prefix(np.arange(8)).values.tolist() == [1, 2]


def test_reader_process_exit_unlinks_nothing_and_warns_nothing(shm_name):
    code = (
        "import numpy as np, shmcache;"
        f"r = shmcache.Reader.attach({shm_name!r});"
        "print(r.match_prefix(np.arange(8)).length)"
    )
    with Writer.create(shm_name, capacity=8, block_size=4) as w:
        w.insert(np.arange(8), [1, 2])
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "8"
        assert done.stderr == ""
        assert shmcache.exists(shm_name)
        assert w.match_prefix(np.arange(8)).length == 8


def test_a_recreated_segment_is_noticed_never_answered_from(shm_name):
    w = Writer.create(shm_name, capacity=8, block_size=4)
    w.insert(np.arange(8), [1, 2])
    r = Reader.attach(shm_name)
    keys = r.block_keys(np.arange(8))
    w.close(unlink=True)
    with Writer.create(shm_name, capacity=8, block_size=4) as w2:
        w2.insert(np.arange(8), [7, 8])
        with pytest.raises(shmcache.SegmentRetiredError, match="attach again"):
            r.match_prefix(np.arange(8))
        with pytest.raises(shmcache.SegmentRetiredError):
            r.match_keys(keys)
        r.close()
        with Reader.attach(shm_name) as fresh:
            assert fresh.match_prefix(np.arange(8)).values.tolist() == [7, 8]
            assert fresh.incarnation != r.incarnation


def test_a_segment_of_another_uid_is_refused_unless_asked_for(shm_name, monkeypatch):
    """Seen from another uid (simulated: this process claims a different
    euid), the segment is refused by default and attached when asked."""
    with Writer.create(shm_name, capacity=8, block_size=4) as w:
        w.insert(np.arange(8), [1, 2])
        owner = os.geteuid()
        monkeypatch.setattr(shmcache.segment.os, "geteuid", lambda: owner + 1)
        with pytest.raises(SegmentPermissionError, match=f"belongs to uid {owner}"):
            Reader.attach(shm_name)
        with Reader.attach(shm_name, allow_other_owner=True) as r:
            assert r.match_prefix(np.arange(8)).values.tolist() == [1, 2]


def _uninitialised(name: str) -> posix_ipc.SharedMemory:
    """An object as a creator leaves it before it publishes MAGIC: reserved,
    header still zero, its writer lock held by this process."""
    from shmcache import liveness
    from shmcache.layout import LOCK_WRITER
    from shmcache.segment import shm_path

    shm = posix_ipc.SharedMemory(shm_path(name), posix_ipc.O_CREX, mode=0o600, size=1 << 20)
    assert liveness.try_lock(shm.fd, LOCK_WRITER)
    return shm


@pytest.mark.parametrize("with_gate", [False, True])
def test_attaching_a_segment_being_created_is_not_ready_never_damaged(shm_name, monkeypatch, with_gate):
    """While its creator lives, an uninitialised segment is "not ready yet"
    (after waiting on the creator's gate, if it has one); once the creator
    is gone, it is a crashed create, and only then is unlinking advised."""
    import shmcache.segment
    from shmcache.segment import sem_path

    monkeypatch.setattr(shmcache.segment, "READY_WAIT_S", 0.2)
    shm = _uninitialised(shm_name)
    gate = posix_ipc.Semaphore(sem_path(shm_name), posix_ipc.O_CREX, mode=0o600, initial_value=0) if with_gate else None
    try:
        for attach in (Reader.attach, Writer.open):
            with pytest.raises(shmcache.SegmentNotReadyError, match="being created") as e:
                attach(shm_name)
            assert "unlink" not in str(e.value)
    finally:
        shm.close_fd()  # the creator dies: its lock goes
        if gate is not None:
            gate.close()
    with pytest.raises(IncompatibleSegmentError, match="creator died.*unlink"):
        Reader.attach(shm_name)


def _create_big(name: str) -> None:
    Writer.create(name, capacity=2_000_000, block_size=16).close()


def test_attaching_while_a_large_segment_is_created_never_sees_a_broken_one(shm_name, spawn):
    """Readers that attach in a loop while another process creates a 200 MB
    segment see it missing or not ready, then ready: never incompatible."""
    creator = spawn.Process(target=_create_big, args=(shm_name,))
    creator.start()
    seen = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with Reader.attach(shm_name) as r:
                    assert r.capacity == 2_000_000
                    break
            except (SegmentNotFoundError, shmcache.SegmentNotReadyError) as e:
                seen.add(type(e).__name__)
        else:
            raise AssertionError("the segment never became ready")
        creator.join(120)
        assert creator.exitcode == 0
    finally:
        if creator.is_alive():
            creator.kill()
            creator.join()
    print("attach saw, before the segment was ready:", sorted(seen))


def test_a_truncated_semaphore_is_refused_never_waited_on(shm_name, monkeypatch):
    """A 0-byte file where the writer semaphore should be (made by someone
    else once ours was gone) would SIGBUS whoever waits on it: attach and
    claims refuse or ignore it, in a child process so a crash shows."""
    import shmcache.segment

    monkeypatch.setattr(shmcache.segment, "READY_WAIT_S", 0.2)
    shm = _uninitialised(shm_name)
    open(f"/dev/shm/sem.shmcache.{shm_name}.writer", "wb").close()
    try:
        code = (f"import shmcache\n"
                f"try:\n    shmcache.Reader.attach({shm_name!r})\n"
                f"except shmcache.SegmentNotReadyError:\n    print('not ready')\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.strip() == "not ready", done.stderr
    finally:
        shm.close_fd()
    shmcache.unlink(shm_name)
    Writer.create(shm_name, capacity=8, block_size=4).close()
    open(f"/dev/shm/sem.shmcache.{shm_name}.writer", "wb").close()
    with pytest.raises(SegmentPermissionError, match="not made by this segment's writer"):
        Writer.open(shm_name)
