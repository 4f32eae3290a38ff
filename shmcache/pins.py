"""Reader pins: the reader's half of the pin handshake, and the pin handles.

A reader that must keep matched KV alive between its match and its use
pins the matched path with ``Reader.match_and_pin``. Readers cannot write
the state table, so a pin is an *entry* in the reader's own slot of the pin
area (``layout``: writable part), holding ``state + 1``. The writer never
evicts a state that any entry names; it learns about entries by rescanning
the slots whose ``RD_PIN_SEQ`` changed since it last looked (cheap: it only
looks when the segment-wide ``W_PIN_SEQ`` moved).

The race between a new pin and an eviction already under way is closed with
a hazard-pointer handshake (Michael, 2004), sequentially consistent fences
on both sides:

* reader: store entries; bump RD_PIN_SEQ (release) and W_PIN_SEQ (atomic);
  fence; load EVICTING (acquire), then the version of each pinned state.
* writer (``pinsync.announce_drop``, before every record it drops): store
  EVICTING = state + 1; fence; load W_PIN_SEQ and rescan changed slots. An
  eviction then skips the state if an entry names it; a remove or clear
  drops it anyway but keeps its record out of the free list until the last
  entry naming it goes. Then EVICTING = 0 (release).

If the reader's loads miss the writer's mark, the writer's load of
W_PIN_SEQ sees the reader's bump, so the writer finds the entry and skips
the victim. Otherwise the reader sees EVICTING naming the victim, or (the
eviction finished) its changed version, and reports the path pinned only up
to the block before it. A state named by an entry is therefore never
evicted after ``match_and_pin`` returns it, and its record is never reused
for another block while the entry lasts; explicit ``remove``/``clear``
still drop it (its KV was freed by its owner), as with writer pins.

A reader's slot is its as long as it holds the slot's lock
(``shmcache.liveness``). Claiming a slot and leaving it (``close``, or the
Reader being garbage-collected) both clear every entry in it. Pins of a
reader that dies stay in its slot until the writer reclaims them
(``Writer.reap_readers``): it takes the lock the dead reader lost, clears
the entries and frees the slot; a reader that claims the slot first clears
them itself.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .atomics import fence_seq_cst, fetch_add, load_acquire, load_relaxed, store_relaxed, store_release
from .matcher import add_relaxed
from .layout import (
    G_PINS,
    G_READER_PINS,
    G_SLOT,
    G_STATES,
    H_EVICTING,
    R_VERSION,
    RD_PIN_SEQ,
    RD_PINNED,
    reader_word,
    RECORD_WORDS,
    W_PIN_SEQ,
)

_ONE = np.uint64(1)


@njit(inline="always")
def announce(wdata, slot, delta_pinned):
    """Publish a change to ``slot``'s entries: its PIN_SEQ, then W_PIN_SEQ.

    The release store orders the entry stores before the new PIN_SEQ; the
    atomic add on W_PIN_SEQ orders both before it, so a writer that sees
    the new W_PIN_SEQ sees the entries.
    """
    add_relaxed(wdata, reader_word(slot, RD_PINNED), np.uint64(np.int64(delta_pinned)))  # wraps for negatives
    seq = reader_word(slot, RD_PIN_SEQ)
    store_release(wdata, seq, load_relaxed(wdata, seq) + _ONE)
    fetch_add(wdata, W_PIN_SEQ, _ONE)


@njit(cache=True, nogil=True)
def pin_path_kernel(data, wdata, pins, ws_geom, path, versions, k, entries):
    """Pin the first ``k`` states of a just-matched ``path`` in free entries
    of this reader's slot, which it picks and writes to ``entries`` (length
    ``k``, -1 where nothing is pinned).

    ``versions`` are the states' versions as matched. Returns ``m <= k``:
    states ``path[:m]`` are pinned, in ``entries[:m]``, and were unchanged
    from the match until the pins were visible to the writer; the entries
    of ``path[m:]`` are cleared again. Fewer than ``k`` free entries (the
    caller checks the count first) pin fewer states.
    """
    slot = ws_geom[G_SLOT]
    n_entries = ws_geom[G_READER_PINS]
    area = ws_geom[G_PINS] + slot * n_entries
    got = 0
    e = 0
    while got < k and e < n_entries:
        if load_relaxed(pins, area + e) == 0:
            store_relaxed(pins, area + e, np.uint32(path[got] + 1))
            entries[got] = e
            got += 1
        e += 1
    announce(wdata, slot, got)
    fence_seq_cst()
    evicting = load_acquire(data, H_EVICTING)
    states = ws_geom[G_STATES]
    m = got
    for i in range(got):
        if evicting == np.uint64(path[i] + 1) or load_relaxed(data, states + path[i] * RECORD_WORDS + R_VERSION) != versions[i]:
            m = i
            break
    if m < got:
        for i in range(got - 1, m - 1, -1):
            store_relaxed(pins, area + entries[i], np.uint32(0))
            entries[i] = -1
        announce(wdata, slot, m - got)
    return m


@njit(cache=True, nogil=True)
def release_entries(wdata, pins, geom, slot, entries):
    """Clear the set ones among ``entries`` (-1: none) of reader ``slot``'s
    pin area, deepest first, and announce it; returns how many were set.
    Clearing only what is set keeps ``RD_PINNED`` exact whatever part of a
    ``pin_path_kernel`` call they come from ran."""
    area = geom[G_PINS] + slot * geom[G_READER_PINS]
    n = 0
    for i in range(entries.shape[0] - 1, -1, -1):
        e = entries[i]
        if 0 <= e < geom[G_READER_PINS] and load_relaxed(pins, area + e) != 0:
            store_relaxed(pins, area + e, np.uint32(0))
            n += 1
    announce(wdata, slot, -n)
    return n


@njit(cache=True, nogil=True)
def clear_slot(wdata, pins, geom, slot):
    """Clear every pin entry of reader ``slot`` (its holder died or it is
    being reused) and announce it; returns how many were set."""
    area = geom[G_PINS] + slot * geom[G_READER_PINS]
    n = 0
    for i in range(geom[G_READER_PINS]):
        if load_relaxed(pins, area + i) != 0:
            store_relaxed(pins, area + i, np.uint32(0))
            n += 1
    # Zero the count outright: a dead reader may have died between its
    # entry stores and its count update.
    store_relaxed(wdata, reader_word(slot, RD_PINNED), np.uint64(0))
    announce(wdata, slot, 0)
    return n


class PinnedMatch:
    """The answer of ``Reader.match_and_pin``: a ``PrefixMatch`` whose blocks
    stay cached (never evicted) until ``Reader.unpin(handle)`` or the end of
    a ``with`` block.

    ``length`` (tokens) and ``values`` (int64, one per block) are as in
    ``PrefixMatch``, and it unpacks the same way: ``length, values = h``.
    A handle belongs to the Reader that made it.
    """

    __slots__ = ("length", "values", "_entries", "_reader")

    def __init__(self, length: int, values: np.ndarray, entries: np.ndarray, reader) -> None:
        self.length = length
        self.values = values
        self._entries = entries
        self._reader = reader

    @property
    def pinned(self) -> bool:
        """True until the handle is unpinned or its Reader closed."""
        return self._entries is not None and self._reader._data is not None

    def __iter__(self):
        return iter((self.length, self.values))

    def __enter__(self) -> "PinnedMatch":
        return self

    def __exit__(self, *exc) -> None:
        if self.pinned:
            self._reader.unpin(self)

    def __repr__(self) -> str:
        return f"<PinnedMatch length={self.length} blocks={len(self.values)} {'pinned' if self.pinned else 'released'}>"
