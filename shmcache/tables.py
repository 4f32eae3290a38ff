"""The writer's two hash tables: the transition index, shared (in the
segment's data part, where readers look states up by key), and the value
map from (client, value) to state, private (derived from the state table
like every structure in ``Arrays``; it finds the states ``remove`` names
and refuses a value an client already has cached).

Both are open-addressed with linear probing and backward-shift deletion
(no tombstones), by one code path: ``K_INDEX`` or ``K_VMAP`` picks the
table. A slot holds the state + 1 under a tag of its key, so a probe skips
most foreign slots without reading their records. Index slots are stored
with release ordering, each a numbered step of the crash hook.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .atomics import store_relaxed, store_release
from .jitcache import helper
from .layout import G_INDEX, G_SLOTS, H_MAX_PROBE, R_KEY_HI, R_KEY_LO, R_VALUE, SLOT_STATE_MASK, TAG_MASK
from .matcher import home_slot
from .wstate import field, client_of, step

K_INDEX = np.int64(0)
K_VMAP = np.int64(1)

_TAG = np.uint64(TAG_MASK)
_SLOT = np.uint64(SLOT_STATE_MASK)


@njit(inline="always")
def value_hash(value, client):
    """A well-mixed 64-bit hash of ``(client, value)`` (splitmix64's finaliser)."""
    z = np.uint64(value) ^ (np.uint64(client) * np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def value_home(value, client, n_slots):
    return home_slot(value_hash(value, client), n_slots)


@njit(inline="always")
def value_tag(value, client):
    """The value map's slot tag: low hash bits, independent of the home
    (which the high bits pick), so a probe skips foreign slots without
    reading their records."""
    return value_hash(value, client) << np.uint64(32)


@njit(inline="always")
def table(A, kind):
    """``(array, first word, slot count)`` of a hash table."""
    if kind == K_INDEX:
        return A.data, A.geom[G_INDEX], A.geom[G_SLOTS]
    return A.vmap, np.int64(0), np.int64(A.vmap.shape[0])


@njit(inline="always")
def entry_of(A, kind, s):
    if kind == K_INDEX:
        return (field(A, s, R_KEY_LO) & _TAG) | np.uint64(s + 1)
    return value_tag(field(A, s, R_VALUE), client_of(A, s)) | np.uint64(s + 1)


@njit(inline="always")
def home_of(A, kind, s):
    if kind == K_INDEX:
        return home_slot(field(A, s, R_KEY_HI), A.geom[G_SLOTS])
    return value_home(field(A, s, R_VALUE), client_of(A, s), A.vmap.shape[0])


@njit(inline="always")
def table_put(A, kind, arr, at, w):
    if kind == K_INDEX:
        step(A)
        store_release(arr, at, w)
    else:
        arr[at] = w


@helper
def table_insert(A, kind, s):
    """Store state ``s`` in a table at the first free slot from its home."""
    arr, base, n = table(A, kind)
    pos = home_of(A, kind, s)
    dist = 0
    while arr[base + pos] != 0:
        pos += 1
        dist += 1
        if pos == n:
            pos = 0
    if kind == K_INDEX and dist > np.int64(A.data[H_MAX_PROBE]):
        store_relaxed(A.data, H_MAX_PROBE, np.uint64(dist))
    table_put(A, kind, arr, base + pos, entry_of(A, kind, s))


@helper
def table_delete(A, kind, s):
    """Remove state ``s`` from a table by backward shift (no tombstones).

    A concurrent reader may miss an entry while it moves; it never sees a
    wrong one, because it validates the record the slot points at.
    """
    arr, base, n = table(A, kind)
    target = entry_of(A, kind, s)
    hole = home_of(A, kind, s)
    for _ in range(n + 1):
        w = arr[base + hole]
        if w == target:
            break
        if w == 0:
            return
        hole += 1
        if hole == n:
            hole = 0
    if arr[base + hole] != target:
        return
    j = hole
    for _ in range(n):
        j += 1
        if j == n:
            j = 0
        w = arr[base + j]
        if w == 0:
            break
        h = home_of(A, kind, np.int64(w & _SLOT) - 1)
        if (j - h) % n >= (j - hole) % n:
            table_put(A, kind, arr, base + hole, w)
            hole = j
    table_put(A, kind, arr, base + hole, np.uint64(0))


@helper
def value_lookup(A, value, client):
    """State holding ``value`` for ``client``, or -1."""
    n = A.vmap.shape[0]
    pos = value_home(value, client, n)
    tag = value_tag(value, client)
    for _ in range(n):
        w = A.vmap[pos]
        if w == 0:
            return -1
        s = np.int64(w & _SLOT) - 1
        if (w & _TAG) == tag and np.int64(field(A, s, R_VALUE)) == value and client_of(A, s) == client:
            return s
        pos += 1
        if pos == n:
            pos = 0
    return -1
