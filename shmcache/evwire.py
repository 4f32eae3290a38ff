"""The msgpack bytes of published KV events, written by Numba kernels.

A daemon that publishes pays for every event in its own loop, so the
events of an operation are encoded in one kernel call instead of a Python
object per event: ``BlockStored`` and ``BlockRemoved`` exactly as msgspec
encodes vLLM 0.33's structs (canonical msgpack: every int in its smallest
unsigned form). The parts of an event that never change (map keys, the
tag, ``medium``, ``group_idx``, ...) come in as byte pieces that
``shmcache.publish`` encodes once with msgspec itself; the kernels write
what varies between them: the block hashes, the parent and the token ids.
The tests prove the result byte for byte equal to msgspec's encoding.

``apply_op`` also keeps the publisher's mirror of each stored block's
tokens, which the segment does not hold (snapshots need them).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .atomics import store_u64_be
from .wstate import J_DROPPED, J_STORED

_NIL = np.uint8(0xC0)
_FF, _8, _16, _24 = np.uint64(0xFF), np.uint64(8), np.uint64(16), np.uint64(24)
_CE56 = np.uint64(0xCE << 56)


@njit(cache=True)
def put_uint(out, pos, v):
    """``v`` (uint64) as msgpack's smallest unsigned int at ``out[pos]``
    (big-endian); returns the new pos. Each width spelled out: a byte loop
    costs twice as much per token."""
    if v < 128:
        out[pos] = np.uint8(v)
        return pos + 1
    if v < 256:
        out[pos] = 0xCC
        out[pos + 1] = np.uint8(v)
        return pos + 2
    if v < 65536:
        out[pos] = 0xCD
        out[pos + 1] = np.uint8(v >> _8)
        out[pos + 2] = np.uint8(v & _FF)
        return pos + 3
    if v < 4294967296:
        out[pos] = 0xCE
        out[pos + 1] = np.uint8(v >> _24)
        out[pos + 2] = np.uint8((v >> _16) & _FF)
        out[pos + 3] = np.uint8((v >> _8) & _FF)
        out[pos + 4] = np.uint8(v & _FF)
        return pos + 5
    out[pos] = 0xCF
    store_u64_be(out, pos + 1, v)
    return pos + 9


@njit(cache=True)
def put_array_header(out, pos, n):
    if n < 16:
        out[pos] = np.uint8(0x90 | n)
        return pos + 1
    if n < 65536:
        out[pos] = 0xDC
        out[pos + 1] = np.uint8(n >> 8)
        out[pos + 2] = np.uint8(n & 0xFF)
        return pos + 3
    out[pos] = 0xDD
    for i in range(4):
        out[pos + 4 - i] = np.uint8((n >> (8 * i)) & 0xFF)
    return pos + 5


@njit(cache=True)
def put_bytes(out, pos, piece):
    for i in range(piece.shape[0]):
        out[pos + i] = piece[i]
    return pos + piece.shape[0]


@njit(cache=True)
def put_stored(out, pos, keys, parent_key, has_parent, tokens, head, mid, tail, rest):
    """One ``BlockStored``: ``head``, the hashes ``keys`` (uint64), ``mid``,
    the parent (nil unless ``has_parent``), ``tail``, the ``tokens``, ``rest``."""
    pos = put_bytes(out, pos, head)
    pos = put_array_header(out, pos, keys.shape[0])
    for i in range(keys.shape[0]):
        pos = put_uint(out, pos, keys[i])
    pos = put_bytes(out, pos, mid)
    if has_parent:
        pos = put_uint(out, pos, parent_key)
    else:
        out[pos] = _NIL
        pos += 1
    pos = put_bytes(out, pos, tail)
    pos = put_array_header(out, pos, tokens.shape[0])
    for i in range(tokens.shape[0]):
        # Every id a uint32 (0xce and 4 bytes), stored as 8 bytes whose last
        # 3 the next id (or ``rest``) overwrites: one store per id, and no
        # dependency from one to the next. ``bound`` leaves the room.
        store_u64_be(out, pos + 5 * i, _CE56 | (np.uint64(np.uint32(tokens[i])) << _24))
    return put_bytes(out, pos + 5 * tokens.shape[0], rest)


@njit(cache=True)
def put_removed(out, pos, keys, head, rest):
    """One ``BlockRemoved`` of the hashes ``keys`` (uint64)."""
    pos = put_bytes(out, pos, head)
    pos = put_array_header(out, pos, keys.shape[0])
    for i in range(keys.shape[0]):
        pos = put_uint(out, pos, keys[i])
    return put_bytes(out, pos, rest)


#: The constant pieces of the events, packed into one byte array (fewer
#: arguments: each costs a kernel call about 0.1 µs to unbox) and found
#: through an offsets array: piece ``i`` is ``pieces[offs[i]:offs[i + 1]]``.
#: The fields after ``token_ids`` of namespace id ``k`` are piece
#: ``PIECE_REST + k``.
PIECE_S_HEAD, PIECE_S_MID, PIECE_S_TAIL, PIECE_R_HEAD, PIECE_R_REST, PIECE_REST = range(6)


@njit(inline="always")
def _piece(pieces, offs, i):
    return pieces[offs[i] : offs[i + 1]]


@njit(cache=True)
def apply_op(entries, tokens, ns_id, block_size, mtok, mns, emit, out, pos, pieces, offs):
    """Take the journal rows ``entries`` of one operation (as
    ``Writer.watch`` gives them) whose blocks were chained from ``tokens``
    in namespace id ``ns_id`` (-1: it stored nothing): record the tokens of
    each stored block in the mirror ``mtok`` (``block_size`` per state) and
    its namespace id in ``mns`` (-1 for a dropped one), and, with ``emit``,
    write the node stream's events into ``out`` from ``out[pos]`` on (the
    caller leaves ``bound`` bytes there): one ``BlockStored`` per run of stores (a chain:
    ``mutate.add_chain`` adds each below the one before), one
    ``BlockRemoved`` per run of drops, leaving out blocks whose tokens were
    never known. Returns ``(the new pos, events, drops of unknown
    blocks)``."""
    events = 0
    unknown = 0
    m = entries.shape[0]
    keys = np.empty(m, dtype=np.uint64)
    i = 0
    while i < m:
        op = entries[i, 0]
        j = i
        while j < m and entries[j, 0] == op:
            j += 1
        if op == J_STORED:
            r = i
            while r < j:
                # Blocks stored in consecutive records (a fresh segment's, or
                # a run of its free list) are mirrored in one copy.
                e = r + 1
                while e < j and entries[e, 1] == entries[e - 1, 1] + 1 and entries[e, 2] == entries[e - 1, 2] + 1:
                    e += 1
                s0, b0 = entries[r, 1] * block_size, entries[r, 2] * block_size
                mtok[s0 : s0 + (e - r) * block_size] = tokens[b0 : b0 + (e - r) * block_size]
                for k in range(r, e):
                    mns[entries[k, 1]] = ns_id
                    keys[k - i] = np.uint64(entries[k, 4])
                r = e
            if emit:
                b0 = entries[i, 2] * block_size
                pos = put_stored(out, pos, keys[: j - i], np.uint64(entries[i, 6]), entries[i, 5] >= 0,
                                 tokens[b0 : b0 + (j - i) * block_size], _piece(pieces, offs, PIECE_S_HEAD),
                                 _piece(pieces, offs, PIECE_S_MID), _piece(pieces, offs, PIECE_S_TAIL),
                                 _piece(pieces, offs, PIECE_REST + ns_id))
                events += 1
        elif op == J_DROPPED:
            n = 0
            for r in range(i, j):
                s = entries[r, 1]
                if mns[s] >= 0:
                    keys[n] = np.uint64(entries[r, 2])
                    n += 1
                else:
                    unknown += 1
                mns[s] = -1
            if emit and n > 0:
                pos = put_removed(out, pos, keys[:n], _piece(pieces, offs, PIECE_R_HEAD),
                                  _piece(pieces, offs, PIECE_R_REST))
                events += 1
        i = j
    return pos, events, unknown


@njit(cache=True)
def apply_ops(entries, ops, tokens, block_size, mtok, mns, emit, out, pos, pieces, offs):
    """``apply_op`` for operations one after the other, in one call (a
    call from Python costs more than encoding a small operation): their
    journal rows back to back in ``entries``; per operation, a row of
    ``ops``: how many rows it has, where its tokens begin and end in
    ``tokens``, its namespace id. Returns ``apply_op``'s new pos, and its
    events and drops of unknown blocks summed."""
    events = 0
    unknown = 0
    r = 0
    for k in range(ops.shape[0]):
        n = ops[k, 0]
        pos, e, u = apply_op(entries[r : r + n], tokens[ops[k, 1] : ops[k, 2]], ops[k, 3], block_size, mtok, mns,
                             emit, out, pos, pieces, offs)
        events += e
        unknown += u
        r += n
    return pos, events, unknown


def bound(entries: int, block_size: int, pieces: int, events: int | None = None) -> int:
    """Bytes ``apply_op`` may write for ``entries`` journal rows making at
    most ``events`` events (default: one per row): per block a hash (9) and
    its tokens (5 each), per event its constant ``pieces`` bytes, a parent
    and two headers."""
    return entries * (9 + 5 * block_size) + (entries if events is None else events) * (pieces + 19)
