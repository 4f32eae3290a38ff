"""Regression tests for the four bugs BCR-memory-2 found in its predecessor.

The fourth (nothing enforced a single writer) is in test_writer_lock.py.
"""

from __future__ import annotations

import os

import numpy as np

from shmcache import Reader, Writer
from shmcache.layout import H_MAX_PROBE
from shmcache.checks import probe_distances


def two_blocks(i: int) -> np.ndarray:
    return np.repeat(np.array([2 * i, 2 * i + 1]), 4)


def test_bug1_evicted_states_are_freed_and_reused_under_10k_cycles(shm_name):
    """Evict used to tombstone a value while the state table grew without bound."""
    with Writer.create(shm_name, capacity=64, block_size=4) as w:
        size = os.stat(f"/dev/shm/shmcache.{shm_name}").st_size
        for i in range(10_000):
            w.insert(two_blocks(i), [2 * i, 2 * i + 1])
        s = w.stats()
        assert s["live_blocks"] == 64 and s["free_blocks"] == 0
        assert s["inserted_blocks"] - s["evicted_blocks"] == 64
        assert all(w.match_prefix(two_blocks(i)).length == 8 for i in range(10_000 - 32, 10_000))
        assert all(w.match_prefix(two_blocks(i)).length == 0 for i in range(0, 10_000 - 32, 97))
        w.check()
        for i in range(10_000, 20_000):
            w.insert(two_blocks(i), [2 * i, 2 * i + 1])
            assert len(w.evict(2)) == 2
        s = w.stats()
        assert s["live_blocks"] == 62 and s["free_blocks"] == 2
        assert s["inserted_blocks"] - s["evicted_blocks"] == 62
        w.check()
        assert os.stat(f"/dev/shm/shmcache.{shm_name}").st_size == size


def test_bug2_100k_distinct_blocks_all_stored_and_found_without_collision(shm_name):
    """64-bit symbols with the upper half discarded used to collide silently."""
    n_prompts, blocks = 1000, 100
    with Writer.create(shm_name, capacity=n_prompts * blocks, block_size=4) as w:
        for p in range(n_prompts):
            toks = np.arange(p * blocks * 4, (p + 1) * blocks * 4)
            w.insert(toks, np.arange(p * blocks, (p + 1) * blocks))
        assert w.stats()["live_blocks"] == 100_000
        w.check()
        with Reader.attach(shm_name) as r:
            for p in range(n_prompts):
                m = r.match_prefix(np.arange(p * blocks * 4, (p + 1) * blocks * 4))
                assert m.values.tolist() == list(range(p * blocks, (p + 1) * blocks))
            keys = r.block_keys(np.arange(blocks * 4))
            assert r.match_keys(keys).length == blocks * 4
            for flip in ((1, 0), (0, 1)):
                forged = keys.copy()
                forged[0] ^= np.array(flip, dtype=np.uint64)
                assert r.match_keys(forged).length == 0, "a key differing in one half must not match"


def test_bug3_lookup_cost_does_not_grow_with_fan_out(shm_name):
    """Edges used to be scanned linearly. Here a transition is one hashed
    lookup: a state with 10,000 children is matched through by reading the
    same handful of index slots as a state with one child."""
    wide, narrow = 7, 8
    with Writer.create(shm_name, capacity=20_010, block_size=4, seed=42) as w:
        for c in range(10_000):
            w.insert(np.repeat([wide, 100 + c], 4), [wide, 1000 + c])
        w.insert(np.repeat([narrow, 100], 4), [narrow, 999])
        with Reader.attach(shm_name) as r:
            assert r.match_prefix(np.repeat([wide, 100 + 9_999], 4)).values.tolist() == [wide, 10_999]
            assert r.match_prefix(np.repeat([narrow, 100], 4)).values.tolist() == [narrow, 999]
        dist = probe_distances(w._A.data, w._A.geom)
        entries = dist[dist >= 0]
        assert len(entries) == 10_003  # wide, its 10,000 children, narrow, its child
        # Slots a lookup reads = distance + 1; the writer's recorded maximum
        # bounds every reader's probe loop.
        assert entries.max() <= 32 and (entries + 1).mean() < 2.0
        assert int(w._A.data[H_MAX_PROBE]) == entries.max()
