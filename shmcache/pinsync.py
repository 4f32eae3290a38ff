"""The writer's half of the reader-pin handshake (``shmcache.pins`` explains
it). ``rpin`` counts the reader pin entries naming each state, kept up to
date by ``sync_reader_pins``; before the writer drops a record it announces
it (``announce_drop``), and an eviction skips a leaf a reader pins
(``reader_pinned``). A dropped record that a reader pin still names is held
off the free stack until its last pin goes.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .atomics import fence_seq_cst, load_acquire, load_relaxed, store_release
from .jitcache import helper
from .layout import G_CAPACITY, G_PINS, G_READER_PINS, G_READER_SLOTS, H_EVICTING, RD_PIN_SEQ, W_PIN_SEQ, reader_word
from .tree import free_record, push_if_evictable
from .wstate import M_PIN_SEQ, M_RPINNED, is_live


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
                count_reader_pin(A, old, np.int64(-1))
                count_reader_pin(A, e, np.int64(1))
    A.meta[M_PIN_SEQ] = np.int64(g)


@njit(cache=True)
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
