"""The lock-free matcher: Numba kernels that read a live segment without a lock.

Protocol (the writer's half is in ``shmcache.mutate``):

* A state is read seqlock-style: its version with acquire ordering (odd:
  being written, a miss), its fields with relaxed atomic loads, an acquire
  fence, the version again. A changed version means retry, at most
  ``RETRIES`` times, then a miss.
* A state matches block ``i`` only if it carries block ``i``'s 128-bit key
  (both halves) and its parent is the state matched for block ``i-1`` (the
  root for ``i = 0``), so a match follows real DFA edges.
* One instant for the whole path: the header's MUTATIONS word is read before
  and after the walk. Equal and even: no writer operation overlapped the
  walk, and every state was as read at any instant in it. Otherwise the
  version of every visited state is read again, in path order; the path is
  cut before the first one that changed. Each kept state held its content
  from its first read to its second, and all first reads precede all second
  reads, so the kept prefix was entirely present at the instant between the
  passes. Versions never repeat, so a freed-and-reused record is noticed.
* Every index read from shared memory is bounds-checked before it is
  followed, and every loop is bounded (probes by MAX_PROBE and the slot
  count, the walk by the number of blocks), so a corrupt segment costs
  misses, never a crash or a hang.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .atomics import fence_acquire, load_acquire, load_relaxed, mul128, prefetch, store_relaxed
from .hashing import tokens_u32, xxh3_128
from .layout import (
    G_BLOCK_SIZE,
    G_CAPACITY,
    G_SLOT,
    G_HITS,
    G_INDEX,
    G_READER_SLOTS,
    G_SLOTS,
    G_WORDS,
    G_STATES,
    H_CLOCK,
    H_MAX_PROBE,
    H_MUTATIONS,
    H_RETIRED,
    LINK_PARENT_BIAS,
    LINK_ROOT,
    LOW32,
    R_KEY_HI,
    R_KEY_LO,
    R_LINK,
    R_VALUE,
    R_VERSION,
    RD_HIT_BLOCKS,
    RD_QUERIES,
    RD_QUERY_BLOCKS,
    reader_word,
    RECORD_WORDS,
    SLOT_STATE_MASK,
    TAG_MASK,
)

RETRIES = 4
#: The writer advances CLOCK by 2 per operation; a reader stamps its hits
#: with CLOCK + 1, so a hit ranks after the writer operation it followed and
#: before the next one.
CLOCK_TICK = np.uint64(2)

_LOW32 = np.uint64(LOW32)
_TAG = np.uint64(TAG_MASK)
_SLOT = np.uint64(SLOT_STATE_MASK)
_ONE = np.uint64(1)


@njit(inline="always")
def home_slot(key_hi, n_slots):
    """Home slot of a key: ``(key_hi * n_slots) >> 64``."""
    _, hi = mul128(key_hi, np.uint64(n_slots))
    return np.int64(hi)


@njit(inline="always")
def read_state(data, base, key_lo, key_hi, link):
    """Seqlock read of the record at word ``base``.

    Returns ``(status, version, value)``: status 1 when the record is stable
    and carries this key and parent link, 0 when it is stable and does not,
    -1 when it stayed unstable (odd or changing) for ``RETRIES`` reads.
    """
    for _ in range(RETRIES):
        v1 = load_acquire(data, base + R_VERSION)
        if v1 & _ONE:
            continue
        k0 = load_relaxed(data, base + R_KEY_LO)
        k1 = load_relaxed(data, base + R_KEY_HI)
        val = load_relaxed(data, base + R_VALUE)
        lk = load_relaxed(data, base + R_LINK)
        fence_acquire()
        v2 = load_relaxed(data, base + R_VERSION)
        if v1 != v2:
            continue
        if k0 == key_lo and k1 == key_hi and (lk & _LOW32) == link:
            return 1, v1, val
        return 0, v1, val
    return -1, np.uint64(0), np.uint64(0)


@njit(inline="always")
def max_probe(data, geom):
    """How many slots past its home a lookup may look: the writer's recorded
    maximum, bounded by the index size whatever the header says."""
    return min(np.int64(load_relaxed(data, H_MAX_PROBE)), geom[G_SLOTS] - 1)


@njit(inline="always")
def find_state(data, geom, key_lo, key_hi, link, probes):
    """Look a block key up in the index; ``(state, version, value)`` or state -1."""
    n_slots = geom[G_SLOTS]
    index = geom[G_INDEX]
    states = geom[G_STATES]
    capacity = geom[G_CAPACITY]
    pos = home_slot(key_hi, n_slots)
    tag = key_lo & _TAG
    for _ in range(probes + 1):
        w = load_relaxed(data, index + pos)
        if w == 0:
            break
        if (w & _TAG) == tag:
            s = np.int64(w & _SLOT) - 1
            if 0 <= s < capacity:
                status, version, value = read_state(data, states + s * RECORD_WORDS, key_lo, key_hi, link)
                if status == 1:
                    return s, version, value
                if status < 0:
                    break
        pos += 1
        if pos == n_slots:
            pos = 0
    return np.int64(-1), np.uint64(0), np.uint64(0)


@njit(inline="always")
def finish_walk(data, geom, g0, n, path, versions):
    """Close a walk that matched ``n`` states: the one-instant check.

    Returns how many leading states of ``path`` form a true snapshot.
    """
    fence_acquire()
    g1 = load_relaxed(data, H_MUTATIONS)
    if g0 != g1 or (g0 & _ONE):
        states = geom[G_STATES]
        for j in range(n):
            if load_relaxed(data, states + path[j] * RECORD_WORDS + R_VERSION) != versions[j]:
                return j
    return n


@njit(inline="always")
def walk(data, geom, keys, n_blocks, path, versions, values):
    """Match ``keys[:n_blocks]`` from the root; returns the matched block count.

    ``path``/``versions``/``values`` receive the matched states, their
    versions and values. The result is a one-instant snapshot (module doc).
    """
    g0 = load_acquire(data, H_MUTATIONS)
    probes = max_probe(data, geom)
    link = np.uint64(LINK_ROOT)
    n = 0
    while n < n_blocks:
        s, version, value = find_state(data, geom, keys[n, 0], keys[n, 1], link, probes)
        if s < 0:
            break
        path[n] = s
        versions[n] = version
        values[n] = np.int64(value)
        link = np.uint64(s + LINK_PARENT_BIAS)
        n += 1
    return finish_walk(data, geom, g0, n, path, versions)


@njit(inline="always")
def add_relaxed(words, at, delta):
    """``words[at] += delta`` as two relaxed atomics: one process owns the
    word, others only read it."""
    store_relaxed(words, at, load_relaxed(words, at) + delta)


@njit(inline="always")
def note_hits(data, wdata, geom, path, n, n_blocks):
    """Stamp the deepest matched state with the clock and count the query.

    Only the deepest state is stamped: the writer propagates a child's
    recency to its parent when it evicts the child, so the LRU order is the
    same as stamping the whole path, at one store per match.
    """
    if n > 0:
        clock = load_relaxed(data, H_CLOCK) + _ONE
        at = geom[G_HITS] + path[n - 1]
        if load_relaxed(wdata, at) < clock:
            store_relaxed(wdata, at, clock)
    slot = geom[G_SLOT]
    if 0 <= slot < geom[G_READER_SLOTS]:
        add_relaxed(wdata, reader_word(slot, RD_QUERIES), _ONE)
        add_relaxed(wdata, reader_word(slot, RD_QUERY_BLOCKS), np.uint64(n_blocks))
        add_relaxed(wdata, reader_word(slot, RD_HIT_BLOCKS), np.uint64(n))


#: The two reader kernels below allocate nothing (every array they use is a
#: view of the caller's workspace, tokens or segment), so they are compiled
#: without Numba's reference counting: the views' incref/decref calls cost
#: about a quarter of a warm 128-block match (measured 3.1 -> 2.3 µs).
#:
#: A reader's workspace starts with its geometry vector (``layout.G_*``,
#: slot included) and the key-chain root of its current namespace; the
#: per-call arrays follow. Keeping them there makes a match a four-argument
#: call: the Numba dispatcher's cost grows with every argument.
WS_ROOT = G_WORDS
WS_HEADER = G_WORDS + 2
WS_TOO_SMALL = -(1 << 62)
RETIRED = -(1 << 62) + 1


def workspace_words(n_blocks: int, block_size: int) -> int:
    """Size in words of a workspace for prompts of up to ``n_blocks`` blocks."""
    return WS_HEADER + 5 * n_blocks + (n_blocks * block_size + 1) // 2


def workspace_path(ws: np.ndarray, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The states (int64) and versions (uint64) of the path the last match
    of an ``n_blocks``-block prompt left in workspace ``ws``."""
    work = ws[WS_HEADER:]
    return work[n_blocks : 2 * n_blocks].view(np.int64), work[2 * n_blocks : 3 * n_blocks]


@njit(inline="always")
def match_in_workspace(data, wdata, geom, keys, n_blocks, work):
    values = work[0:n_blocks].view(np.int64)
    path = work[n_blocks : 2 * n_blocks].view(np.int64)
    versions = work[2 * n_blocks : 3 * n_blocks]
    n = walk(data, geom, keys, n_blocks, path, versions, values)
    note_hits(data, wdata, geom, path, n, n_blocks)
    return n


@njit(cache=True, nogil=True, _nrt=False)
def match_keys_kernel(data, wdata, keys, ws):
    """Reader match of precomputed keys. ``ws`` is the reader's workspace;
    returns the matched block count, their values left in
    ``ws[WS_HEADER:WS_HEADER + count]`` as int64."""
    if load_acquire(data, H_RETIRED) != 0:
        return RETIRED
    geom = ws[:G_WORDS].view(np.int64)
    return match_in_workspace(data, wdata, geom, keys, keys.shape[0], ws[WS_HEADER:])


@njit(cache=True, nogil=True, _nrt=False)
def match_tokens_kernel(data, wdata, tokens, ws):
    """Reader match of raw tokens: hash the chain from the workspace's root,
    then walk it.

    Returns the matched block count (values as in ``match_keys_kernel``), or
    ``-(i + 1)`` when token ``i`` is outside ``[0, 2**32)`` (nothing matched),
    ``WS_TOO_SMALL`` when the workspace must first grow, or ``RETIRED`` when
    the segment is being removed.
    """
    if load_acquire(data, H_RETIRED) != 0:
        return RETIRED
    geom = ws[:G_WORDS].view(np.int64)
    block_size = geom[G_BLOCK_SIZE]
    n_blocks = tokens.shape[0] // block_size
    if ws.shape[0] < WS_HEADER + 5 * n_blocks + (n_blocks * block_size + 1) // 2:
        return WS_TOO_SMALL
    work = ws[WS_HEADER:]
    keys = work[3 * n_blocks : 5 * n_blocks].reshape((n_blocks, 2))
    t32, bad = tokens_u32(tokens[: n_blocks * block_size], work[5 * n_blocks :].view(np.uint32))
    if bad >= 0:
        return -bad - 1
    lo = ws[WS_ROOT]
    hi = ws[WS_ROOT + 1]
    length = 16 + 4 * block_size
    for b in range(n_blocks):
        lo, hi = xxh3_128((lo, hi, 16, t32, 4 * b * block_size), length)
        keys[b, 0] = lo
        keys[b, 1] = hi
        # Free while the hash chain's latency leaves issue slots idle; on a
        # cold segment it turns the walk's index misses into cache hits.
        prefetch(data, geom[G_INDEX] + home_slot(hi, geom[G_SLOTS]))
    return match_in_workspace(data, wdata, geom, keys, n_blocks, work)
