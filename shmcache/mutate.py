"""The writer's Numba kernels: every change to a segment goes through here.

Publication protocol (the reader's half is in ``shmcache.matcher``):

* An operation is bracketed by the header's MUTATIONS word: made odd (relaxed
  store + release fence) before the first change, even (release store)
  after the last, so it grows by exactly 2 per operation.
* A record is changed by storing version+1 (odd), a release fence, the
  fields (relaxed atomic stores), then version+2 with release ordering.
* A new state is fully published before its index slot is stored; a state
  is dropped from the index before its record is freed. States are added
  parents first and removed children first, so the live set is always
  prefix-closed.

Writer-private structures live in ordinary process memory (``Arrays``) and
are derived from the state table, so ``rebuild`` can recreate them after any
crash: children lists, the free-record stack, a lazy min-heap of leaves keyed
by recency (exact LRU: a popped entry whose state was used since is pushed
back with its new key), a value map from (owner, value) to state, and the
count of reader pin entries naming each state (the writer's half of the
reader-pin handshake is ``reader_pinned``; ``shmcache.pins`` explains it).

A test hook can stop the writer at any numbered step: ``meta[M_CRASH] = k``
makes the k-th step raise ``WriterCrashed``, which unwinds the kernel with
nothing after that step written; the Python layer then SIGKILLs the process.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from .atomics import fence_release, fence_seq_cst, load_acquire, load_relaxed, prefetch, store_relaxed, store_release
from .layout import (
    G_CAPACITY,
    G_HITS,
    G_INDEX,
    G_PINS,
    G_READER_PINS,
    G_READER_SLOTS,
    G_SLOTS,
    G_STATES,
    H_CLEARS,
    H_CLOCK,
    H_EVICTED,
    H_EVICTING,
    H_INSERTED,
    H_LIVE,
    H_MAX_PROBE,
    H_MUTATIONS,
    H_PINNED,
    H_RECOVERED,
    H_REMOVED,
    H_WRITER_HIT_BLOCKS,
    H_WRITER_MATCHES,
    H_WRITER_QUERY_BLOCKS,
    LINK_FREE,
    LINK_PARENT_BIAS,
    LOW32,
    R_KEY_HI,
    R_KEY_LO,
    R_LINK,
    R_PINS,
    R_RECENCY,
    R_VALUE,
    R_VERSION,
    RD_PIN_SEQ,
    reader_word,
    RECORD_WORDS,
    SLOT_STATE_MASK,
    TAG_MASK,
    W_PIN_SEQ,
)
from .matcher import CLOCK_TICK, find_state, home_slot, max_probe, walk


#: Decorator of the writer's helpers: functions that take ``Arrays`` and
#: never allocate, create or return an array. They are compiled without
#: Numba's reference counting (NRT). With it, every field of the 13-array
#: ``Arrays`` tuple a helper touches costs an incref/decref call pair that
#: LLVM cannot prune in branchy code: a 128-block insert measured 5.6x
#: slower per block. The kernels that call them (and allocate) keep NRT and
#: own every reference, so the helpers only borrow. ``_nrt`` is a Numba
#: compiler option (``numba.core.options``); tests exercise every helper.
helper = njit(_nrt=False)


class WriterCrashed(Exception):
    """Raised by the crash test hook at the chosen step."""


class Arrays(NamedTuple):
    """Everything a writer kernel touches. ``data``/``wdata`` are the segment's
    two parts; the rest is writer-private and rebuilt by ``rebuild``."""

    data: np.ndarray  # uint64, data part, writable
    wdata: np.ndarray  # uint64, writable part
    geom: np.ndarray  # int64, layout.G_* vector
    links: np.ndarray  # int64 (capacity + 1, 3): first child, next, prev; row capacity is the root
    free: np.ndarray  # int64 (capacity,): stack of free record ids
    heap_key: np.ndarray  # uint64: recency of each heap entry
    heap_state: np.ndarray  # int64: state of each heap entry
    vmap: np.ndarray  # uint64: (owner, value) -> state + 1, 0 empty
    meta: np.ndarray  # int64: M_* below
    pins: np.ndarray  # uint32 view of the writable part (readers' pin entries at G_PINS)
    rpin: np.ndarray  # int32 (capacity,): reader pin entries naming each state
    held: np.ndarray  # bool (capacity,): free records kept off the free stack while a reader pin names them
    rprev: np.ndarray  # uint32: the pin area as last scanned
    rseen: np.ndarray  # uint64 (reader slots,): each slot's PIN_SEQ as last scanned


M_FREE_TOP = 0
M_HEAP_SIZE = 1
M_CRASH = 2
M_PIN_SEQ = 3  # W_PIN_SEQ as last scanned (uint64 bits)
M_RPINNED = 4  # states named by at least one reader pin entry
M_WORDS = 6

FC, NEXT, PREV = 0, 1, 2
NIL = -1

# Status codes returned by kernels (mapped to exceptions in shmcache.writer).
OK = 0
ERR_DUP_VALUE = 1  # info: block index whose value is already cached for this owner
ERR_DUP_IN_CALL = 2  # info: block index whose value repeats an earlier one in the call
ERR_FULL = 3  # info: blocks that could be made available
ERR_NOT_PINNED = 4  # info: block index that is not pinned
ERR_PARTIAL = 5  # info: new blocks inserted before room ran out (readers pinned during the call)

K_INDEX = 0
K_VMAP = 1

_ONE = np.uint64(1)
_LOW32 = np.uint64(LOW32)
_TAG = np.uint64(TAG_MASK)
_SLOT = np.uint64(SLOT_STATE_MASK)


def _zeros(n: int, dtype) -> np.ndarray:
    """Zeros with every page already faulted in. ``np.zeros`` maps lazily
    zeroed pages, and the writer touches these arrays at random, so the
    first inserts into a fresh segment would pay a page fault per 4 KB."""
    a = np.empty(n, dtype=dtype)
    a.fill(0)
    return a


def new_arrays(data: np.ndarray, wdata: np.ndarray, geom: np.ndarray) -> Arrays:
    """Allocate the writer-private arrays for a segment (contents rebuilt later)."""
    cap = int(geom[G_CAPACITY])
    return Arrays(
        data=data,
        wdata=wdata,
        geom=geom,
        links=np.full((cap + 1, 3), NIL, dtype=np.int64),
        free=_zeros(cap, np.int64),
        heap_key=_zeros(2 * cap + 64, np.uint64),
        heap_state=_zeros(2 * cap + 64, np.int64),
        vmap=_zeros(max(16, 2 * cap), np.uint64),
        meta=np.zeros(M_WORDS, dtype=np.int64),
        pins=wdata.view(np.uint32),
        rpin=_zeros(cap, np.int32),
        held=_zeros(cap, np.bool_),
        rprev=np.zeros(int(geom[G_READER_SLOTS]) * int(geom[G_READER_PINS]), dtype=np.uint32),
        rseen=np.zeros(int(geom[G_READER_SLOTS]), dtype=np.uint64),
    )


# --- crash hook and operation bracket ---------------------------------------


@njit(inline="always")
def step(A):
    c = A.meta[M_CRASH]
    if c > 0:
        A.meta[M_CRASH] = c - 1
        if c == 1:
            raise WriterCrashed("shmcache test hook: writer stopped at the requested step")


@njit(inline="always")
def begin(A):
    step(A)
    m = A.data[H_MUTATIONS]
    store_relaxed(A.data, H_MUTATIONS, m | _ONE)
    fence_release()
    store_relaxed(A.data, H_CLOCK, A.data[H_CLOCK] + CLOCK_TICK)


@njit(inline="always")
def end(A):
    step(A)
    store_release(A.data, H_MUTATIONS, (A.data[H_MUTATIONS] | _ONE) + _ONE)


@njit(inline="always")
def bump(A, word, delta):
    store_relaxed(A.data, word, np.uint64(np.int64(A.data[word]) + delta))


# --- record access ------------------------------------------------------------


@njit(inline="always")
def rec(A, s):
    return A.geom[G_STATES] + s * RECORD_WORDS


@njit(inline="always")
def field(A, s, f):
    return A.data[rec(A, s) + f]


@njit(inline="always")
def set_field(A, s, f, v):
    store_relaxed(A.data, rec(A, s) + f, np.uint64(v))


@njit(inline="always")
def parent_of(A, s):
    """Parent state, -1 for the root, -2 for a free record."""
    return np.int64(field(A, s, R_LINK) & _LOW32) - LINK_PARENT_BIAS


@njit(inline="always")
def owner_of(A, s):
    return np.int64(field(A, s, R_LINK) >> np.uint64(32))


@njit(inline="always")
def pins_of(A, s):
    """The state's own pin count (pins taken on paths through it)."""
    return np.int64(field(A, s, R_PINS) & _LOW32)


@njit(inline="always")
def is_protected(A, s):
    """Whether ``s`` or a descendant is pinned: then it is never evicted."""
    return (field(A, s, R_PINS) >> np.uint64(32)) != 0


@helper
def adjust_protect(A, s, delta):
    """Add ``delta`` to the pinned-descendant count of ``s`` and its ancestors,
    keeping the header's PINNED (protected states) in step."""
    while s >= 0:
        word = field(A, s, R_PINS)
        old = np.int64(word >> np.uint64(32))
        new = old + delta
        set_field(A, s, R_PINS, (np.uint64(new) << np.uint64(32)) | (word & _LOW32))
        if old == 0 and new > 0:
            bump(A, H_PINNED, 1)
        elif old > 0 and new == 0:
            bump(A, H_PINNED, -1)
        s = parent_of(A, s)


@njit(inline="always")
def is_live(A, s):
    return (field(A, s, R_LINK) & _LOW32) != LINK_FREE


@njit(inline="always")
def node(A, p):
    """Row of ``links`` for parent ``p`` (-1 is the root)."""
    return A.geom[G_CAPACITY] if p < 0 else p


@njit(inline="always")
def is_leaf(A, s):
    return A.links[s, FC] == NIL


@njit(inline="always")
def effective_recency(A, s):
    """Last use of ``s`` by the writer or (hit stamp) by any reader."""
    return max(field(A, s, R_RECENCY), load_relaxed(A.wdata, A.geom[G_HITS] + s))


@njit(inline="always")
def publish(A, s, key_lo, key_hi, value, link, recency, pins):
    """Rewrite record ``s`` under its version (odd, fields, even)."""
    base = rec(A, s)
    v = A.data[base + R_VERSION] | _ONE
    store_relaxed(A.data, base + R_VERSION, v)
    fence_release()
    step(A)
    store_relaxed(A.data, base + R_KEY_LO, key_lo)
    store_relaxed(A.data, base + R_KEY_HI, key_hi)
    store_relaxed(A.data, base + R_VALUE, value)
    store_relaxed(A.data, base + R_LINK, link)
    store_relaxed(A.data, base + R_RECENCY, recency)
    store_relaxed(A.data, base + R_PINS, pins)
    step(A)
    store_release(A.data, base + R_VERSION, v + _ONE)


# --- the two hash tables: shared transition index and private value map --------


@njit(inline="always")
def value_hash(value, owner):
    """A well-mixed 64-bit hash of ``(owner, value)`` (splitmix64's finaliser)."""
    z = np.uint64(value) ^ (np.uint64(owner) * np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def value_home(value, owner, n_slots):
    return home_slot(value_hash(value, owner), n_slots)


@njit(inline="always")
def value_tag(value, owner):
    """The value map's slot tag: low hash bits, independent of the home
    (which the high bits pick), so a probe skips foreign slots without
    reading their records."""
    return value_hash(value, owner) << np.uint64(32)


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
    return value_tag(field(A, s, R_VALUE), owner_of(A, s)) | np.uint64(s + 1)


@njit(inline="always")
def home_of(A, kind, s):
    if kind == K_INDEX:
        return home_slot(field(A, s, R_KEY_HI), A.geom[G_SLOTS])
    return value_home(field(A, s, R_VALUE), owner_of(A, s), A.vmap.shape[0])


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
def value_lookup(A, value, owner):
    """State holding ``value`` for ``owner``, or -1."""
    n = A.vmap.shape[0]
    pos = value_home(value, owner, n)
    tag = value_tag(value, owner)
    for _ in range(n):
        w = A.vmap[pos]
        if w == 0:
            return -1
        s = np.int64(w & _SLOT) - 1
        if (w & _TAG) == tag and np.int64(field(A, s, R_VALUE)) == value and owner_of(A, s) == owner:
            return s
        pos += 1
        if pos == n:
            pos = 0
    return -1


# --- children lists, free stack, LRU heap ---------------------------------------


@njit(inline="always")
def attach_child(A, p, s):
    r = node(A, p)
    first = A.links[r, FC]
    A.links[s, NEXT] = first
    A.links[s, PREV] = NIL
    if first != NIL:
        A.links[first, PREV] = s
    A.links[r, FC] = s


@njit(inline="always")
def detach_child(A, p, s):
    prev = A.links[s, PREV]
    nxt = A.links[s, NEXT]
    if prev != NIL:
        A.links[prev, NEXT] = nxt
    else:
        A.links[node(A, p), FC] = nxt
    if nxt != NIL:
        A.links[nxt, PREV] = prev
    A.links[s, NEXT] = NIL
    A.links[s, PREV] = NIL


@helper
def heap_sift_down(A, i, n):
    key = A.heap_key[i]
    s = A.heap_state[i]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and A.heap_key[c + 1] < A.heap_key[c]:
            c += 1
        if A.heap_key[c] >= key:
            break
        A.heap_key[i] = A.heap_key[c]
        A.heap_state[i] = A.heap_state[c]
        i = c
    A.heap_key[i] = key
    A.heap_state[i] = s


@helper
def heap_rebuild(A):
    """Refill the heap with exactly the evictable leaves (drops stale entries)."""
    n = 0
    for s in range(A.geom[G_CAPACITY]):
        if evictable_leaf(A, s):
            A.heap_key[n] = effective_recency(A, s)
            A.heap_state[n] = s
            n += 1
    for i in range(n // 2 - 1, -1, -1):
        heap_sift_down(A, i, n)
    A.meta[M_HEAP_SIZE] = n


@helper
def heap_push(A, key, s):
    n = A.meta[M_HEAP_SIZE]
    if n == A.heap_key.shape[0]:
        heap_rebuild(A)
        n = A.meta[M_HEAP_SIZE]
    i = n
    while i > 0:
        p = (i - 1) // 2
        if A.heap_key[p] <= key:
            break
        A.heap_key[i] = A.heap_key[p]
        A.heap_state[i] = A.heap_state[p]
        i = p
    A.heap_key[i] = key
    A.heap_state[i] = s
    A.meta[M_HEAP_SIZE] = n + 1


@helper
def heap_pop(A):
    n = A.meta[M_HEAP_SIZE] - 1
    key = A.heap_key[0]
    s = A.heap_state[0]
    A.meta[M_HEAP_SIZE] = n
    if n > 0:
        A.heap_key[0] = A.heap_key[n]
        A.heap_state[0] = A.heap_state[n]
        heap_sift_down(A, 0, n)
    return key, s


@njit(inline="always")
def evictable_leaf(A, s):
    """A live leaf that no writer pin protects and no reader pin names."""
    return is_live(A, s) and is_leaf(A, s) and not is_protected(A, s) and A.rpin[s] == 0


@njit(inline="always")
def push_if_evictable(A, s):
    if s >= 0 and evictable_leaf(A, s):
        heap_push(A, effective_recency(A, s), s)


# --- reader pins: the writer's half of the handshake (see shmcache.pins) -------


@helper
def count_reader_pin(A, entry, delta):
    """Add ``delta`` to the count of the state a pin entry names (garbage
    entries name nothing); a state whose last pin went may become evictable."""
    s = np.int64(entry) - 1
    if s < 0 or s >= A.geom[G_CAPACITY]:
        return
    before = A.rpin[s]
    A.rpin[s] = before + delta
    if before == 0 and delta > 0:
        A.meta[M_RPINNED] += 1
    elif before > 0 and before + delta == 0:
        A.meta[M_RPINNED] -= 1
        if is_live(A, s):
            push_if_evictable(A, s)
        elif A.held[s]:
            A.held[s] = False
            free_record(A, s)
        # else the record is on the free stack already: an entry a reader
        # stored and withdrew (its validation failed), or a stray value.


@helper
def sync_reader_pins(A):
    """Bring ``rpin`` up to date with the readers' pin entries.

    Costs one load when W_PIN_SEQ has not moved; otherwise rescans the
    slots whose PIN_SEQ changed. Entries are single words, so a slot being
    changed mid-scan is seen entry by entry, each a real pin or none; the
    change is announced after the entries, so the next call rescans it.
    """
    g = load_acquire(A.wdata, W_PIN_SEQ)
    if np.int64(g) == A.meta[M_PIN_SEQ]:
        return
    per = A.geom[G_READER_PINS]
    area = A.geom[G_PINS]
    for slot in range(A.geom[G_READER_SLOTS]):
        seq = load_acquire(A.wdata, reader_word(slot, RD_PIN_SEQ))
        if seq == A.rseen[slot]:
            continue
        A.rseen[slot] = seq
        base = slot * per
        for i in range(per):
            e = load_relaxed(A.pins, area + base + i)
            old = A.rprev[base + i]
            if e != old:
                A.rprev[base + i] = e
                count_reader_pin(A, old, -1)
                count_reader_pin(A, e, 1)
    A.meta[M_PIN_SEQ] = np.int64(g)


@njit
def forget_reader_pins(A):
    """Drop everything ``sync_reader_pins`` knew, so its next call rescans
    every slot (after a takeover the pin area is all news)."""
    A.rpin[:] = 0
    A.rprev[:] = 0
    A.rseen[:] = ~np.uint64(0)
    A.meta[M_RPINNED] = 0
    A.meta[M_PIN_SEQ] = -1


@njit(inline="always")
def announce_drop(A, s):
    """Store H_EVICTING = ``s`` + 1, fence, and catch up with reader pins:
    after it, either ``rpin[s]`` counts every reader pin that will ever be
    reported on ``s``, or that reader sees the mark (or the drop) and
    reports the block unpinned. ``drop_state`` clears the mark."""
    # Release, not relaxed: a reader that reads this mark must also see the
    # drops announced before it (its version loads are relaxed).
    store_release(A.data, H_EVICTING, np.uint64(s + 1))
    fence_seq_cst()
    sync_reader_pins(A)


@njit(inline="always")
def reader_pinned(A, s):
    """Announce that leaf ``s`` is about to be evicted and say whether a
    reader pins it (then the announcement is withdrawn)."""
    announce_drop(A, s)
    if A.rpin[s] > 0:
        store_release(A.data, H_EVICTING, np.uint64(0))
        return True
    return False


# --- adding and removing states -----------------------------------------------


@helper
def add_state(A, parent, key_lo, key_hi, value, owner, clock):
    """Publish a new state under ``parent`` and index it; returns its id."""
    top = A.meta[M_FREE_TOP] - 1
    s = A.free[top]
    A.meta[M_FREE_TOP] = top
    store_relaxed(A.wdata, A.geom[G_HITS] + s, np.uint64(0))
    link = np.uint64(parent + LINK_PARENT_BIAS) | (np.uint64(owner) << np.uint64(32))
    publish(A, s, key_lo, key_hi, np.uint64(value), link, clock, np.uint64(0))
    table_insert(A, K_INDEX, s)
    table_insert(A, K_VMAP, s)
    attach_child(A, parent, s)
    bump(A, H_LIVE, 1)
    return s


@helper
def drop_state(A, s, out, n_out):
    """Unindex and free the leaf ``s``; its (value, owner) go to ``out[n_out]``.

    Evictions have announced ``s`` already (``reader_pinned``); removes and
    clears announce it here, so whether a reader pin holds the record back
    is decided on current knowledge, race included.
    """
    if load_relaxed(A.data, H_EVICTING) != np.uint64(s + 1):
        announce_drop(A, s)
    out[n_out, 0] = np.int64(field(A, s, R_VALUE))
    out[n_out, 1] = owner_of(A, s)
    table_delete(A, K_INDEX, s)
    table_delete(A, K_VMAP, s)
    detach_child(A, parent_of(A, s), s)
    if pins_of(A, s) > 0:
        adjust_protect(A, s, -1)
    publish(A, s, np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(LINK_FREE), np.uint64(0), np.uint64(0))
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


@njit(inline="always")
def free_record(A, s):
    A.free[A.meta[M_FREE_TOP]] = s
    A.meta[M_FREE_TOP] += 1


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


@njit
def evictable_count(A, path, k, need):
    """How many states eviction could free for an insert below ``path[:k]``
    that needs ``need``: live states that no writer pin protects, no reader
    pin names, and that are not on the path (it must survive). Exact without
    reader pins; with them a lower bound (a state both writer- and
    reader-pinned counts twice), made exact by one pass over the table only
    when the bound falls short of ``need``.
    """
    sync_reader_pins(A)
    free_on_path = 0
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
    exact = 0
    for s in range(A.geom[G_CAPACITY]):
        if is_live(A, s) and not is_protected(A, s) and A.rpin[s] == 0 and not on_path[s]:
            exact += 1
    return exact


# --- operations -------------------------------------------------------------------


@helper
def prefetch_new_blocks(A, keys, values, k, n, owner):
    """Ask for every cache line the insert of blocks ``k..n`` will touch at
    random (value-map and index home slots, the records it will take and
    their hit stamps) before touching any: one at a time, each is a memory
    round trip; asked together, they overlap."""
    index, n_slots, n_vmap = A.geom[G_INDEX], A.geom[G_SLOTS], A.vmap.shape[0]
    for i in range(k, n):
        prefetch(A.vmap, value_home(values[i], owner, n_vmap))
        prefetch(A.data, index + home_slot(keys[i, 1], n_slots))
    top = A.meta[M_FREE_TOP]
    for j in range(min(n - k, top)):
        s = A.free[top - 1 - j]
        prefetch(A.wdata, A.geom[G_HITS] + s)
        prefetch(A.data, rec(A, s))


@helper
def first_cached_value(A, values, k, n, owner):
    """First ``i`` in ``k..n`` whose value ``owner`` already has cached, or -1.
    (The kernels' loops over blocks live in helpers: a kernel passing the
    Arrays tuple to a helper pays its reference counting on every call.)"""
    for i in range(k, n):
        if value_lookup(A, values[i], owner) >= 0:
            return i
    return -1


@helper
def add_chain(A, path, k, keys, values, end, owner, clock):
    """Add blocks ``k..end`` below ``path[:k]`` (whose recency becomes
    ``clock``), each the child of the one before."""
    parent = path[k - 1] if k > 0 else np.int64(-1)
    for i in range(k, end):
        parent = add_state(A, parent, keys[i, 0], keys[i, 1], values[i], owner, clock)
    for i in range(k):
        set_field(A, path[i], R_RECENCY, clock)
    if end > k:
        push_if_evictable(A, parent)


@njit(cache=True)
def insert_kernel(A, keys, values, n, owner):
    """Insert the chain ``keys[:n]`` with ``values[:n]`` (values of blocks
    already cached are ignored: they keep theirs).

    Returns ``(status, info, n_cached_blocks, evicted)``, ``evicted`` being
    ``(value, owner)`` rows. On any status but OK nothing was changed.
    """
    path = np.empty(n, dtype=np.int64)
    versions = np.empty(n, dtype=np.uint64)
    old_values = np.empty(n, dtype=np.int64)
    k = walk(A.data, A.geom, keys, n, path, versions, old_values)
    prefetch_new_blocks(A, keys, values, k, n, owner)
    evicted = np.empty((max(n - k, 0), 2), dtype=np.int64)
    i = first_cached_value(A, values, k, n, owner)
    if i >= 0:
        return ERR_DUP_VALUE, i, k, evicted[:0]
    if n - k > 1:
        order = np.argsort(values[k:n], kind="mergesort")
        for j in range(1, n - k):
            if values[k + order[j]] == values[k + order[j - 1]]:
                return ERR_DUP_IN_CALL, k + order[j], k, evicted[:0]
    sync_reader_pins(A)  # records reader pins held back may have been released
    need = (n - k) - A.meta[M_FREE_TOP]
    if need > 0:
        evictable = evictable_count(A, path, k, need)
        if need > evictable:
            return ERR_FULL, evictable + A.meta[M_FREE_TOP], k, evicted[:0]
    begin(A)
    clock = A.data[H_CLOCK]
    n_ev = 0
    if need > 0:
        n_ev = evict_into(A, need, path[k - 1] if k > 0 else np.int64(-1), evicted, 0)
    # Short only if readers pinned blocks while this call evicted: insert
    # what fits (a prefix of the new blocks, so the tree stays prefix-closed).
    end_new = min(n, k + A.meta[M_FREE_TOP])
    add_chain(A, path, k, keys, values, end_new, owner, clock)
    bump(A, H_INSERTED, end_new - k)
    end(A)
    if end_new < n:
        return ERR_PARTIAL, end_new - k, k, evicted[:n_ev]
    return OK, 0, k, evicted[:n_ev]


@njit(cache=True)
def match_kernel(A, keys, n):
    """The writer's own match: like a reader's, and it counts as a use (LRU)."""
    path = np.empty(n, dtype=np.int64)
    versions = np.empty(n, dtype=np.uint64)
    values = np.empty(n, dtype=np.int64)
    k = walk(A.data, A.geom, keys, n, path, versions, values)
    clock = A.data[H_CLOCK] + CLOCK_TICK
    store_relaxed(A.data, H_CLOCK, clock)
    for i in range(k):
        set_field(A, path[i], R_RECENCY, clock)
    bump(A, H_WRITER_MATCHES, 1)
    bump(A, H_WRITER_QUERY_BLOCKS, n)
    bump(A, H_WRITER_HIT_BLOCKS, k)
    return values[:k]


@njit
def drop_subtrees(A, roots, out):
    """One operation: drop each state of ``roots`` that is still live, with its
    subtree (a root inside an earlier root's subtree is already gone).
    Returns the ``(value, owner)`` rows written to ``out``, children first."""
    begin(A)
    n_out = 0
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
def remove_kernel(A, values, owner):
    """Drop the states holding ``values`` (of ``owner``) with their subtrees.

    Unknown values are skipped. Returns the removed ``(value, owner)`` rows,
    children first (a subtree may hold other owners' blocks).
    """
    roots = np.empty(values.shape[0], dtype=np.int64)
    room = 0
    for i in range(values.shape[0]):
        roots[i] = value_lookup(A, values[i], owner)
        if roots[i] >= 0:
            room += subtree_size(A, roots[i])
    return drop_subtrees(A, roots, np.empty((min(room, np.int64(A.data[H_LIVE])), 2), dtype=np.int64))


@njit(cache=True)
def remove_owner_kernel(A, owner):
    """Drop every state ``owner`` inserted, with its subtree (a client's KV
    died with it). Returns the ``(value, owner)`` rows, children first."""
    roots = np.empty(np.int64(A.data[H_LIVE]), dtype=np.int64)
    n = 0
    for s in range(A.geom[G_CAPACITY]):
        if is_live(A, s) and owner_of(A, s) == owner and n < roots.shape[0]:
            roots[n] = s
            n += 1
    return drop_subtrees(A, roots[:n], np.empty((np.int64(A.data[H_LIVE]), 2), dtype=np.int64))


@njit(cache=True)
def evict_kernel(A, n):
    """Evict up to ``n`` LRU unpinned leaves, cascading; returns their ``(value, owner)`` rows."""
    out = np.empty((min(n, np.int64(A.data[H_LIVE])), 2), dtype=np.int64)
    begin(A)
    n_out = evict_into(A, out.shape[0], np.int64(-1), out, 0)
    end(A)
    return out[:n_out]


@njit(cache=True)
def clear_kernel(A):
    """Drop every state; returns the ``(value, owner)`` rows, children before parents."""
    out = np.empty((np.int64(A.data[H_LIVE]), 2), dtype=np.int64)
    begin(A)
    n_out = 0
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


@njit(cache=True)
def pin_kernel(A, keys, n, delta):
    """Add ``delta`` (+1 or -1) to the pin count of every cached block of the chain.

    Pin counts are per-block reference counts, as an engine holds blocks
    per request; a state is protected from eviction while it or any
    descendant is pinned. Returns ``(status, info, n_blocks)``; unpinning a
    block that is not pinned is ERR_NOT_PINNED with nothing changed.
    """
    path = np.empty(n, dtype=np.int64)
    versions = np.empty(n, dtype=np.uint64)
    values = np.empty(n, dtype=np.int64)
    k = walk(A.data, A.geom, keys, n, path, versions, values)
    if delta < 0:
        for i in range(k):
            if pins_of(A, path[i]) == 0:
                return ERR_NOT_PINNED, i, k
    begin(A)
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
    end(A)
    return OK, 0, k


# --- recovery -----------------------------------------------------------------------

P_TORN = -3  # parent code of a record a writer was changing (odd version)
S_UNKNOWN, S_VALID, S_INVALID, S_FREE = 0, 1, 2, 3


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
def rebuild(A):
    """Repair the segment and rebuild everything derived from the state table.

    Drops every state whose record is odd (a dead writer was changing it),
    whose link is out of range, or whose ancestry does not reach the root
    through live states (descendants of a dropped state, cycles). Then
    rebuilds the index, the counters and the private structures. Safe with
    readers attached: they see misses while the index is rebuilt. Returns the
    number of states dropped.
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
            publish(A, s, np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(LINK_FREE), np.uint64(0), np.uint64(0))
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
    protect = protect_counts(parent, status, A.data, A.geom)
    pinned = 0
    for s in range(cap):
        if status[s] == S_VALID:
            set_field(A, s, R_PINS, (np.uint64(protect[s]) << np.uint64(32)) | (field(A, s, R_PINS) & _LOW32))
            pinned += protect[s] > 0
    store_relaxed(A.data, H_PINNED, np.uint64(pinned))
    bump(A, H_RECOVERED, dropped)
    heap_rebuild(A)
    end(A)
    return dropped


# --- invariant checks ------------------------------------------------------------------

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
V_FREE_LIST = 20
V_CHILD_LIST = 21
V_VALUE_MAP = 22
V_HEAP_MISSING = 23
V_DUP_VALUE = 24
V_READER_PINS = 25

MAX_VIOLATIONS = 1000


@njit(inline="always")
def report(out, n, code, a, b):
    if n < out.shape[0]:
        out[n, 0] = code
        out[n, 1] = a
        out[n, 2] = b
    return n + 1


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
    for s in range(cap):
        if not live[s]:
            continue
        if status[s] != S_VALID:
            p = parent[s]
            bad_link = p < -1 or p >= cap or (p >= 0 and not live[p])
            n = report(out, n, V_BAD_PARENT if bad_link else V_UNREACHABLE, s, p)
            continue
        base = states + s * RECORD_WORDS
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
        f = value_lookup(A, np.int64(field(A, s, R_VALUE)), owner_of(A, s))
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
