"""Spawned-process workers for the owner concurrency test.

The writer churns what four owners hold (inserts with and without an owner,
releases of a prefix, clears, removes, evictions under a small capacity)
and, after every operation, records the header's MUTATIONS word and the
truth: for every pool prompt and owner, how many leading tokens that owner
holds (read by its own Reader while nothing else writes: exact). Readers
record MUTATIONS before and after each ``match_owners``. The checker then
bounds each answer by the most the owner held at any operation boundary the
call overlapped: within one operation an owner's hold on a prompt only moves
between its values before and after (inserts add parents first, releases
take parents first, drops take children first), so nothing above that bound
was ever held during the call.
"""

from __future__ import annotations

import pickle
import time

import numpy as np

from churn import BS, Goal, _run_to_goal, prompt_pool

OWNERS = ("r0", "r1", "r2", "r3")
CAPACITY = 48


def value(prompt: np.ndarray, i: int) -> int:
    """The value of block ``i`` of ``prompt``: a function of its prefix."""
    ids = prompt[: (i + 1) * BS : BS]
    return int(sum((int(x) + 1) * 4**j for j, x in enumerate(ids)))


def truth(reader, pool) -> np.ndarray:
    out = np.zeros((len(pool), len(OWNERS)), dtype=np.int64)
    for i, p in enumerate(pool):
        held = reader.match_owners(p)
        out[i] = [held.get(o, 0) for o in OWNERS]
    return out


def writer_main(name, seed, ready, stop, log_path, max_seconds):
    from shmcache import CacheFullError, Reader, Writer
    from shmcache.layout import H_MUTATIONS

    pool = prompt_pool(seed)
    rng = np.random.default_rng(seed + 1)
    w = Writer.create(name, capacity=CAPACITY, block_size=BS)
    r = Reader.attach(name)
    log = [(int(w._map.data[H_MUTATIONS]), truth(r, pool))]
    ready.set()
    deadline = time.monotonic() + max_seconds
    while not stop.is_set() and time.monotonic() < deadline:
        p = pool[int(rng.integers(len(pool)))]
        o = OWNERS[int(rng.integers(len(OWNERS)))]
        x = rng.random()
        try:
            if x < 0.45:
                w.insert(p, [value(p, i) for i in range(len(p) // BS)], owner=o)
            elif x < 0.55:
                w.insert(p, [value(p, i) for i in range(len(p) // BS)])
            elif x < 0.8:
                w.release(p[: BS * int(rng.integers(1, len(p) // BS + 1))], o)
            elif x < 0.83:
                w.clear_owner(o)
            elif x < 0.9:
                w.remove([value(p, int(rng.integers(len(p) // BS)))])
            else:
                w.evict(int(rng.integers(1, 4)))
        except CacheFullError:
            pass
        log.append((int(w._map.data[H_MUTATIONS]), truth(r, pool)))
    w.check()
    with open(log_path, "wb") as f:
        pickle.dump(log, f)
    r.close()
    w.close()


def reader_main(name, seed, ready, go, goal: Goal, out_path):
    from shmcache import Reader
    from shmcache.layout import H_MUTATIONS

    warm, go = go
    pool = prompt_pool(seed)
    assert ready.wait(300)
    r = Reader.attach(name)
    r.match_owners(pool[0])  # kernels loaded before the common start
    warm.set()
    go.wait(300)
    data = r._data
    rng = np.random.default_rng(seed + 2)

    def one_round(_t):
        i = int(rng.integers(len(pool)))
        m0 = int(data[H_MUTATIONS])
        held = r.match_owners(pool[i])
        m1 = int(data[H_MUTATIONS])
        return np.array([i, m0, m1, *[held.get(o, 0) for o in OWNERS]], dtype=np.int64)

    def tally(rows):
        overlapped = rows[:, 1] != rows[:, 2]
        return int(overlapped.sum()), int((overlapped & (rows[:, 3:].max(axis=1) > 0)).sum())

    rows = _run_to_goal(goal, one_round, tally)
    np.save(out_path, rows)
    r.close()


def violations(log: list[tuple[int, np.ndarray]], rows: np.ndarray) -> list[tuple]:
    """Answers crediting an owner with more than it held at any operation
    boundary the call overlapped."""
    muts = np.array([m for m, _ in log])
    states = np.stack([t for _, t in log])
    bad = []
    for row in rows:
        i, m0, m1 = int(row[0]), int(row[1]), int(row[2])
        k0 = int(np.searchsorted(muts, m0, side="right")) - 1
        k1 = int(np.searchsorted(muts, m1, side="right")) - 1
        if m1 & 1:
            k1 += 1  # the operation in progress at the end may show part of its result
        bound = states[max(k0, 0) : min(k1, len(states) - 1) + 1, i].max(axis=0)
        if (row[3:] > bound).any():
            bad.append((i, m0, m1, row[3:].tolist(), bound.tolist()))
    return bad
