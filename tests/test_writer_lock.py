"""Predecessor bug 4: nothing enforced a single writer. Here a second writer
is refused across processes, and a dead writer is taken over."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from shmcache import Reader, Writer, WriterBusyError


def hold_writer(name, ready, stop):
    w = Writer.create(name, capacity=64, block_size=4)
    w.insert(np.arange(16), [1, 2, 3, 4])
    ready.set()
    stop.wait(120)
    w.close()


def try_open(name, result):
    try:
        Writer.open(name)
        result.put(("opened", 0))
    except WriterBusyError as e:
        result.put(("busy", e.pid))


def test_second_writer_refused_then_dead_writer_taken_over(shm_name, spawn):
    ready, stop = spawn.Event(), spawn.Event()
    holder = spawn.Process(target=hold_writer, args=(shm_name, ready, stop))
    holder.start()
    try:
        assert ready.wait(120)
        with pytest.raises(WriterBusyError, match=str(holder.pid)) as e:
            Writer.open(shm_name)
        assert e.value.pid == holder.pid
        with pytest.raises(WriterBusyError):
            Writer.create(shm_name, capacity=64, block_size=4)
        result = spawn.Queue()
        other = spawn.Process(target=try_open, args=(shm_name, result))
        other.start()
        other.join(120)
        assert result.get(timeout=10) == ("busy", holder.pid)
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(60)
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join()
    with Writer.open(shm_name) as w:
        assert w.stats()["writer_epoch"] == 2 and w.stats()["writer_pid"] == os.getpid()
        assert w.match_prefix(np.arange(16)).values.tolist() == [1, 2, 3, 4]
        w.check()
    with Reader.attach(shm_name) as r:
        assert r.stats()["writer_alive"] is False


def test_cleanly_closed_writer_is_reopened_without_waiting(shm_name):
    Writer.create(shm_name, capacity=8, block_size=4).close()
    with Writer.open(shm_name) as w:
        with pytest.raises(WriterBusyError):
            Writer.open(shm_name)
        assert w.stats()["writer_alive"]
