"""Named owners letting go of blocks: the kernels that take presence bits away.

Owner-table entry ``i`` holds a block while bit ``i`` of the block's OWNERS
word is set (``shmcache.layout``). What an owner holds is closed under
parent (it holds every ancestor of a block it holds), so a child's bits are
a subset of its parent's. Bits are set by inserts along the whole inserted
path (``mutate.insert_kernel``) and taken away here:

* ``release_kernel``: owner ``i`` stops holding some states and everything
  below them (an engine's ``BlockRemoved`` of a middle block: the blocks
  after it are no prefix of anything it still holds), or everything (the
  virtual root: a clear, a restart, a named client leaving).
* A block whose last owner lets go leaves the cache with its subtree, as a
  ``remove`` would drop it (nobody's KV holds it any more). Blocks never
  held by a named owner (presence 0, inserted without one) are untouched.

Bits are taken off parents before children, each record under its version,
so a reader's one-instant check sees every block with the owners it had at
that instant. A writer that dies half-way leaves parents released and
children not: ``recovery.rebuild`` restores the subset rule.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .jitcache import helper
from .layout import G_CAPACITY, G_OWNERS, H_REMOVED, O_BLOCKS, OWNER_WORDS
from .matcher import walk
from .mutate import drop_subtree, subtree_size
from .tree import node, push_if_evictable
from .wstate import FC, NEXT, NIL, begin, bump, end, is_live, owners_of, parent_of, set_owners

_ONE = np.uint64(1)


@helper
def release_from(A, root, bit, drops, n_drops):
    """Take ``bit`` off ``root`` (a state, or the virtual root ``capacity``
    standing for every top-level state) and off every descendant holding
    it. States left held by nobody are not changed but written to
    ``drops[n_drops:]``, for the caller to drop with their subtrees (all
    held by nobody, by the subset rule). Returns the new ``n_drops``."""
    cap = A.geom[G_CAPACITY]
    cur = root
    while True:
        descend = cur == cap
        if cur != cap:
            held = owners_of(A, cur)
            if held & bit:
                rest = held & ~bit
                if rest == 0:
                    drops[n_drops] = cur
                    n_drops += 1
                else:
                    set_owners(A, cur, rest)
                    descend = True
        if descend and A.links[cur, FC] != NIL:
            cur = A.links[cur, FC]
            continue
        # A subtree without the bit is skipped whole: nothing below holds it.
        while cur != root and A.links[cur, NEXT] == NIL:
            cur = node(A, parent_of(A, cur))
        if cur == root:
            return n_drops
        cur = A.links[cur, NEXT]


@njit(cache=True)
def path_kernel(A, keys):
    """``(state, drop count)`` rows of the leading cached blocks of the chain
    ``keys``, changing nothing (not even recency)."""
    n = keys.shape[0]
    path = np.empty(n, dtype=np.int64)
    versions = np.empty(n, dtype=np.uint64)
    values = np.empty(n, dtype=np.int64)
    k = walk(A.data, A.geom, np.int64(-1), keys, n, path, versions, values, versions, False)
    out = np.empty((k, 2), dtype=np.int64)
    for i in range(k):
        out[i, 0] = path[i]
        out[i, 1] = np.int64(A.gen[path[i]])
    return out


@njit(inline="always")
def owner_blocks(A, entry):
    return np.int64(A.data[A.geom[G_OWNERS] + entry * OWNER_WORDS + O_BLOCKS])


@njit(cache=True)
def release_kernel(A, refs, entry):
    """One operation: owner ``entry`` stops holding the state of each
    ``(state, drop count)`` row of ``refs`` that is still the one its caller
    named (rows from an insert's refs; the virtual root ``capacity``, drop
    count ignored, stands for everything the owner holds), and every block
    below it.

    Returns ``(rows, released)``: the ``(value, client)`` rows of the blocks
    that left the cache (held by nobody any more), children first, and how
    many blocks the owner let go of.
    """
    cap = A.geom[G_CAPACITY]
    bit = _ONE << np.uint64(entry)
    before = owner_blocks(A, entry)
    drops = A.scratch  # at most one entry per block the owner holds
    out = np.empty((64, 2), dtype=np.int64)
    n_out = np.int64(0)
    begin(A)
    for i in range(refs.shape[0]):
        r = refs[i, 0]
        if r != cap and not (0 <= r < cap and is_live(A, r) and A.gen[r] == np.uint64(refs[i, 1])):
            continue
        # Drop this root's orphans before the next root is walked: a later
        # root may lie inside one of them.
        n_drops = release_from(A, r, bit, drops, np.int64(0))
        room = n_out
        for j in range(n_drops):
            room += subtree_size(A, drops[j])
        if room > out.shape[0]:
            grown = np.empty((max(room, 2 * out.shape[0]), 2), dtype=np.int64)
            for j in range(n_out):  # a loop: an array-to-array copy compiles Numba's broadcasting (4 s fresh)
                grown[j, 0] = out[j, 0]
                grown[j, 1] = out[j, 1]
            out = grown
        for j in range(n_drops):
            p = parent_of(A, drops[j])
            n_out = drop_subtree(A, drops[j], out, n_out)
            push_if_evictable(A, p)
    bump(A, H_REMOVED, n_out)
    end(A)
    return out[:n_out], before - owner_blocks(A, entry)
