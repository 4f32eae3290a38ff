"""Shared fixtures: unique segment names that are always unlinked, and /dev/shm hygiene."""

from __future__ import annotations

import multiprocessing as mp
import os
import uuid

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
    for the block sizes tests use, before tests spawn children that would
    otherwise all compile at once."""
    from shmcache.warmup import compile_all

    compile_all((4, 16))


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
