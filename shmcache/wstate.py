"""The writer's state: the arrays its kernels take, the crash hook, the
operation bracket and record access.

Publication protocol, the primitives every writer kernel uses (the reader's
half is in ``shmcache.matcher``; the order in which an operation changes
states is ``shmcache.mutate``'s):

* An operation is bracketed by the header's MUTATIONS word: made odd (relaxed
  store + release fence) before the first change, even (release store)
  after the last, so it grows by exactly 2 per operation (``begin``, ``end``).
* A record is changed by storing version+1 (odd), a release fence, the
  fields (relaxed atomic stores), then version+2 with release ordering
  (``publish``; ``set_owners`` changes the presence word alone, without
  the odd version). Either way the version changes, so a reader's
  one-instant check covers which owners hold a block as it covers the
  block itself.

Writer-private structures live in ordinary process memory (``Arrays``) and
are derived from the state table, so ``recovery.rebuild`` can recreate them
after any crash: children lists, the free-record stack and the LRU heap
(``shmcache.tree``), the value map (``shmcache.tables``), and the count of
reader pin entries naming each state (``shmcache.pinsync``).

A test hook can stop the writer at any numbered step: ``meta[M_CRASH] = k``
makes the k-th step raise ``WriterCrashed``, which unwinds the kernel with
nothing after that step written; the Python layer then SIGKILLs the process.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from .atomics import fence_release, load_relaxed, store_relaxed, store_release
from .jitcache import helper
from .layout import (
    G_CAPACITY,
    G_HITS,
    G_OWNERS,
    G_READER_PINS,
    G_READER_SLOTS,
    G_STATES,
    H_CLOCK,
    H_MUTATIONS,
    H_PINNED,
    LINK_FREE,
    LINK_PARENT_BIAS,
    LOW32,
    O_BLOCKS,
    OWNER_WORDS,
    R_KEY_HI,
    R_KEY_LO,
    R_LINK,
    R_OWNERS,
    R_PINS,
    R_RECENCY,
    R_VALUE,
    R_VERSION,
    RECORD_WORDS,
)
from .matcher import CLOCK_TICK


class WriterCrashed(Exception):
    """Raised by the crash test hook at the chosen step."""


class Arrays(NamedTuple):
    """Everything a writer kernel touches. ``data``/``wdata`` are the segment's
    two parts; the rest is writer-private and rebuilt by ``recovery.rebuild``."""

    data: np.ndarray  # uint64, data part, writable
    wdata: np.ndarray  # uint64, writable part
    geom: np.ndarray  # int64, layout.G_* vector
    links: np.ndarray  # int64 (capacity + 1, 3): first child, next, prev; row capacity is the root
    # int64 (capacity,): stack of free record ids. Its order is a reader's
    # fast path (``matcher._NEXT_BIAS``): built lowest on top, and last in,
    # first out, so an insert takes consecutive records, and a chain that
    # eviction frees leaf first is taken again root first, in the same order.
    free: np.ndarray
    heap_key: np.ndarray  # uint64: recency of each heap entry
    heap_state: np.ndarray  # int64: state of each heap entry
    vmap: np.ndarray  # uint64: (client, value) -> state + 1, 0 empty
    meta: np.ndarray  # int64: M_* below
    pins: np.ndarray  # uint32 view of the writable part (readers' pin entries at G_PINS)
    rpin: np.ndarray  # int32 (capacity,): reader pin entries naming each state
    held: np.ndarray  # bool (capacity,): free records kept off the free stack while a reader pin names them
    rprev: np.ndarray  # uint32: the pin area as last scanned
    rseen: np.ndarray  # uint64 (reader slots,): each slot's PIN_SEQ as last scanned
    gen: np.ndarray  # uint64 (capacity,): times each record's state was dropped (a writer pin handle's check)
    scratch: np.ndarray  # int64 (capacity,): a kernel's working list of states (no allocation per call)
    journal: np.ndarray  # int64 (entries, JOURNAL_WORDS): content changes since the Python layer last took them; 0 rows: off


M_FREE_TOP = 0
M_HEAP_SIZE = 1
M_CRASH = 2
M_PIN_SEQ = 3  # W_PIN_SEQ as last scanned (uint64 bits)
M_RPINNED = 4  # states named by at least one reader pin entry
M_JOURNAL = 5  # entries in ``journal``; its row count + 1 once an operation overflowed it
M_WORDS = 6

# Journal rows ``(op, state, a, b, c, d, e)``: what a watcher of the writer
# (``shmcache.publish``) needs to describe each change of the content, in
# the order the kernels made them, without reading records that a later
# operation may reuse. uint64 words are stored as int64 bits; unused: 0.
JOURNAL_WORDS = 7
J_STORED = np.int64(1)  # a: block index in the operation's chain, b: owners, c: KEY_LO, d: parent state (-1: none), e: its KEY_LO
J_DROPPED = np.int64(2)  # a: its KEY_LO, b: its owners before (the record is free after)
J_OWNERS = np.int64(3)  # a: owners before, b: owners after

FC, NEXT, PREV = 0, 1, 2
NIL = -1

_ONE = np.uint64(1)
_ZERO = np.int64(0)
_LOW32 = np.uint64(LOW32)


def faulted(shape, dtype, fill=0) -> np.ndarray:
    """An array of ``fill`` with every page already faulted in. ``np.zeros``
    maps lazily zeroed pages, and the writer touches these arrays at
    random, so the first inserts into a fresh segment would pay a page
    fault per 4 KB (about 13 µs each on a VM)."""
    a = np.empty(shape, dtype=dtype)
    a.fill(fill)
    return a


def new_arrays(data: np.ndarray, wdata: np.ndarray, geom: np.ndarray) -> Arrays:
    """Allocate the writer-private arrays for a segment (contents rebuilt later)."""
    cap = int(geom[G_CAPACITY])
    return Arrays(
        data=data,
        wdata=wdata,
        geom=geom,
        links=np.full((cap + 1, 3), NIL, dtype=np.int64),
        free=faulted(cap, np.int64),
        heap_key=faulted(2 * cap + 64, np.uint64),
        heap_state=faulted(2 * cap + 64, np.int64),
        vmap=faulted(max(16, 2 * cap), np.uint64),
        meta=np.zeros(M_WORDS, dtype=np.int64),
        pins=wdata.view(np.uint32),
        rpin=faulted(cap, np.int32),
        held=faulted(cap, np.bool_),
        rprev=np.zeros(int(geom[G_READER_SLOTS]) * int(geom[G_READER_PINS]), dtype=np.uint32),
        rseen=np.zeros(int(geom[G_READER_SLOTS]), dtype=np.uint64),
        gen=faulted(cap, np.uint64),
        scratch=faulted(cap, np.int64),
        journal=np.zeros((0, JOURNAL_WORDS), dtype=np.int64),
    )


def init_empty(A: Arrays) -> None:
    """Make ``new_arrays``' arrays what ``recovery.rebuild`` makes of a
    segment just created (every record free, record 0 on top of the free
    stack; the reader pin area scanned and found empty: its sequence words
    are all 0, as ``new_arrays`` leaves its copies), without the rebuild
    kernel: a process that only creates segments never compiles it. The
    tests prove the two equal."""
    cap = A.free.shape[0]
    A.free[:] = np.arange(cap - 1, -1, -1, dtype=np.int64)
    A.meta[M_FREE_TOP] = cap


@njit(inline="always")
def note(A, op, s, a, b, c, d, e):
    """Journal one change (nothing while the journal is off). A full journal
    marks itself overflowed and takes nothing more: the watcher then
    resynchronises from the segment instead of trusting a partial list."""
    n = A.meta[M_JOURNAL]
    if n < A.journal.shape[0]:
        A.journal[n, 0] = op
        A.journal[n, 1] = s
        A.journal[n, 2] = np.int64(a)
        A.journal[n, 3] = np.int64(b)
        A.journal[n, 4] = np.int64(c)
        A.journal[n, 5] = np.int64(d)
        A.journal[n, 6] = np.int64(e)
        A.meta[M_JOURNAL] = n + 1
    elif n == A.journal.shape[0] and n > 0:
        A.meta[M_JOURNAL] = n + 1


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
def client_of(A, s):
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
def effective_recency(A, s):
    """Last use of ``s`` by the writer or (hit stamp) by any reader."""
    return max(field(A, s, R_RECENCY), load_relaxed(A.wdata, A.geom[G_HITS] + s))


@njit(inline="always")
def publish(A, s, key_lo, key_hi, value, link, recency, pins, owners):
    """Rewrite record ``s`` under its version (odd, fields, even). The
    caller keeps the owner table's BLOCKS counts in step (``count_owners``)."""
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
    store_relaxed(A.data, base + R_OWNERS, owners)
    step(A)
    store_release(A.data, base + R_VERSION, v + _ONE)


# --- owners -----------------------------------------------------------------------


@njit(inline="always")
def owners_of(A, s):
    """The presence word of ``s``: bit ``i`` while owner ``i`` holds it."""
    return field(A, s, R_OWNERS)


@helper
def count_owners(A, old, new):
    """Keep each owner's BLOCKS count in step with one record's presence
    word going from ``old`` to ``new``."""
    changed = old ^ new
    i = 0
    while changed != 0:
        if changed & _ONE:
            at = A.geom[G_OWNERS] + i * OWNER_WORDS + O_BLOCKS
            delta = 1 if (new >> np.uint64(i)) & _ONE else -1
            store_relaxed(A.data, at, np.uint64(np.int64(A.data[at]) + delta))
        changed >>= _ONE
        i += 1


@helper
def set_owners(A, s, owners):
    """Rewrite the presence word of ``s`` alone: a release fence, the word,
    then version+2 (release).

    No odd version is needed: the word is one atomic store and no other
    field changes. A reader whose two version reads of ``s`` both saw the
    old version may have loaded the old word or the new one; either was
    the word at the instant between its reads. The new word is current from
    its store until this version goes out, and no later store of any record
    can be seen without this version (the release fence before it), so the
    reader's one instant is consistent across the path. A writer that dies
    between the store and the version leaves a consistent record; recovery
    moves every live record's version on (``recovery.repair_owners``), where
    an odd version would have cost the state and its subtree.
    """
    base = rec(A, s)
    old = A.data[base + R_OWNERS]
    count_owners(A, old, owners)
    note(A, J_OWNERS, s, old, owners, _ZERO, _ZERO, _ZERO)
    v = A.data[base + R_VERSION]
    fence_release()
    step(A)
    store_relaxed(A.data, base + R_OWNERS, owners)
    step(A)
    store_release(A.data, base + R_VERSION, v + np.uint64(2))
