"""Test helpers that read a segment's state table directly (through layout constants)."""

from __future__ import annotations

import numpy as np

from shmcache.layout import LOW32, R_KEY_HI, R_KEY_LO, R_LINK, R_PINS, R_VALUE, RECORD_WORDS


def live_states(data: np.ndarray, geometry) -> dict[tuple[int, int], tuple[int, tuple[int, int] | None, int]]:
    """``{key: (value, parent key or None, pins)}`` for every live record."""
    start = geometry.states_offset // 8
    recs = data[start : start + geometry.capacity * RECORD_WORDS].reshape(geometry.capacity, RECORD_WORDS)
    link = (recs[:, R_LINK] & LOW32).astype(np.int64)
    live = np.nonzero(link != 0)[0]
    key = lambda s: (int(recs[s, R_KEY_LO]), int(recs[s, R_KEY_HI]))  # noqa: E731
    out = {}
    for s in live:
        parent = int(link[s]) - 2
        out[key(s)] = (int(np.int64(recs[s, R_VALUE])), key(parent) if parent >= 0 else None, int(recs[s, R_PINS] & LOW32))
    return out


def owned_values(data: np.ndarray, geometry) -> dict[int, set[int]]:
    """``{client: {values}}`` of every live record."""
    start = geometry.states_offset // 8
    recs = data[start : start + geometry.capacity * RECORD_WORDS].reshape(geometry.capacity, RECORD_WORDS)
    live = np.nonzero((recs[:, R_LINK] & LOW32) != 0)[0]
    out: dict[int, set[int]] = {}
    for s in live:
        out.setdefault(int(recs[s, R_LINK] >> 32), set()).add(int(np.int64(recs[s, R_VALUE])))
    return out


def children_before_parents(removed: list[int], parent_of_value: dict[int, int | None]) -> bool:
    """Whether no value in ``removed`` comes after its parent's value."""
    pos = {v: i for i, v in enumerate(removed)}
    return all(parent_of_value.get(v) not in pos or pos[parent_of_value[v]] > i for v, i in pos.items())
