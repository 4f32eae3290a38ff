"""The writer's operation kernels: every change to a segment goes through here.

Each operation is bracketed and changes records under their versions
(``shmcache.wstate`` has those primitives of the publication protocol; the
reader's half is in ``shmcache.matcher``). Across records, the order is:

* A new state is fully published before its index slot is stored; a state
  is dropped from the index before its record is freed. States are added
  parents first and removed children first, so the live set is always
  prefix-closed.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .atomics import load_relaxed, prefetch, store_relaxed, store_release
from .jitcache import helper
from .layout import (
    G_CAPACITY,
    G_HITS,
    G_INDEX,
    G_SLOTS,
    H_CLEARS,
    H_CLOCK,
    H_EVICTED,
    H_EVICTING,
    H_INSERTED,
    H_LIVE,
    H_PINNED,
    H_REMOVED,
    H_WRITER_HIT_BLOCKS,
    H_WRITER_MATCHES,
    H_WRITER_QUERY_BLOCKS,
    LINK_FREE,
    LINK_PARENT_BIAS,
    LOW32,
    R_KEY_LO,
    R_PINS,
    R_RECENCY,
    R_VALUE,
)
from .matcher import CLOCK_TICK, home_slot, walk
from .pinsync import announce_drop, reader_pinned, sync_reader_pins
from .tables import K_INDEX, K_VMAP, table_delete, table_insert, value_hash, value_home, value_lookup
from .tree import (
    attach_child,
    detach_child,
    evictable_leaf,
    free_record,
    heap_pop,
    heap_push,
    heap_rebuild,
    push_if_evictable,
)
from .wstate import (
    FC,
    J_DROPPED,
    J_STORED,
    M_FREE_TOP,
    M_HEAP_SIZE,
    M_RPINNED,
    NEXT,
    NIL,
    adjust_protect,
    begin,
    bump,
    client_of,
    count_owners,
    effective_recency,
    end,
    field,
    is_live,
    is_protected,
    note,
    owners_of,
    parent_of,
    pins_of,
    publish,
    rec,
    set_field,
    set_owners,
    step,
)

# Status codes returned by kernels (mapped to exceptions in shmcache.writer).
OK = 0
ERR_DUP_VALUE = 1  # info: block index whose value is already cached for this client
ERR_DUP_IN_CALL = 2  # info: block index whose value repeats an earlier one in the call
ERR_FULL = 3  # info: blocks that could be made available
ERR_PARTIAL = 5  # info: new blocks inserted before room ran out (readers pinned during the call)
ERR_STALE = 6  # the state to insert below is gone, or not held by the inserting owner

_ONE = np.uint64(1)
# Ints passed to helpers as NumPy scalars, not Python literals: Numba
# compiles a separate copy of a function for each literal value an argument
# is called with (1-2 s each on a fresh machine). See ``jitcache.helper``.
_NONE = np.int64(0)
_PIN = np.int64(1)
_LOW32 = np.uint64(LOW32)
_ZERO64 = np.uint64(0)


# --- adding and removing states -----------------------------------------------


@helper
def add_state(A, parent, key_lo, key_hi, value, client, clock, owners):
    """Publish a new state under ``parent``, held by ``owners``, and index
    it; returns its id."""
    top = A.meta[M_FREE_TOP] - 1
    s = A.free[top]
    A.meta[M_FREE_TOP] = top
    store_relaxed(A.wdata, A.geom[G_HITS] + s, np.uint64(0))
    link = np.uint64(parent + LINK_PARENT_BIAS) | (np.uint64(client) << np.uint64(32))
    count_owners(A, np.uint64(0), owners)
    publish(A, s, key_lo, key_hi, np.uint64(value), link, clock, np.uint64(0), owners)
    table_insert(A, K_INDEX, s)
    table_insert(A, K_VMAP, s)
    attach_child(A, parent, s)
    bump(A, H_LIVE, 1)
    return s


@helper
def drop_state(A, s, out, n_out):
    """Unindex and free the leaf ``s``; its (value, client) go to ``out[n_out]``.

    Evictions have announced ``s`` already (``reader_pinned``); removes and
    clears announce it here, so whether a reader pin holds the record back
    is decided on current knowledge, race included.
    """
    if load_relaxed(A.data, H_EVICTING) != np.uint64(s + 1):
        announce_drop(A, s)
    out[n_out, 0] = np.int64(field(A, s, R_VALUE))
    out[n_out, 1] = client_of(A, s)
    note(A, J_DROPPED, s, field(A, s, R_KEY_LO), owners_of(A, s), _NONE, _NONE, _NONE)
    table_delete(A, K_INDEX, s)
    table_delete(A, K_VMAP, s)
    detach_child(A, parent_of(A, s), s)
    A.gen[s] += _ONE  # writer pin handles naming it no longer hold anything here
    if pins_of(A, s) > 0:
        adjust_protect(A, s, np.int64(-1))
    count_owners(A, owners_of(A, s), np.uint64(0))
    free = np.uint64(0)
    publish(A, s, free, free, free, np.uint64(LINK_FREE), free, free, free)
    if A.rpin[s] == 0:
        free_record(A, s)
    else:
        # A reader pin still names it (a remove or clear dropped a pinned
        # block): reused now, it would protect an unrelated block. It is
        # freed when its last reader pin goes (count_reader_pin).
        A.held[s] = True
    store_release(A.data, H_EVICTING, np.uint64(0))
    bump(A, H_LIVE, -1)
    return n_out + 1


@helper
def subtree_size(A, s):
    """States in the subtree of ``s``, itself included (children lists walk)."""
    count = 0
    cur = s
    while True:
        count += 1
        if A.links[cur, FC] != NIL:
            cur = A.links[cur, FC]
            continue
        while cur != s and A.links[cur, NEXT] == NIL:
            cur = parent_of(A, cur)
        if cur == s:
            return count
        cur = A.links[cur, NEXT]


@helper
def drop_subtree(A, s, out, n_out):
    """Drop ``s`` and all its descendants, children first, into ``out``."""
    cur = s
    while True:
        while A.links[cur, FC] != NIL:
            cur = A.links[cur, FC]
        up = parent_of(A, cur)
        n_out = drop_state(A, cur, out, n_out)
        if cur == s:
            return n_out
        cur = up


@helper
def evict_into(A, need, protect, out, n_out):
    """Evict up to ``need`` LRU unpinned leaves, never ``protect``.

    A parent inherits the recency of the child evicted under it, so a
    cascade keeps LRU order (readers stamp only the deepest state they hit).
    Returns the new ``n_out``.
    """
    done = 0
    rebuilt = False
    sync_reader_pins(A)  # leaves whose last reader pin went are back in the heap
    while done < need:
        if A.meta[M_HEAP_SIZE] == 0:
            if rebuilt:
                break
            heap_rebuild(A)
            rebuilt = True
            continue
        key, s = heap_pop(A)
        if not evictable_leaf(A, s) or s == protect:
            continue
        e = effective_recency(A, s)
        if e > key:
            heap_push(A, e, s)
            continue
        if reader_pinned(A, s):
            continue  # pushed back when its last reader pin goes
        p = parent_of(A, s)
        n_out = drop_state(A, s, out, n_out)
        done += 1
        if p >= 0:
            if field(A, p, R_RECENCY) < e:
                set_field(A, p, R_RECENCY, e)
            if p != protect:
                push_if_evictable(A, p)
    bump(A, H_EVICTED, done)
    return n_out


@njit(cache=True)
def evictable_count(A, start, path, k, need):
    """How many states eviction could free for an insert below ``path[:k]``
    (itself below ``start``, -1 for the root) that needs ``need``: live
    states that no writer pin protects, no reader pin names, and that are
    not on the path from the root (it must survive). Exact without reader
    pins; with them a lower bound (a state both writer- and reader-pinned
    counts twice), made exact by one pass over the table only when the
    bound falls short of ``need``.
    """
    sync_reader_pins(A)
    free_on_path = 0
    s = start
    while s >= 0:
        free_on_path += not is_protected(A, s) and A.rpin[s] == 0
        s = parent_of(A, s)
    for i in range(k):
        if not is_protected(A, path[i]) and A.rpin[path[i]] == 0:
            free_on_path += 1
    live = np.int64(A.data[H_LIVE])
    bound = live - np.int64(A.data[H_PINNED]) - A.meta[M_RPINNED] - free_on_path
    if A.meta[M_RPINNED] == 0 or bound >= need:
        return bound
    on_path = np.zeros(A.geom[G_CAPACITY], dtype=np.bool_)
    for i in range(k):
        on_path[path[i]] = True
    s = start
    while s >= 0:
        on_path[s] = True
        s = parent_of(A, s)
    exact = 0
    for s in range(A.geom[G_CAPACITY]):
        if is_live(A, s) and not is_protected(A, s) and A.rpin[s] == 0 and not on_path[s]:
            exact += 1
    return exact


# --- operations -------------------------------------------------------------------


@helper
def prefetch_new_blocks(A, keys, values, k, n, client):
    """Ask for every cache line the insert of blocks ``k..n`` will touch at
    random (value-map and index home slots, the records it will take and
    their hit stamps) before touching any: one at a time, each is a memory
    round trip; asked together, they overlap."""
    index, n_slots, n_vmap = A.geom[G_INDEX], A.geom[G_SLOTS], A.vmap.shape[0]
    for i in range(k, n):
        prefetch(A.vmap, value_home(values[i], client, n_vmap))
        prefetch(A.data, index + home_slot(keys[i, 1], n_slots))
    top = A.meta[M_FREE_TOP]
    for j in range(min(n - k, top)):
        s = A.free[top - 1 - j]
        prefetch(A.wdata, A.geom[G_HITS] + s)
        prefetch(A.data, rec(A, s))


@helper
def first_cached_value(A, values, k, n, client):
    """First ``i`` in ``k..n`` whose value ``client`` already has cached, or -1.
    (The kernels' loops over blocks live in helpers: a kernel passing the
    Arrays tuple to a helper pays its reference counting on every call.)"""
    for i in range(k, n):
        if value_lookup(A, values[i], client) >= 0:
            return i
    return -1


@helper
def first_repeat(values, k, n, seen):
    """First ``i`` in ``k..n`` whose value is also among ``values[k:i]``, or
    -1. ``seen``, zeroed, a power of two of at least ``2 (n - k)`` entries,
    is an open-addressing set of ``index + 1``. (A sort found the repeats
    before: it compiled Numba's mergesort, 3 s of a fresh writer's start.)"""
    mask = seen.shape[0] - 1
    for i in range(k, n):
        h = np.int64(value_hash(values[i], 0) & np.uint64(mask))
        while seen[h] != 0:
            if values[seen[h] - 1] == values[i]:
                return i
            h = (h + 1) & mask
        seen[h] = i + 1
    return -1


@helper
def add_chain(A, start, path, k, keys, values, end, client, clock, owners):
    """Add blocks ``k..end`` below ``path[:k]`` (itself below ``start``, -1
    for the root), each the child of the one before, their states going to
    ``path[k:end]``. The whole path is held by ``owners`` and its recency
    is ``clock``; the cached blocks get them first, so an owner holds each
    block's parent before the block (watchers see them in that order)."""
    for i in range(k):  # parents first: an owner holds a block's parent before the block
        set_field(A, path[i], R_RECENCY, clock)
        held = owners_of(A, path[i])
        if held & owners != owners:
            set_owners(A, path[i], held | owners)
    parent = path[k - 1] if k > 0 else start
    for i in range(k, end):
        s = add_state(A, parent, keys[i, 0], keys[i, 1], values[i], client, clock, owners)
        path[i] = s
        note(A, J_STORED, s, i, owners, keys[i, 0], parent, field(A, parent, R_KEY_LO) if parent >= 0 else _ZERO64)
        parent = s
    if end > k:
        push_if_evictable(A, parent)


@njit(cache=True)
def insert_kernel(A, start, start_gen, keys, values, n, client, owners, refs):
    """Insert the chain ``keys[:n]`` with ``values[:n]`` below state
    ``start`` (-1: the root; else valid while its drop count is
    ``start_gen``), the whole path held by ``owners`` (presence bits, 0 for
    none). Values of blocks already cached are ignored: they keep theirs.

    Returns ``(status, info, n_cached_blocks, evicted)``, ``evicted`` being
    ``(value, client)`` rows; ``refs[i]``, if ``refs`` has room, receives
    block ``i``'s ``(state, drop count)``, what ``start``/``start_gen`` of a
    later insert below it take. On any status but OK nothing was changed.
    """
    path = np.empty(n, dtype=np.int64)
    versions = np.empty(n, dtype=np.uint64)
    old_values = np.empty(n, dtype=np.int64)
    evicted = np.empty((0, 2), dtype=np.int64)
    if start >= 0 and not (start < A.geom[G_CAPACITY] and is_live(A, start) and A.gen[start] == start_gen
                           and owners_of(A, start) & owners == owners):
        return ERR_STALE, 0, 0, evicted
    k = walk(A.data, A.geom, start, keys, n, path, versions, old_values, versions, False)
    prefetch_new_blocks(A, keys, values, k, n, client)
    i = first_cached_value(A, values, k, n, client)
    if i >= 0:
        return ERR_DUP_VALUE, i, k, evicted
    if n - k > 1:
        size = 2
        while size < 2 * (n - k):
            size *= 2
        i = first_repeat(values, k, n, np.zeros(size, dtype=np.int64))
        if i >= 0:
            return ERR_DUP_IN_CALL, i, k, evicted
    sync_reader_pins(A)  # records reader pins held back may have been released
    need = (n - k) - A.meta[M_FREE_TOP]
    if need > 0:
        evictable = evictable_count(A, start, path, k, need)
        if need > evictable:
            return ERR_FULL, evictable + A.meta[M_FREE_TOP], k, evicted
    evicted = np.empty((max(need, 0), 2), dtype=np.int64)
    begin(A)
    clock = A.data[H_CLOCK]
    n_ev = 0
    if need > 0:
        n_ev = evict_into(A, need, path[k - 1] if k > 0 else start, evicted, _NONE)
    # Short only if readers pinned blocks while this call evicted: insert
    # what fits (a prefix of the new blocks, so the tree stays prefix-closed).
    end_new = min(n, k + A.meta[M_FREE_TOP])
    add_chain(A, start, path, k, keys, values, end_new, client, clock, owners)
    bump(A, H_INSERTED, end_new - k)
    end(A)
    if refs.shape[0] >= end_new:
        for i in range(end_new):
            refs[i, 0] = path[i]
            refs[i, 1] = np.int64(A.gen[path[i]])
    if end_new < n:
        return ERR_PARTIAL, end_new - k, k, evicted[:n_ev]
    return OK, 0, k, evicted[:n_ev]


@njit(cache=True)
def match_kernel(A, keys, n):
    """The writer's own match: like a reader's, and it counts as a use (LRU)."""
    path = np.empty(n, dtype=np.int64)
    versions = np.empty(n, dtype=np.uint64)
    values = np.empty(n, dtype=np.int64)
    k = walk(A.data, A.geom, np.int64(-1), keys, n, path, versions, values, versions, False)
    clock = A.data[H_CLOCK] + CLOCK_TICK
    store_relaxed(A.data, H_CLOCK, clock)
    for i in range(k):
        set_field(A, path[i], R_RECENCY, clock)
    bump(A, H_WRITER_MATCHES, 1)
    bump(A, H_WRITER_QUERY_BLOCKS, n)
    bump(A, H_WRITER_HIT_BLOCKS, k)
    return values[:k]


@njit(cache=True)
def drop_subtrees(A, roots, out):
    """One operation: drop each state of ``roots`` that is still live, with its
    subtree (a root inside an earlier root's subtree is already gone).
    Returns the ``(value, client)`` rows written to ``out``, children first."""
    begin(A)
    n_out = _NONE
    for s in roots:
        if s < 0 or not is_live(A, s):
            continue
        p = parent_of(A, s)
        n_out = drop_subtree(A, s, out, n_out)
        push_if_evictable(A, p)
    bump(A, H_REMOVED, n_out)
    end(A)
    return out[:n_out]


@njit(cache=True)
def remove_kernel(A, values, client):
    """Drop the states holding ``values`` (of ``client``) with their subtrees.

    Unknown values are skipped. Returns the removed ``(value, client)`` rows,
    children first (a subtree may hold other clients' blocks).
    """
    roots = np.empty(values.shape[0], dtype=np.int64)
    room = 0
    for i in range(values.shape[0]):
        roots[i] = value_lookup(A, values[i], client)
        if roots[i] >= 0:
            room += subtree_size(A, roots[i])
    return drop_subtrees(A, roots, np.empty((min(room, np.int64(A.data[H_LIVE])), 2), dtype=np.int64))


@njit(cache=True)
def remove_client_kernel(A, client):
    """Drop every state ``client`` inserted, with its subtree (a client's KV
    died with it), except those a named owner holds: they stay while held
    (the owner's KV is alive), and so does the path to them, since an owner
    holds every ancestor of a block it holds. Returns the ``(value,
    client)`` rows, children first."""
    roots = np.empty(np.int64(A.data[H_LIVE]), dtype=np.int64)
    n = 0
    for s in range(A.geom[G_CAPACITY]):
        if is_live(A, s) and client_of(A, s) == client and owners_of(A, s) == 0 and n < roots.shape[0]:
            roots[n] = s
            n += 1
    return drop_subtrees(A, roots[:n], np.empty((np.int64(A.data[H_LIVE]), 2), dtype=np.int64))


@njit(cache=True)
def evict_kernel(A, n):
    """Evict up to ``n`` LRU unpinned leaves, cascading; returns their ``(value, client)`` rows."""
    out = np.empty((min(n, np.int64(A.data[H_LIVE])), 2), dtype=np.int64)
    begin(A)
    n_out = evict_into(A, out.shape[0], np.int64(-1), out, _NONE)
    end(A)
    return out[:n_out]


@njit(cache=True)
def clear_kernel(A):
    """Drop every state; returns the ``(value, client)`` rows, children before parents."""
    out = np.empty((np.int64(A.data[H_LIVE]), 2), dtype=np.int64)
    begin(A)
    n_out = _NONE
    root = A.geom[G_CAPACITY]
    while A.links[root, FC] != NIL:
        n_out = drop_subtree(A, A.links[root, FC], out, n_out)
    A.meta[M_HEAP_SIZE] = 0
    bump(A, H_CLEARS, 1)
    end(A)
    return out[:n_out]


@njit(cache=True)
def sync_kernel(A):
    """Catch up with the readers' pin entries now; returns how many states
    reader pins name."""
    sync_reader_pins(A)
    return A.meta[M_RPINNED]


@helper
def add_pins(A, path, k, delta):
    """Add ``delta`` (+1 or -1) to the own pin count of each of ``path[:k]``,
    a chain of states from the root, keeping every pinned-descendant count
    and the header's PINNED exact.

    Pin counts are per-block reference counts, as an engine holds blocks
    per request; a state is protected from eviction while it or any
    descendant is pinned.
    """
    # Walking up from the deepest block, ``below`` counts the path states at
    # or under the current one that became pinned (or unpinned): exactly what
    # its pinned-descendant count changes by. The path starts at the root, so
    # no state above it is affected.
    below = 0
    for i in range(k - 1, -1, -1):
        s = path[i]
        word = field(A, s, R_PINS)
        own = np.int64(word & _LOW32)
        if own == 0 and own + delta > 0:
            below += 1
        elif own > 0 and own + delta == 0:
            below -= 1
        old_protect = np.int64(word >> np.uint64(32))
        new_protect = old_protect + below
        step(A)
        set_field(A, s, R_PINS, (np.uint64(new_protect) << np.uint64(32)) | np.uint64(own + delta))
        if old_protect == 0 and new_protect > 0:
            bump(A, H_PINNED, 1)
        elif old_protect > 0 and new_protect == 0:
            bump(A, H_PINNED, -1)
            push_if_evictable(A, s)


@njit(cache=True)
def pin_kernel(A, keys, n, states, gens):
    """Pin every cached block of the chain ``keys[:n]``; returns how many.

    The pinned states go to ``states[:k]`` and their records' drop counts
    (``Arrays.gen``) to ``gens[:k]``: the handle ``unpin_kernel`` takes.
    """
    versions = np.empty(n, dtype=np.uint64)
    values = np.empty(n, dtype=np.int64)
    k = walk(A.data, A.geom, np.int64(-1), keys, n, states, versions, values, versions, False)
    begin(A)
    add_pins(A, states, k, _PIN)
    for i in range(k):
        gens[i] = A.gen[states[i]]
    end(A)
    return k


@njit(cache=True)
def unpin_kernel(A, states, gens):
    """Release a pin taken by ``pin_kernel`` (its ``states`` and ``gens``);
    returns how many of its blocks it still held.

    A block removed since (and perhaps inserted again, maybe in the same
    record) was dropped with its subtree, so the blocks the pin still holds
    are exactly the leading ones whose record has not been dropped since:
    those, and only those, are unpinned. Never fails halfway.
    """
    cap = A.geom[G_CAPACITY]
    k = 0
    while k < states.shape[0] and 0 <= states[k] < cap and A.gen[states[k]] == gens[k] and pins_of(A, states[k]) > 0:
        k += 1
    begin(A)
    add_pins(A, states, k, -_PIN)
    end(A)
    return k
