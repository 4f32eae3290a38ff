"""Invariant checks, behind ``Writer.check`` and ``Reader.check``.

``check_segment`` checks every invariant visible in the data part and works
on a read-only map (so a reader imports it without the writer's operation
kernels); ``check_private`` checks the writer-private structures against the
state table. Both return ``(V_* code, a, b)`` rows, which
``shmcache.report`` puts in words. ``probe_distances`` measures how far
each index entry sits from its home slot.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .layout import (
    G_CAPACITY,
    G_INDEX,
    G_OWNERS,
    G_SLOTS,
    G_STATES,
    H_LIVE,
    H_MAX_PROBE,
    H_MUTATIONS,
    H_PINNED,
    LINK_PARENT_BIAS,
    LOW32,
    MAX_OWNERS,
    O_BLOCKS,
    OWNER_WORDS,
    R_KEY_HI,
    R_KEY_LO,
    R_LINK,
    R_OWNERS,
    R_PINS,
    R_VALUE,
    R_VERSION,
    RECORD_WORDS,
    SLOT_STATE_MASK,
    TAG_MASK,
)
from .matcher import find_state, home_slot, max_probe
from .recovery import S_VALID, classify
from .tables import value_lookup
from .tree import evictable_leaf, node
from .wstate import (
    FC,
    M_FREE_TOP,
    M_HEAP_SIZE,
    M_RPINNED,
    NEXT,
    NIL,
    PREV,
    client_of,
    effective_recency,
    field,
    is_live,
    parent_of,
)

V_ODD_VERSION = 1
V_BAD_PARENT = 2
V_UNREACHABLE = 3
V_NOT_INDEXED = 4
V_SLOT_BAD_STATE = 5
V_SLOT_BAD_TAG = 6
V_SLOT_TOO_FAR = 7
V_SLOT_COUNT = 8
V_LIVE_COUNT = 9
V_PINNED_COUNT = 10
V_PROTECT_COUNT = 11
V_MUTATING = 12
V_OWNERS_SUBSET = 13
V_OWNER_COUNT = 14
V_FREE_LIST = 20
V_CHILD_LIST = 21
V_VALUE_MAP = 22
V_HEAP_MISSING = 23
V_DUP_VALUE = 24
V_READER_PINS = 25

MAX_VIOLATIONS = 1000

_ONE = np.uint64(1)
_LOW32 = np.uint64(LOW32)
_TAG = np.uint64(TAG_MASK)
_SLOT = np.uint64(SLOT_STATE_MASK)


@njit(inline="always")
def report(out, n, code, a, b):
    if n < out.shape[0]:
        out[n, 0] = code
        out[n, 1] = a
        out[n, 2] = b
    return n + 1


@njit(cache=True)
def protect_counts(parent, status, data, geom):
    """For each valid state, how many valid states in its subtree (itself
    included) have a pin: what the high half of its PINS word must hold."""
    cap = parent.shape[0]
    states = geom[G_STATES]
    out = np.zeros(cap, dtype=np.int64)
    for s in range(cap):
        if status[s] == S_VALID and (data[states + s * RECORD_WORDS + R_PINS] & _LOW32) != 0:
            cur = s
            for _ in range(cap):
                out[cur] += 1
                cur = parent[cur]
                if cur < 0:
                    break
    return out


@njit(cache=True)
def check_segment(data, geom):
    """Check every invariant visible in the data part; works on a read-only map.

    Returns an ``(k, 3)`` int64 array of ``(V_* code, a, b)`` rows.
    """
    out = np.zeros((MAX_VIOLATIONS, 3), dtype=np.int64)
    n = 0
    cap = geom[G_CAPACITY]
    states = geom[G_STATES]
    index = geom[G_INDEX]
    n_slots = geom[G_SLOTS]
    if data[H_MUTATIONS] & _ONE:
        n = report(out, n, V_MUTATING, np.int64(data[H_MUTATIONS]), 0)
    parent = np.empty(cap, dtype=np.int64)
    n_live = 0
    n_pinned = 0
    for s in range(cap):
        base = states + s * RECORD_WORDS
        if data[base + R_VERSION] & _ONE:
            n = report(out, n, V_ODD_VERSION, s, 0)
        parent[s] = np.int64(data[base + R_LINK] & _LOW32) - LINK_PARENT_BIAS
        if parent[s] != -2:
            n_live += 1
            if data[base + R_PINS] >> np.uint64(32):
                n_pinned += 1
    status = classify(parent)
    live = parent != -2
    protect = protect_counts(parent, status, data, geom)
    held = np.zeros(MAX_OWNERS, dtype=np.int64)
    for s in range(cap):
        if not live[s]:
            continue
        if status[s] != S_VALID:
            p = parent[s]
            bad_link = p < -1 or p >= cap or (p >= 0 and not live[p])
            n = report(out, n, V_BAD_PARENT if bad_link else V_UNREACHABLE, s, p)
            continue
        base = states + s * RECORD_WORDS
        owners = data[base + R_OWNERS]
        if parent[s] >= 0 and owners & ~data[states + parent[s] * RECORD_WORDS + R_OWNERS]:
            n = report(out, n, V_OWNERS_SUBSET, s, parent[s])
        for i in range(MAX_OWNERS):
            held[i] += (owners >> np.uint64(i)) & _ONE
        if np.int64(data[base + R_PINS] >> np.uint64(32)) != protect[s]:
            n = report(out, n, V_PROTECT_COUNT, s, protect[s])
        f, _, _ = find_state(data, geom, data[base + R_KEY_LO], data[base + R_KEY_HI], data[base + R_LINK] & _LOW32, max_probe(data, geom))
        if f != s:
            n = report(out, n, V_NOT_INDEXED, s, f)
    used = 0
    probe_limit = np.int64(data[H_MAX_PROBE])
    for i in range(n_slots):
        w = data[index + i]
        if w == 0:
            continue
        used += 1
        s = np.int64(w & _SLOT) - 1
        if s < 0 or s >= cap or not live[s]:
            n = report(out, n, V_SLOT_BAD_STATE, i, s)
            continue
        base = states + s * RECORD_WORDS
        if (data[base + R_KEY_LO] & _TAG) != (w & _TAG):
            n = report(out, n, V_SLOT_BAD_TAG, i, s)
        if (i - home_slot(data[base + R_KEY_HI], n_slots)) % n_slots > probe_limit:
            n = report(out, n, V_SLOT_TOO_FAR, i, s)
    if used != n_live:
        n = report(out, n, V_SLOT_COUNT, used, n_live)
    if np.int64(data[H_LIVE]) != n_live:
        n = report(out, n, V_LIVE_COUNT, np.int64(data[H_LIVE]), n_live)
    if np.int64(data[H_PINNED]) != n_pinned:
        n = report(out, n, V_PINNED_COUNT, np.int64(data[H_PINNED]), n_pinned)
    for i in range(MAX_OWNERS):
        recorded = np.int64(data[geom[G_OWNERS] + i * OWNER_WORDS + O_BLOCKS])
        if recorded != held[i]:
            n = report(out, n, V_OWNER_COUNT, i, held[i])
    return out[: min(n, MAX_VIOLATIONS)]


@njit(cache=True)
def check_private(A):
    """Check the writer-private structures against the state table."""
    out = np.zeros((MAX_VIOLATIONS, 3), dtype=np.int64)
    n = 0
    cap = A.geom[G_CAPACITY]
    seen = np.zeros(cap, dtype=np.int8)
    top = A.meta[M_FREE_TOP]
    for i in range(top):
        s = A.free[i]
        if s < 0 or s >= cap or is_live(A, s) or seen[s] or A.held[s]:
            n = report(out, n, V_FREE_LIST, i, s)
        elif s >= 0 and s < cap:
            seen[s] = 1
    n_live = np.int64(A.data[H_LIVE])
    held = 0  # free records a reader pin still names: out of the free list until unpinned
    for s in range(cap):
        if A.held[s]:
            held += 1
            if is_live(A, s) or A.rpin[s] == 0:
                n = report(out, n, V_FREE_LIST, -1, s)
    if top + n_live + held != cap:
        n = report(out, n, V_FREE_LIST, top, n_live)
    n_children = np.zeros(cap + 1, dtype=np.int64)
    for s in range(cap):
        if is_live(A, s):
            n_children[node(A, parent_of(A, s))] += 1
    for r in range(cap + 1):
        if r < cap and not is_live(A, r):
            continue
        count = 0
        c = A.links[r, FC]
        prev = NIL
        while c != NIL and count <= cap:
            if c < 0 or c >= cap or node(A, parent_of(A, c)) != r or A.links[c, PREV] != prev:
                n = report(out, n, V_CHILD_LIST, r, c)
                break
            count += 1
            prev = c
            c = A.links[c, NEXT]
        if count != n_children[r]:
            n = report(out, n, V_CHILD_LIST, r, count)
    in_heap = np.zeros(cap, dtype=np.bool_)
    for i in range(A.meta[M_HEAP_SIZE]):
        s = A.heap_state[i]
        if 0 <= s < cap and A.heap_key[i] <= effective_recency(A, s):
            in_heap[s] = True
    for s in range(cap):
        if not is_live(A, s):
            continue
        f = value_lookup(A, np.int64(field(A, s, R_VALUE)), client_of(A, s))
        if f != s:
            n = report(out, n, V_VALUE_MAP, s, f)
        if evictable_leaf(A, s) and not in_heap[s]:
            n = report(out, n, V_HEAP_MISSING, s, 0)
    counts = np.zeros(cap, dtype=np.int32)
    for e in A.rprev:
        if 0 < e <= cap:
            counts[e - 1] += 1
    named = 0
    for s in range(cap):
        named += counts[s] > 0
        if counts[s] != A.rpin[s]:
            n = report(out, n, V_READER_PINS, s, counts[s])
    if named != A.meta[M_RPINNED]:
        n = report(out, n, V_READER_PINS, -1, named)
    return out[: min(n, MAX_VIOLATIONS)]


@njit(cache=True)
def probe_distances(data, geom):
    """For each record, how many slots past its home its index entry sits
    (-1 for free records): a lookup of that key reads distance + 1 slots,
    whatever the fan-out of its parent."""
    cap = geom[G_CAPACITY]
    index = geom[G_INDEX]
    n_slots = geom[G_SLOTS]
    states = geom[G_STATES]
    out = np.full(cap, -1, dtype=np.int64)
    for i in range(n_slots):
        w = data[index + i]
        if w == 0:
            continue
        s = np.int64(w & _SLOT) - 1
        if 0 <= s < cap:
            out[s] = (i - home_slot(data[states + s * RECORD_WORDS + R_KEY_HI], n_slots)) % n_slots
    return out
