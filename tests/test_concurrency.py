"""Guarantee 1 across real processes: readers under a churning writer are never wrong."""

from __future__ import annotations

import numpy as np

from churn import Goal, Timeline, pool_keys_of, reader_main, run_churn, violations

SEED = 20261128
N_READERS = 2
#: Per reader: 50,000 matches at least, 1,500 of them overlapping a write,
#: 250 of those with two blocks or more.
GOAL = Goal(rounds=50_000, counts=(1500, 250))


def test_readers_never_wrong_under_churn(shm_name, spawn, tmp_path):
    ops, rows = run_churn(spawn, shm_name, SEED, tmp_path, reader_main, N_READERS, GOAL)
    timeline = Timeline.from_log(ops)
    pool_keys = pool_keys_of(shm_name, SEED)
    assert len(rows) >= 100_000
    bad = violations(timeline, pool_keys, rows)
    assert not bad, f"{len(bad)} wrong answers, first: {bad[:5]}"
    # The run must have exercised what it claims (the readers ran until it
    # had): real overlap with writes, non-trivial answers, and churn that
    # removed blocks.
    overlapped = rows[:, 1] != rows[:, 2]
    assert overlapped.sum() >= 3000, f"only {overlapped.sum()} matches overlapped a write"
    assert (rows[:, 3] > 0).mean() > 0.3
    assert (rows[overlapped, 3] >= 2).sum() >= 500
    assert sum(1 for _, evs in ops for e in evs if e[0] == "del") > 1000


def test_checker_catches_a_wrong_answer():
    """The checker is not vacuous: a value that was never there, or two blocks
    that were never present together, are both reported."""
    key_a, key_b = (1, 1), (2, 2)
    ops = [(1, [("add", key_a, 10)]), (2, [("add", key_b, 11)]), (3, [("del", key_a)]), (4, [("add", key_a, 12)])]
    t = Timeline.from_log(ops)
    pool_keys = [[key_a, key_b]]
    ok = np.array([[0, 4, 4, 2, 10, 11, 0, 0, 0, 0, 0, 0]])
    assert violations(t, pool_keys, ok) == []
    wrong_value = np.array([[0, 4, 4, 1, 99, 0, 0, 0, 0, 0, 0, 0]])
    assert len(violations(t, pool_keys, wrong_value)) == 1
    mixed = np.array([[0, 4, 8, 2, 12, 11, 0, 0, 0, 0, 0, 0]])  # a=12 only after b... b still present: fine
    assert violations(t, pool_keys, mixed) == []
    stale = np.array([[0, 6, 8, 2, 10, 11, 0, 0, 0, 0, 0, 0]])  # a=10 was gone before this call began
    assert len(violations(t, pool_keys, stale)) == 1
