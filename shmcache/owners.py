"""The owner table: who holds which blocks, by name, readable by any process.

An owner is a name (a data-parallel rank, an engine, a client) that holds
blocks: entry ``i`` of the table is bit ``i`` of every record's presence
word (``shmcache.layout``, "Owner table"). Only the writer's process names
entries (``claim``); any process reads names, block counts and event-source
counters (``snapshot``, ``describe``) without a lock.

Names change under the header's OWNERS_EPOCH (odd while an entry is
renamed, +2 per change), and an entry is renamed only while it holds no
block: so names read under one even epoch are the names of every bit a
walk read under that same epoch.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
from numba import njit

from .atomics import fence_acquire, fence_release, load_acquire, load_relaxed, store_relaxed, store_release
from .errors import InvalidInputError, OwnerLimitError, SegmentCorruptError
from .layout import (
    G_OWNERS,
    H_OWNERS_EPOCH,
    MAX_OWNER_NAME,
    MAX_OWNERS,
    O_ATTACHED,
    O_BATCHES,
    O_BLOCKS,
    O_CLEARS,
    O_EVENTS,
    O_HEALED,
    O_KIND,
    O_LAG_NS,
    O_LAST_NS,
    O_LOST,
    O_MALFORMED,
    O_NAME,
    O_NAME_LEN,
    O_NEXT_SEQ,
    O_REMOVED,
    O_RESTARTS,
    O_SKIPPED,
    O_STORED,
    OWNER_CLIENT,
    OWNER_EVENTS,
    OWNER_WORDS,
    SKIP_REASONS,
)

OWNER_NAME = re.compile(r"[A-Za-z0-9._:@/-]{1,64}")
NAME_WORDS = MAX_OWNER_NAME // 8
KINDS = {OWNER_CLIENT: "client", OWNER_EVENTS: "events"}
#: Event-source counters, by the name ``stats()`` and ``dump`` give them.
COUNTERS = {
    "next_seq": O_NEXT_SEQ, "batches": O_BATCHES, "events": O_EVENTS, "stored_blocks": O_STORED,
    "removed_blocks": O_REMOVED, "lost_batches": O_LOST, "healed_batches": O_HEALED, "restarts": O_RESTARTS,
    "clears": O_CLEARS, "lag_ns": O_LAG_NS, "last_applied_ns": O_LAST_NS, "malformed": O_MALFORMED,
}


def check_owner_name(name: object) -> str:
    """``name`` if it is a valid owner name, else InvalidInputError."""
    if not isinstance(name, str) or not OWNER_NAME.fullmatch(name):
        raise InvalidInputError(
            f"owner names are 1-{MAX_OWNER_NAME} characters of A-Z a-z 0-9 . _ : @ / -, got {name!r}: "
            "name data-parallel ranks like 'rank0' or 'node1/dp3'"
        )
    return name


@njit(cache=True)
def _copy_table(data, geom, out):
    """Copy the owner table into ``out`` under one even OWNERS_EPOCH;
    returns that epoch, or 1 (odd) if a rename kept overlapping."""
    base = geom[G_OWNERS]
    for _ in range(10000):
        e0 = load_acquire(data, H_OWNERS_EPOCH)
        if e0 & np.uint64(1):
            continue
        for i in range(out.shape[0]):
            out[i] = load_relaxed(data, base + i)
        fence_acquire()
        if load_relaxed(data, H_OWNERS_EPOCH) == e0:
            return e0
    return np.uint64(1)


@njit(cache=True)
def _rename(data, geom, entry, words, kind):
    """Give entry ``entry`` a new name (``words``: length, then the name's
    words) and kind, its counters zeroed, under OWNERS_EPOCH."""
    e = data[H_OWNERS_EPOCH] | np.uint64(1)
    store_relaxed(data, H_OWNERS_EPOCH, e)
    fence_release()
    base = geom[G_OWNERS] + entry * OWNER_WORDS
    for i in range(OWNER_WORDS):
        store_relaxed(data, base + i, np.uint64(0))
    for i in range(words.shape[0]):
        store_relaxed(data, base + O_NAME_LEN + i, words[i])
    store_relaxed(data, base + O_KIND, np.uint64(kind))
    store_release(data, H_OWNERS_EPOCH, e + np.uint64(1))


def _name_words(name: str) -> np.ndarray:
    raw = name.encode()
    words = np.zeros(1 + NAME_WORDS, dtype=np.uint64)
    words[0] = len(raw)
    words[1:] = np.frombuffer(raw.ljust(MAX_OWNER_NAME, b"\0"), dtype="<u8")
    return words


class Table(NamedTuple):
    """One consistent copy of the owner table."""

    epoch: int
    words: np.ndarray  # (MAX_OWNERS, OWNER_WORDS) uint64

    def name(self, entry: int) -> str | None:
        n = int(self.words[entry, O_NAME_LEN])
        if not 0 < n <= MAX_OWNER_NAME:
            return None
        return self.words[entry, O_NAME : O_NAME + NAME_WORDS].tobytes()[:n].decode(errors="replace")

    def named(self) -> list[tuple[int, str]]:
        """``(entry, name)`` of every named entry, in entry order."""
        return [(i, name) for i in range(MAX_OWNERS) if (name := self.name(i)) is not None]

    def find(self, name: str) -> int:
        """Entry named ``name``, or -1."""
        for i, n in self.named():
            if n == name:
                return i
        return -1


def snapshot(data: np.ndarray, geom: np.ndarray) -> Table:
    """The owner table as of one instant (names consistent with each other).
    Raises SegmentCorruptError if its epoch stayed odd through 10,000
    tries: a writer died renaming an entry (the next writer repairs it)."""
    out = np.empty(MAX_OWNERS * OWNER_WORDS, dtype=np.uint64)
    epoch = int(_copy_table(data, geom, out))
    if epoch & 1:
        raise SegmentCorruptError(
            "the owner table is being renamed and stays so (a writer died renaming an owner): "
            "open the segment with a new writer (Writer.open, or restart shmcache serve) to repair it"
        )
    return Table(epoch, out.reshape(MAX_OWNERS, OWNER_WORDS))


def repair(data: np.ndarray, geom: np.ndarray) -> int:
    """Writer only, when it takes the segment: if a writer died renaming an
    entry (OWNERS_EPOCH odd), free every entry that holds no block (the one
    half-renamed among them; the others are named again when used) and
    make the epoch even. Returns how many entries were freed."""
    e = int(data[H_OWNERS_EPOCH])
    if not e & 1:
        return 0
    base = int(geom[G_OWNERS])
    words = data[base : base + MAX_OWNERS * OWNER_WORDS].reshape(MAX_OWNERS, OWNER_WORDS)
    idle = np.flatnonzero(words[:, O_BLOCKS] == 0)
    words[idle] = 0
    data[H_OWNERS_EPOCH] = np.uint64(e + 1)
    return len(idle)


def claim(data: np.ndarray, geom: np.ndarray, name: str, kind: int) -> int:
    """The entry of owner ``name``, naming a free one if it has none; writer
    process only. An entry is free when never named, or when it holds no
    block and is not ATTACHED (no client or publisher of it connected).
    Raises OwnerLimitError when all ``MAX_OWNERS`` are taken."""
    check_owner_name(name)
    table = snapshot(data, geom)
    entry = table.find(name)
    if entry >= 0:
        if int(table.words[entry, O_KIND]) != kind:
            _set(data, geom, entry, O_KIND, kind)
        return entry
    free = [i for i in range(MAX_OWNERS) if table.name(i) is None]
    idle = [i for i in range(MAX_OWNERS) if table.words[i, O_BLOCKS] == 0 and table.words[i, O_ATTACHED] == 0]
    if not free and not idle:
        raise OwnerLimitError(
            f"all {MAX_OWNERS} owner entries hold blocks or are connected: owner {name!r} cannot be added "
            "(clear or disconnect an owner that is gone, e.g. by restarting its engine's publisher)"
        )
    entry = (free or idle)[0]
    _rename(data, geom, entry, _name_words(name), kind)
    return entry


def _set(data: np.ndarray, geom: np.ndarray, entry: int, word: int, value: int) -> None:
    data[int(geom[G_OWNERS]) + entry * OWNER_WORDS + word] = np.uint64(value)


def entry_words(data: np.ndarray, geom: np.ndarray, entry: int) -> np.ndarray:
    """The live words of entry ``entry`` (a view: the writer's process
    updates its counters through it)."""
    base = int(geom[G_OWNERS]) + entry * OWNER_WORDS
    return data[base : base + OWNER_WORDS]


def held(table: Table) -> dict[str, int]:
    """Every named owner with the number of blocks it holds."""
    return {name: int(table.words[i, O_BLOCKS]) for i, name in table.named()}


def describe(table: Table) -> dict[str, dict]:
    """Per named owner: blocks held, kind, whether attached and, for event
    sources, their counters and skips by reason."""
    out = {}
    for i, name in table.named():
        w = table.words[i]
        info = {"entry": i, "blocks": int(w[O_BLOCKS]), "kind": KINDS.get(int(w[O_KIND]), "unknown"),
                "attached": bool(w[O_ATTACHED])}
        if int(w[O_KIND]) == OWNER_EVENTS:
            info.update({k: int(w[at]) for k, at in COUNTERS.items()})
            info["skipped"] = {r: int(w[O_SKIPPED + j]) for j, r in enumerate(SKIP_REASONS)}
        out[name] = info
    return out
