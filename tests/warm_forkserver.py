"""Preloaded by the crash test's forkserver: runs every writer path once on a
throwaway segment, so each crash child forked from it starts with the Numba
kernels already loaded (a child then costs milliseconds, not a second)."""

import uuid

import numpy as np

import shmcache

_name = f"t-warmfs-{uuid.uuid4().hex[:12]}"
try:
    with shmcache.Writer.create(_name, capacity=8, block_size=4) as _w:
        _t = np.arange(16, dtype=np.int64)
        _w.insert(_t, [1, 2, 3, 4])
        _w.pin(_t)
        _w.unpin(_t)
        _w.evict(1)
        _w.remove([1])
        _w.clear()
        _w.check()
    shmcache.Writer.open(_name).close()
finally:
    shmcache.unlink(_name)
