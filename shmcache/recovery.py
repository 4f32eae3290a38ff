"""Recovery: repair a segment whose writer died, and rebuild everything
derived from its state table.

``rebuild`` runs whenever a Writer takes a segment (created, opened or
taken over from a dead writer): it drops the states a dead writer left
half-written with their descendants, then recreates the index, the header's
counters and every writer-private structure in ``Arrays``. It also drops
every writer pin: they are held through handles of a Writer (or of the
daemon's clients, through the daemon's Writer), and none of those outlives
the Writer that made it. Reader pins live in the readers' slots and are
kept. ``classify`` (which records reach the root through live states)
serves the invariant checks (``shmcache.checks``) and ``shmcache dump`` too.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .atomics import store_relaxed
from .jitcache import helper
from .layout import (
    G_CAPACITY,
    G_INDEX,
    G_OWNERS,
    G_SLOTS,
    H_EVICTING,
    H_LIVE,
    H_MAX_PROBE,
    H_PINNED,
    H_RECOVERED,
    LINK_FREE,
    LOW32,
    MAX_OWNERS,
    O_BLOCKS,
    OWNER_WORDS,
    R_PINS,
    R_VERSION,
)
from .pinsync import forget_reader_pins, sync_reader_pins
from .tables import K_INDEX, K_VMAP, table_insert
from .tree import attach_child, heap_rebuild
from .wstate import (
    FC,
    M_FREE_TOP,
    M_HEAP_SIZE,
    NEXT,
    NIL,
    begin,
    bump,
    count_owners,
    end,
    field,
    is_live,
    owners_of,
    parent_of,
    publish,
    rec,
    set_field,
    set_owners,
    step,
)

P_TORN = -3  # parent code of a record a writer was changing (odd version)
S_UNKNOWN, S_VALID, S_INVALID, S_FREE = 0, 1, 2, 3

_ONE = np.uint64(1)
_LOW32 = np.uint64(LOW32)


@njit(cache=True)
def classify(parent):
    """Which records are live states reachable from the root.

    ``parent[s]`` is the parent id, -1 for the root, -2 for a free record,
    ``P_TORN`` for a torn one; ids may be garbage. Returns an int8 array:
    S_VALID (live, and every ancestor is), S_INVALID (torn, bad link, or below
    an invalid or free record, or on a cycle) or S_FREE. O(capacity): each
    record is walked once.
    """
    cap = parent.shape[0]
    status = np.zeros(cap, dtype=np.int8)
    for s in range(cap):
        p = parent[s]
        if p == -2:
            status[s] = S_FREE
        elif p < -1 or p >= cap:
            status[s] = S_INVALID
    chain = np.empty(cap + 1, dtype=np.int64)
    for s in range(cap):
        if status[s] != S_UNKNOWN:
            continue
        depth = 0
        cur = s
        verdict = S_VALID
        while True:
            if status[cur] == S_VALID:
                break
            if status[cur] != S_UNKNOWN or depth > cap:
                verdict = S_INVALID
                break
            chain[depth] = cur
            depth += 1
            status[cur] = S_INVALID  # provisional: meeting it again in this walk is a cycle
            if parent[cur] == -1:
                break
            cur = parent[cur]
        for i in range(depth):
            status[chain[i]] = verdict
    return status


@njit(cache=True)
def rebuild(A):
    """Repair the segment and rebuild everything derived from the state table.

    Drops every state whose record is odd (a dead writer was changing it),
    whose link is out of range, or whose ancestry does not reach the root
    through live states (descendants of a dropped state, cycles). Then
    rebuilds the index, the counters and the private structures, with no
    writer pin (see the module docstring). Safe with readers attached:
    while the index is rebuilt they miss the blocks they look up there, and
    may still find others in the record after their parent's (valid
    records only: the invalid ones are zeroed before the index is cleared,
    and the owners' repair cuts any walk it overlaps). Returns the number
    of states dropped.
    """
    cap = A.geom[G_CAPACITY]
    begin(A)
    parent = np.empty(cap, dtype=np.int64)
    for s in range(cap):
        parent[s] = P_TORN if A.data[rec(A, s) + R_VERSION] & _ONE else parent_of(A, s)
    status = classify(parent)
    dropped = 0
    for s in range(cap):
        if status[s] == S_INVALID:
            free = np.uint64(0)
            publish(A, s, free, free, free, np.uint64(LINK_FREE), free, free, free)
            status[s] = S_FREE
            dropped += 1
    index = A.geom[G_INDEX]
    for i in range(A.geom[G_SLOTS]):
        if A.data[index + i] != 0:
            step(A)
            store_relaxed(A.data, index + i, np.uint64(0))
    store_relaxed(A.data, H_MAX_PROBE, np.uint64(0))
    store_relaxed(A.data, H_EVICTING, np.uint64(0))
    A.vmap[:] = 0
    A.links[:, :] = NIL
    A.meta[M_HEAP_SIZE] = 0
    forget_reader_pins(A)
    sync_reader_pins(A)  # before the free list: records reader pins name stay out of it
    n_free = 0
    live = 0
    A.held[:] = False
    for s in range(cap - 1, -1, -1):
        if status[s] == S_FREE:
            if A.rpin[s] == 0:
                A.free[n_free] = s
                n_free += 1
            else:
                A.held[s] = True
            continue
        live += 1
        parent[s] = parent_of(A, s)
        table_insert(A, K_INDEX, s)
        table_insert(A, K_VMAP, s)
        attach_child(A, parent_of(A, s), s)
    A.meta[M_FREE_TOP] = n_free
    store_relaxed(A.data, H_LIVE, np.uint64(live))
    store_relaxed(A.data, H_PINNED, np.uint64(0))  # first: a crash below leaves only counts the next rebuild zeroes
    for s in range(cap):
        if status[s] == S_VALID and field(A, s, R_PINS) != 0:
            step(A)
            set_field(A, s, R_PINS, 0)
    repair_owners(A)
    bump(A, H_RECOVERED, dropped)
    heap_rebuild(A)
    end(A)
    return dropped


@helper
def repair_owners(A):
    """Recount every owner's BLOCKS, then restore the subset rule (an
    owner holds a block only if it holds its parent) that a writer dying
    in the middle of a release leaves broken: a block keeps only the
    owners its parent has. Walks the tree parents first (children lists).

    Every live record's version first moves on by 2: a writer that died
    between ``set_owners``' store and its version left a presence word
    changed under an unchanged version, and a reader that read the old
    word before must see a change before it trusts it again.
    """
    cap = A.geom[G_CAPACITY]
    table = A.geom[G_OWNERS]
    for i in range(MAX_OWNERS):
        store_relaxed(A.data, table + i * OWNER_WORDS + O_BLOCKS, np.uint64(0))
    for s in range(cap):
        if is_live(A, s):
            step(A)
            store_relaxed(A.data, rec(A, s) + R_VERSION, A.data[rec(A, s) + R_VERSION] + np.uint64(2))
            count_owners(A, np.uint64(0), owners_of(A, s))
    cur = A.links[cap, FC]
    while cur != NIL:
        p = parent_of(A, cur)
        held = owners_of(A, cur)
        if p >= 0 and held & ~owners_of(A, p):
            set_owners(A, cur, held & owners_of(A, p))
        if A.links[cur, FC] != NIL:
            cur = A.links[cur, FC]
            continue
        while cur != NIL and A.links[cur, NEXT] == NIL:
            p = parent_of(A, cur)
            cur = NIL if p < 0 else p
        if cur != NIL:
            cur = A.links[cur, NEXT]
