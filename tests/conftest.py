"""Shared fixtures: unique segment names that are always unlinked, and /dev/shm hygiene."""

from __future__ import annotations

import multiprocessing as mp
import os
import uuid

import numpy as np
import pytest

import shmcache

SHM_DIR = "/dev/shm"


def _ours() -> set[str]:
    return {e for e in os.listdir(SHM_DIR) if "shmcache." in e and (".t-" in e or ".warmup-" in e)}


@pytest.fixture(scope="session", autouse=True)
def shm_left_as_found():
    """The whole run leaves /dev/shm as it found it (for names tests create)."""
    before = _ours()
    yield
    leaked = _ours() - before
    assert not leaked, f"tests leaked shared-memory objects: {sorted(leaked)}"


@pytest.fixture(scope="session", autouse=True)
def warm_kernels():
    """Compile (or load from Numba's cache) every kernel once, in this process,
    before tests spawn children that would otherwise all compile at once."""
    from shmcache.writer import warm_up

    warm_up()  # every writer path, int64 and uint32 tokens: what daemons and children load
    name = f"t-warm-{uuid.uuid4().hex[:12]}"
    try:
        with shmcache.Writer.create(name, capacity=64, block_size=4) as w:
            toks = np.arange(16, dtype=np.int64)
            w.insert(toks, np.arange(4))
            w.match_prefix(toks)
            w.pin(toks)
            w.unpin(toks)
            w.evict(1)
            w.remove([0])
            w.clear()
            w.check()
            with shmcache.Reader.attach(name) as r:
                for t in (toks, toks.astype(np.int32), toks.astype(np.uint32), list(range(16))):
                    r.match_prefix(t)
                r.match_keys(r.block_keys(toks))
                r.check()
    finally:
        shmcache.unlink(name)


@pytest.fixture
def shm_name(request):
    """A segment name unique to this test; segment and semaphore are unlinked after it."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    yield name
    shmcache.unlink(name)
    try:
        os.unlink(f"{SHM_DIR}/shmcache.{name}.sock")  # left by a daemon a test killed
    except FileNotFoundError:
        pass


@pytest.fixture
def spawn():
    """The spawn multiprocessing context: children are real, fresh processes."""
    return mp.get_context("spawn")
