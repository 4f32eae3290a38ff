"""The writer-private structures over the tree of states, all in
``Arrays`` and rebuilt from the state table by ``recovery.rebuild``:
children lists (``links``: first child, next and previous sibling), the
stack of free records, and a lazy min-heap of leaves keyed by recency
(exact LRU: a popped entry whose state was used since is pushed back with
its new key).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .jitcache import helper
from .layout import G_CAPACITY
from .wstate import FC, M_FREE_TOP, M_HEAP_SIZE, NEXT, NIL, PREV, effective_recency, is_live, is_protected


@njit(inline="always")
def node(A, p):
    """Row of ``links`` for parent ``p`` (-1 is the root)."""
    return A.geom[G_CAPACITY] if p < 0 else p


@njit(inline="always")
def is_leaf(A, s):
    return A.links[s, FC] == NIL


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


@njit(inline="always")
def free_record(A, s):
    A.free[A.meta[M_FREE_TOP]] = s
    A.meta[M_FREE_TOP] += 1


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
    n = np.int64(0)
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
        heap_sift_down(A, np.int64(0), n)
    return key, s


@njit(inline="always")
def evictable_leaf(A, s):
    """A live leaf that no writer pin protects and no reader pin names."""
    return is_live(A, s) and is_leaf(A, s) and not is_protected(A, s) and A.rpin[s] == 0


@njit(inline="always")
def push_if_evictable(A, s):
    if s >= 0 and evictable_leaf(A, s):
        heap_push(A, effective_recency(A, s), s)
