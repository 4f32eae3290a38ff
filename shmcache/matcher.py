"""The lock-free matcher: Numba kernels that read a live segment without a lock.

Protocol (the writer's half is in ``shmcache.wstate`` and ``shmcache.mutate``):

* A state is read seqlock-style, with the re-check deferred: its version
  with acquire ordering (odd: being written, a miss), then its fields with
  relaxed atomic loads. The version is read again once, for the whole
  path, after the walk (below), so a warm walk costs one version load per
  state; a read torn by a concurrent write can only mislead the walk into
  a state whose version then fails that check, which cuts the answer.
* A state matches block ``i`` only if it carries block ``i``'s 128-bit key
  (both halves) and its parent is the state matched for block ``i-1`` (the
  root for ``i = 0``), so a match follows real DFA edges. Where the state
  was found does not matter: the index names candidates, and so does the
  record after the parent's (``_NEXT_BIAS``); each is read and checked the
  same way.
* One instant for the whole path: the header's MUTATIONS word is read before
  and after the walk. Equal and even: no writer operation overlapped the
  walk, and every state was as read at any instant in it. Otherwise, after
  an acquire fence, the version of every visited state is read again, in
  path order; the path is cut before the first one that changed. Each kept
  state held its content from its first read to its second, and all first
  reads precede all second reads, so the kept prefix was entirely present
  at the instant between the passes. Versions never repeat, so a
  freed-and-reused record is noticed.
* Every index read from shared memory is bounds-checked before it is
  followed, and every loop is bounded (probes by MAX_PROBE and the slot
  count, the walk by the number of blocks), so a corrupt segment costs
  misses, never a crash or a hang.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import from_dtype, njit, types
from numba.extending import register_jitable

from .atomics import (
    as_pairs,
    fence_acquire,
    load_acquire,
    load_relaxed,
    mul128,
    prefetch,
    store_relaxed,
    words_at,
)
from .hashing import chain16, chain_any, tokens_u32
from .jitcache import helper
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
    H_OWNERS_EPOCH,
    H_RETIRED,
    LINK_PARENT_BIAS,
    LINK_ROOT,
    LOW32,
    R_KEY_HI,
    R_KEY_LO,
    R_LINK,
    R_OWNERS,
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

#: The writer advances CLOCK by 2 per operation; a reader stamps its hits
#: with CLOCK + 1, so a hit ranks after the writer operation it followed and
#: before the next one.
CLOCK_TICK = np.uint64(2)

_LOW32 = np.uint64(LOW32)
_TAG = np.uint64(TAG_MASK)
_SLOT = np.uint64(SLOT_STATE_MASK)
_ONE = np.uint64(1)
_ROOT = np.uint64(LINK_ROOT)

#: Where a walk looks first for the child of state ``s``: the next record,
#: ``s + 1``, found from the parent's link as ``link - _NEXT_BIAS``. The
#: writer takes records from a stack (``wstate``), so the blocks of one
#: insert get consecutive records, and the chains that eviction frees leaf
#: first come back root first, in the same order: on the bundled trace at a
#: quarter of its blocks (1.8M evictions), 99.4% of the live states sit right
#: after their parent. The next record is checked exactly as one the index
#: names (``read_state``: both key halves and the parent link), so it is only
#: a shortcut, and the index is asked when it fails. It saves the index
#: slot's cache line and its page: on a cold segment a walk then reads its
#: records in address order, which the hardware prefetches.
_NEXT_BIAS = np.uint64(LINK_PARENT_BIAS - 1)


@helper
def home_slot(key_hi, n_slots):
    """Home slot of a key: ``(key_hi * n_slots) >> 64``."""
    _, hi = mul128(key_hi, np.uint64(n_slots))
    return np.int64(hi)


@helper
def read_state(data, base, key_lo, key_hi, link, with_owners):
    """One read of the record at word ``base``: its version (acquire), then
    its fields (relaxed), its presence word too if ``with_owners`` (a
    constant: the plain match never loads it).

    Returns ``(status, version, value, owners)``: status 1 when the record
    carries this key and parent link, 0 when it does not, -1 when its
    version is odd (being written). The read is validated later, for the
    whole path at once (``finish_walk``), so a torn read costs a shorter
    answer, never a wrong one.
    """
    v = load_acquire(data, base + R_VERSION)
    if v & _ONE:
        return -1, v, np.uint64(0), np.uint64(0)
    k0 = load_relaxed(data, base + R_KEY_LO)
    k1 = load_relaxed(data, base + R_KEY_HI)
    val = load_relaxed(data, base + R_VALUE)
    lk = load_relaxed(data, base + R_LINK)
    owners = load_relaxed(data, base + R_OWNERS) if with_owners else np.uint64(0)
    if k0 == key_lo and k1 == key_hi and (lk & _LOW32) == link:
        return 1, v, val, owners
    return 0, v, val, owners


@helper
def max_probe(data, geom):
    """How many slots past its home a lookup may look: the writer's recorded
    maximum, bounded by the index size whatever the header says."""
    return min(np.int64(load_relaxed(data, H_MAX_PROBE)), geom[G_SLOTS] - 1)


@helper
def lookup(data, index, n_slots, states, capacity, probes, key_lo, key_hi, link, with_owners):
    """Look a block key up in the index; ``(state, version, value, owners)``
    or state -1 (``owners`` is read only ``with_owners``).

    The geometry comes in as scalars so that a walk loads it once: the
    atomic loads in the loop keep LLVM from hoisting array reads out of it.
    """
    pos = home_slot(key_hi, n_slots)
    tag = key_lo & _TAG
    for _ in range(probes + 1):
        w = load_relaxed(data, index + pos)
        if w == 0:
            break
        if (w & _TAG) == tag:
            s = np.int64(w & _SLOT) - 1
            if 0 <= s < capacity:
                status, version, value, owners = read_state(data, states + s * RECORD_WORDS, key_lo, key_hi, link, with_owners)
                if status == 1:
                    return s, version, value, owners
                if status < 0:
                    break
        pos += 1
        if pos == n_slots:
            pos = 0
    return np.int64(-1), np.uint64(0), np.uint64(0), np.uint64(0)


@helper
def find_state(data, geom, key_lo, key_hi, link, probes):
    """``lookup`` with the geometry taken from a ``G_*`` vector; ``(state,
    version, value)``."""
    s, version, value, _ = lookup(data, geom[G_INDEX], geom[G_SLOTS], geom[G_STATES], geom[G_CAPACITY], probes,
                                  key_lo, key_hi, link, False)
    return s, version, value


@helper
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


@helper
def walk_keys(data, index, n_slots, states, capacity, probes, keys, c, link, n, path, versions, values, owners,
              with_owners, follow):
    """Match ``keys[:c]`` as blocks ``n, n + 1, ...`` of a path whose last
    state so far has ``link``, looking for each in the record after its
    parent's first if ``follow`` (``_NEXT_BIAS``), else, or then, through
    the index. Returns ``(n, link, strays)`` after the last match:
    ``strays`` counts the blocks below a parent that were not in the record
    after it (known without reading that record when not ``follow``).

    ``path``/``versions``/``values`` receive the matched states, their
    versions and values, and ``owners`` their presence words if
    ``with_owners`` (a constant). Stops at the first miss.
    """
    strays = 0
    for i in range(c):
        after_parent = np.int64(link - _NEXT_BIAS) if link != _ROOT else np.int64(-1)
        s = np.int64(-1)
        if follow and 0 <= after_parent < capacity:
            status, version, value, held = read_state(data, states + after_parent * RECORD_WORDS, keys[i, 0],
                                                      keys[i, 1], link, with_owners)
            if status == 1:
                s = after_parent
        if s < 0:
            s, version, value, held = lookup(data, index, n_slots, states, capacity, probes, keys[i, 0], keys[i, 1],
                                             link, with_owners)
            if after_parent >= 0 and s != after_parent:
                strays += 1
            if s < 0:
                break
        path[n] = s
        versions[n] = version
        values[n] = np.int64(value)
        if with_owners:
            owners[n] = held
        link = np.uint64(s + LINK_PARENT_BIAS)
        n += 1
    return n, link, strays


@helper
def walk(data, geom, start, keys, n_blocks, path, versions, values, owners, with_owners):
    """Match ``keys[:n_blocks]`` below state ``start`` (-1: the root); returns
    the matched block count, the states as in ``walk_keys``.

    The result is a one-instant snapshot (module doc). ``start``, when
    given, is the caller's to trust: only the writer walks from a state.
    """
    g0 = load_acquire(data, H_MUTATIONS)
    link = np.uint64(LINK_ROOT) if start < 0 else np.uint64(start + LINK_PARENT_BIAS)
    n, _, _ = walk_keys(data, geom[G_INDEX], geom[G_SLOTS], geom[G_STATES], geom[G_CAPACITY], max_probe(data, geom),
                        keys, n_blocks, link, np.int64(0), path, versions, values, owners, with_owners, np.bool_(True))
    return finish_walk(data, geom, g0, n, path, versions)


@helper
def add_relaxed(words, at, delta):
    """``words[at] += delta`` as two relaxed atomics: one process owns the
    word, others only read it."""
    store_relaxed(words, at, load_relaxed(words, at) + delta)


@helper
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


#: The reader kernels below allocate nothing (every array they use is a
#: view of the caller's workspace, tokens, output or segment), so they are
#: compiled without Numba's reference counting: the views' incref/decref
#: calls cost about a quarter of a warm 128-block match (3.1 -> 2.3 µs).
#:
#: A reader's workspace is a uint64 array owned by its Reader. It starts
#: with a header: the geometry vector (``layout.G_*``, slot included), the
#: key-chain root of the current namespace, the address and length in
#: words of the segment's two mapped parts, and the owner-table epoch the
#: Reader's owner names are from; the per-call arrays follow
#: (``workspace_words``). Each array argument costs about 30 ns a call to
#: type and unbox, so a match passes three: the tokens or keys, the
#: workspace, and the fresh array that receives the values. The Reader
#: unmaps the parts only after it stops calling kernels.
WS_ROOT = G_WORDS
WS_DATA = G_WORDS + 2
WS_WDATA = G_WORDS + 4
WS_OWNERS_EPOCH = G_WORDS + 6
WS_HEADER = G_WORDS + 7
WS_TOO_SMALL = -(1 << 62)
RETIRED = -(1 << 62) + 1
OWNERS_RENAMED = -(1 << 62) + 2

#: Blocks hashed and then walked at a time (``walk_tokens``). A match hashes
#: at most two chunks past its first miss, so its cost follows what it
#: matches, not the prompt's length; and a chunk walked by the index has
#: all its slots asked for before the walk reads the first, so on a cold
#: segment their misses overlap instead of following one another.
CHUNK = 16


@register_jitable
def workspace_words(n_blocks: int, block_size: int) -> int:
    """Size in words of a workspace for prompts of up to ``n_blocks`` blocks:
    path, versions, presence words and values per block, then two chunks'
    keys (two words each) and one chunk's tokens as uint32."""
    return WS_HEADER + 4 * n_blocks + 4 * CHUNK + (CHUNK * block_size + 1) // 2


@register_jitable
def workspace_path(ws: np.ndarray, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Where in workspace ``ws`` a match of an ``n_blocks``-block prompt
    keeps its path: the states (int64) and their versions (uint64). The
    kernels write them there; ``match_and_pin`` reads them after."""
    work = ws[WS_HEADER:]
    return work[0:n_blocks].view(np.int64), work[n_blocks : 2 * n_blocks]


@njit(inline="always")
def segment_parts(ws):
    """The data and writable parts named in a workspace header."""
    return (words_at(ws[WS_DATA], np.int64(ws[WS_DATA + 1])),
            words_at(ws[WS_WDATA], np.int64(ws[WS_WDATA + 1])))


@njit(cache=True, nogil=True, _nrt=False)
def match_keys_kernel(keys, ws, values):
    """Reader match of precomputed keys. ``ws`` is the reader's workspace;
    returns the matched block count, their values written to ``values``
    (which must hold one per key), or ``WS_TOO_SMALL`` or ``RETIRED``."""
    data, wdata = segment_parts(ws)
    if load_acquire(data, H_RETIRED) != 0:
        return RETIRED
    geom = ws[:G_WORDS].view(np.int64)
    n_blocks = keys.shape[0]
    if ws.shape[0] < workspace_words(n_blocks, geom[G_BLOCK_SIZE]) or values.shape[0] < n_blocks:
        return WS_TOO_SMALL
    path, versions = workspace_path(ws, n_blocks)
    n = walk(data, geom, np.int64(-1), keys, n_blocks, path, versions, values, versions, False)
    note_hits(data, wdata, geom, path, n, n_blocks)
    return n


@helper
def prefetch_chunk(data, index, n_slots, keys, c):
    """Ask for the home index slot of each of ``keys[:c]`` before the walk
    reads any: on a cold segment their misses then overlap. (Asking for
    the records the home slots name as well, in a second pass, measured no
    better.)"""
    for i in range(c):
        prefetch(data, index + home_slot(keys[i, 1], n_slots))


@njit(inline="always")
def hash_chunk(tokens, scratch, chain, block_size, first, c, lo, hi, keys):
    """Chain the keys of blocks ``first .. first + c`` of ``tokens`` from
    ``(lo, hi)`` into ``keys[:c]``; returns the index in ``tokens`` of the
    first id outside ``[0, 2**32)`` among them (``keys`` then unwritten),
    or -1."""
    t32, bad = tokens_u32(tokens[first * block_size : (first + c) * block_size], scratch)
    if bad >= 0:
        return first * block_size + bad
    chain(t32, c, block_size, lo, hi, keys)
    return -1


@njit(inline="always")
def walk_tokens(data, geom, tokens, ws, chain, n_blocks, path, versions, values, owners, with_owners):
    """Hash and match the first ``n_blocks`` blocks of ``tokens`` from the
    workspace's root, ``CHUNK`` blocks at a time, with the key-chain kernel
    ``chain`` (``hashing.chain16`` or ``chain_any``); the states as in
    ``walk_keys``.

    Pipelined: the next chunk is hashed before the current one is walked,
    so a match hashes at most two chunks past its first miss. What the
    chunk before found decides how a chunk is walked (``walk_keys``'
    ``strays``): in record order (each block looked for in the record
    after its parent's first), unless most of that chunk's blocks were
    elsewhere (a segment whose chains were written a block at a time,
    interleaved); then by the index, its slots asked for all at once
    before the walk, so that their misses overlap. Slots a walk in record
    order would not read are not asked for: on a cold segment they cost
    page walks for nothing. The first block has no parent record to
    follow, so its slot is asked for as soon as its key is known.

    Returns the matched block count, a one-instant snapshot (module doc), or
    ``-(i + 1)`` when token ``i`` is outside ``[0, 2**32)``. An id is
    reported only if the walk reaches its chunk: one past the chunk of the
    first miss is not.
    """
    block_size = geom[G_BLOCK_SIZE]
    index = geom[G_INDEX]
    n_slots = geom[G_SLOTS]
    work = ws[WS_HEADER:]
    cur = as_pairs(work[4 * n_blocks : 4 * n_blocks + 2 * CHUNK])
    nxt = as_pairs(work[4 * n_blocks + 2 * CHUNK : 4 * n_blocks + 4 * CHUNK])
    scratch = work[4 * n_blocks + 4 * CHUNK :].view(np.uint32)
    g0 = load_acquire(data, H_MUTATIONS)
    probes = max_probe(data, geom)
    link = _ROOT
    n = np.int64(0)
    by_index = False
    if n_blocks > 0:
        c = min(CHUNK, n_blocks)
        bad = hash_chunk(tokens, scratch, chain, block_size, 0, c, ws[WS_ROOT], ws[WS_ROOT + 1], cur)
        if bad >= 0:
            return -bad - 1
        prefetch_chunk(data, index, n_slots, cur, np.int64(1))
    while n < n_blocks:
        c = min(CHUNK, n_blocks - n)
        after = n + c
        if by_index:
            prefetch_chunk(data, index, n_slots, cur, c)
        bad = -1
        if after < n_blocks:
            bad = hash_chunk(tokens, scratch, chain, block_size, after, min(CHUNK, n_blocks - after),
                             cur[c - 1, 0], cur[c - 1, 1], nxt)
        n, link, strays = walk_keys(data, index, n_slots, geom[G_STATES], geom[G_CAPACITY], probes, cur, c, link,
                                    n, path, versions, values, owners, with_owners, not by_index)
        if n < after:
            break
        by_index = 2 * strays > c
        if bad >= 0:
            return -bad - 1
        cur, nxt = nxt, cur
    return finish_walk(data, geom, g0, n, path, versions)


@njit(inline="always")
def match_tokens(tokens, ws, values, chain):
    """Reader match of raw tokens with the key-chain kernel ``chain``.

    Returns the matched block count (values as in ``match_keys_kernel``), or
    ``-(i + 1)`` when token ``i`` is outside ``[0, 2**32)`` (nothing matched),
    ``WS_TOO_SMALL`` when the workspace must first grow, or ``RETIRED`` when
    the segment is being removed.
    """
    data, wdata = segment_parts(ws)
    if load_acquire(data, H_RETIRED) != 0:
        return RETIRED
    geom = ws[:G_WORDS].view(np.int64)
    n_blocks = tokens.shape[0] // geom[G_BLOCK_SIZE]
    if ws.shape[0] < workspace_words(n_blocks, geom[G_BLOCK_SIZE]) or values.shape[0] < n_blocks:
        return WS_TOO_SMALL
    path, versions = workspace_path(ws, n_blocks)
    n = walk_tokens(data, geom, tokens, ws, chain, n_blocks, path, versions, values, versions, False)
    if n >= 0:
        note_hits(data, wdata, geom, path, n, n_blocks)
    return n


@helper
def owner_lengths(owners, n, entries, out, block_size):
    """For each owner-table entry of ``entries``, how many leading tokens of
    a matched path it holds: the blocks before the first one whose
    presence word (``owners[:n]``) lacks its bit, written to ``out``.
    O(n + entries x owners that drop out along the path)."""
    held = np.uint64(0)
    for j in range(entries.shape[0]):
        held |= _ONE << np.uint64(entries[j] & 63)
        out[j] = n * block_size
    for d in range(n):
        still = held & owners[d]
        if still != held:
            for j in range(entries.shape[0]):
                if (held & ~still) & (_ONE << np.uint64(entries[j] & 63)):
                    out[j] = d * block_size
            held = still
            if held == 0:
                break


@njit(inline="always")
def match_owners(tokens, ws, entries, out, chain):
    """For each owner-table entry in ``entries``, how many leading tokens of
    ``tokens`` that owner holds, written to ``out`` (tokens, a multiple of
    the block size): all of them from one instant during the call.

    Returns the number of blocks matched by any owner or none (the longest
    cached prefix), or the codes of ``match_tokens``, or ``OWNERS_RENAMED``
    when the owner table's names changed since the Reader read them (the
    workspace's epoch): read them again and retry. Matching neither stamps
    hits nor counts a query: it is a question about the cache, not a use
    of it.
    """
    data, wdata = segment_parts(ws)
    if load_acquire(data, H_RETIRED) != 0:
        return RETIRED
    if load_acquire(data, H_OWNERS_EPOCH) != ws[WS_OWNERS_EPOCH]:
        return OWNERS_RENAMED
    geom = ws[:G_WORDS].view(np.int64)
    block_size = geom[G_BLOCK_SIZE]
    n_blocks = tokens.shape[0] // block_size
    if ws.shape[0] < workspace_words(n_blocks, block_size):
        return WS_TOO_SMALL
    path, versions = workspace_path(ws, n_blocks)
    work = ws[WS_HEADER:]
    owners = work[2 * n_blocks : 3 * n_blocks]
    values = work[3 * n_blocks : 4 * n_blocks].view(np.int64)
    n = walk_tokens(data, geom, tokens, ws, chain, n_blocks, path, versions, values, owners, True)
    if n < 0:
        return n
    fence_acquire()
    if load_relaxed(data, H_OWNERS_EPOCH) != ws[WS_OWNERS_EPOCH]:
        return OWNERS_RENAMED
    owner_lengths(owners, n, entries, out, block_size)
    return n


# One compiled kernel per key-chain kernel, so that a process compiles
# only the chain its segment's block size uses (``hashing.chain_for``).


@njit(cache=True, nogil=True, _nrt=False)
def match_tokens16(tokens, ws, values):
    """``match_tokens`` for 16-token blocks."""
    return match_tokens(tokens, ws, values, chain16)


@njit(cache=True, nogil=True, _nrt=False)
def match_tokens_any(tokens, ws, values):
    """``match_tokens`` for any block size."""
    return match_tokens(tokens, ws, values, chain_any)


@njit(cache=True, nogil=True, _nrt=False)
def match_owners16(tokens, ws, entries, out):
    """``match_owners`` for 16-token blocks."""
    return match_owners(tokens, ws, entries, out, chain16)


@njit(cache=True, nogil=True, _nrt=False)
def match_owners_any(tokens, ws, entries, out):
    """``match_owners`` for any block size."""
    return match_owners(tokens, ws, entries, out, chain_any)


_WORKSPACE_TYPE = types.Array(types.uint64, 1, "C")
_VALUES_TYPE = types.Array(types.int64, 1, "C")


def token_kernel(dtype: np.dtype, block_size: int, owners: bool = False) -> Callable[..., int]:
    """The match kernel (``match_owners``' if ``owners``) for tokens of
    ``dtype`` and the block size, as its compiled entry point (loaded from
    Numba's cache, or compiled, now).

    Calling the entry point skips Numba's dispatcher, which on every call
    derives the argument types and picks an overload: about 0.1 µs of
    a 2.5 µs warm match. The entry point checks only that each argument is
    an ndarray of the right item size, so the caller must pass: tokens of
    ``dtype`` (native byte order), 1-D and C-contiguous; a reader
    workspace; 1-D int64 arrays for the rest. An array of more dimensions would
    overrun the one-dimensional argument struct it is unboxed into. The tokens
    are typed read-only and possibly misaligned, the weakest assumptions,
    so every such array fits (the kernel only reads them, with loads that
    assume no alignment: as fast on aligned arrays).
    """
    tokens_type = types.Array(from_dtype(dtype), 1, "C", readonly=True, aligned=False)
    if owners:
        kernel = match_owners16 if block_size == 16 else match_owners_any
        return kernel.compile((tokens_type, _WORKSPACE_TYPE, _VALUES_TYPE, _VALUES_TYPE))
    kernel = match_tokens16 if block_size == 16 else match_tokens_any
    return kernel.compile((tokens_type, _WORKSPACE_TYPE, _VALUES_TYPE))
