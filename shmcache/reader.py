"""``Reader``: a read-only, lock-free view of a segment, for any process.

A Reader maps the data part of the segment read-only and its writable part
read-write, registers itself in the reader table, and answers matches with
the Numba matcher of ``shmcache.matcher``. It never takes a lock, never
blocks the writer, and never unlinks anything, so a worker process may
attach, detach and die freely.

``match_and_pin`` also pins the matched blocks against eviction until
``unpin`` (see ``shmcache.pins`` for the handshake that makes this safe
without a lock). The pins live in this reader's slot of the reader table;
if the process dies holding them, the writer reclaims them.

A Reader holds its slot of the reader table through a kernel-released lock
(``shmcache.liveness``): it is alive, to the writer and to other readers,
exactly as long as its process holds the segment open, in whatever PID
namespace it runs. ``close`` (or garbage collection of the Reader) releases
its pins and its slot.

A Reader is not thread-safe: give each thread its own (they are cheap), or
serialise calls. Matching releases the GIL (the kernels are ``nogil``). Do
not use a Reader in a process forked from the one that attached it: the
child shares its slot's lock (the slot counts as alive until both exit),
and closing the Reader there only unmaps it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import numpy as np

from . import liveness, owners, segment
from .atomics import publish_word
from .checks import check_segment
from .errors import ClosedError, InvalidInputError, PinLimitError, SegmentCorruptError, SegmentRetiredError
from .identity import me
from .keys import NO_VALUES, KeyChain, Namespace, PrefixMatch, as_keys, as_tokens, bad_token_error
from .layout import (
    G_READER_SLOTS,
    G_SLOT,
    H_INCARNATION,
    H_SEED_HI,
    H_SEED_LO,
    RD_HIT_BLOCKS,
    RD_PID,
    RD_PINNED,
    RD_QUERIES,
    RD_QUERY_BLOCKS,
    RD_PIDNS,
    LOCK_WRITER,
    reader_lock_byte,
    reader_word,
)
from .matcher import (
    OWNERS_RENAMED,
    RETIRED,
    WS_HEADER,
    WS_OWNERS_EPOCH,
    WS_ROOT,
    WS_TOO_SMALL,
    match_keys_kernel,
    token_kernel,
    workspace_path,
    workspace_words,
)
from .pins import PinnedMatch, clear_slot, pin_path_kernel, release_entries
from .report import describe_violations, header_stats

__all__ = ["Reader", "PrefixMatch", "PinnedMatch"]


#: The hot path builds its PrefixMatch with tuple.__new__ directly (the
#: NamedTuple constructor is Python code), calls the match kernel's entry
#: point for the token arrays callers usually hold (``_KERNELS``), and
#: allocates the values array before the kernel fills it (cheaper than
#: copying it out of the workspace).
_new_tuple = tuple.__new__
_empty = np.empty
_INT64 = np.dtype(np.int64)
_NDARRAY = np.ndarray

#: Per kind of match (``match_owners`` or not, 16-token blocks or not), per
#: token dtype met so far: the strides of a 1-D C-contiguous array of it,
#: and the match kernel's entry point for it (``matcher.token_kernel``). An
#: array whose type is exactly ndarray, whose dtype is here and whose strides
#: are this one-element tuple (so it is 1-D) fits that entry point, and the
#: hot path calls it directly; anything else goes through ``checked_tokens``.
Kernels = dict[np.dtype, tuple[tuple[int, ...], Callable[..., int]]]
_KERNELS: dict[tuple[bool, bool], Kernels] = {(o, b): {} for o in (False, True) for b in (False, True)}


def checked_tokens(tokens: object, block_size: int, owners: bool = False) -> tuple[np.ndarray, Callable[..., int]]:
    """``tokens`` as ``as_tokens`` makes them (a 1-D C-contiguous integer
    array in native byte order), with the match kernel entry point for
    their dtype and the block size (of ``match_owners`` if ``owners``)."""
    toks = as_tokens(tokens)
    kernels = _KERNELS[owners, block_size == 16]
    entry = kernels.get(toks.dtype)
    if entry is None:
        entry = kernels[toks.dtype] = ((toks.dtype.itemsize,), token_kernel(toks.dtype, block_size, owners))
    return toks, entry[1]


def _match(length: int, values: np.ndarray) -> PrefixMatch:
    return _new_tuple(PrefixMatch, (length, values))


class Reader:
    """A lock-free, read-only handle on a segment. Create with ``Reader.attach``."""

    def __init__(self, mapping: segment.Mapping) -> None:
        self._map = mapping
        self._data = mapping.data  # the hot path reads these two directly
        self._wdata = mapping.wdata
        self._geom = mapping.geometry.vector()
        self.name = mapping.name
        self.block_size = mapping.geometry.block_size
        self.capacity = mapping.geometry.capacity
        self.seed = int(mapping.data[H_SEED_LO]) | (int(mapping.data[H_SEED_HI]) << 64)
        self.incarnation = int(mapping.data[H_INCARNATION])
        self._chain = KeyChain(self.block_size, self.seed)
        self._kernels = _KERNELS[False, self.block_size == 16]
        self._owner_kernels = _KERNELS[True, self.block_size == 16]
        self._pins = mapping.wdata.view(np.uint32)
        self.reader_pins = mapping.geometry.reader_pins
        #: The entries of a ``match_and_pin`` that may not have returned its
        #: handle (interrupted): released before the next one, or at close.
        self._unreturned: np.ndarray | None = None
        self._slot = self._register()
        self._geom[G_SLOT] = self._slot
        self._leave = weakref.finalize(self, _leave, mapping, self._geom, self._slot, os.getpid())
        try:
            self._namespace: Namespace = None
            self._ws = np.zeros(0, dtype=np.uint64)
            self._owners_epoch = (1 << 64) - 1  # never an epoch: match_owners reads the names first
            self._owner_names: list[str] = []
            self._owner_entries = np.zeros(0, dtype=np.int64)
            self._grow(256)
        except BaseException:
            self._data = None
            self._leave()
            raise

    def _grow(self, n_blocks: int) -> None:
        """Size the workspace for prompts of ``n_blocks`` blocks (header kept)."""
        ws = np.zeros(workspace_words(n_blocks, self.block_size), dtype=np.uint64)
        ws[:WS_HEADER] = (self._geom.view(np.uint64).tolist() + list(self._chain.root(self._namespace))
                          + [self._data.ctypes.data, self._data.shape[0], self._wdata.ctypes.data, self._wdata.shape[0],
                             self._owners_epoch])
        self._ws = ws

    def _read_owner_names(self) -> None:
        """Read the owner table's names (one consistent copy) for ``match_owners``."""
        table = owners.snapshot(self._data, self._geom)
        named = table.named()
        self._owner_names = [name for _, name in named]
        self._owner_entries = np.array([i for i, _ in named], dtype=np.int64)
        self._owners_epoch = self._ws[WS_OWNERS_EPOCH] = table.epoch

    def _use_namespace(self, namespace: Namespace) -> None:
        self._ws[WS_ROOT : WS_ROOT + 2] = self._chain.root(namespace)
        self._namespace = namespace

    @classmethod
    def attach(cls, name: str, *, allow_other_owner: bool = False) -> "Reader":
        """Attach to the segment ``name`` from any process; takes no lock.

        Raises SegmentNotFoundError, IncompatibleSegmentError or
        SegmentPermissionError if it cannot be used.
        """
        mapping = segment.attach(name, writable=False, allow_other_owner=allow_other_owner)
        try:
            return cls(mapping)
        except BaseException:
            mapping.close()  # a no-op if the Reader let go of it already
            raise

    # --- reader table -------------------------------------------------------

    def _register(self) -> int:
        """Claim a free reader-table slot; -1 if live readers hold all of them.

        A slot is free when no live process holds its lock: never used,
        left, or left by a reader that died. Claiming takes the lock, then
        clears whatever pins a dead holder left before recording this
        process (pid and PID namespace, for people).
        """
        pid, pidns = me()
        w, fd = self._map.wdata, self._map.fd
        for slot in range(int(self._geom[G_READER_SLOTS])):
            if not liveness.try_lock(fd, reader_lock_byte(slot)):
                continue
            try:
                clear_slot(w, self._pins, self._geom, slot)
                for word in (RD_QUERIES, RD_QUERY_BLOCKS, RD_HIT_BLOCKS):
                    w[reader_word(slot, word)] = 0
                w[reader_word(slot, RD_PIDNS)] = pidns
                publish_word(w, reader_word(slot, RD_PID), np.uint64(pid))
            except BaseException:
                liveness.unlock(fd, reader_lock_byte(slot))
                raise
            return slot
        return -1

    # --- matching ---------------------------------------------------------------

    def _retired(self) -> SegmentRetiredError:
        return SegmentRetiredError(
            f"segment {self.name!r} was removed (its writer unlinked it, maybe to recreate it): "
            f"close this Reader and attach again"
        )

    def _check_open(self) -> None:
        if self._data is None:
            raise ClosedError(f"Reader for {self.name!r} is closed: attach a new one with Reader.attach")

    def match_prefix(self, tokens: object, namespace: Namespace = None) -> PrefixMatch:
        """The longest cached prefix of ``tokens``, as one consistent snapshot.

        ``tokens``: 1-D integer array or list of ids in ``[0, 2**32)``; a
        trailing partial block is ignored. The cost follows the answer, not
        the prompt: blocks are hashed ``matcher.CHUNK`` at a time and the
        match stops at the chunk of its first miss, so an array's ids are
        checked as far as that chunk (an id out of range there raises
        InvalidInputError), and not beyond it (at most one more chunk is
        read, ahead of the walk). Every returned block was present,
        with the returned value, at one instant during the call; under
        concurrent writes the answer may be shorter, never wrong. Another
        thread must not reshape the array in place (assign its ``shape``)
        during the call.
        """
        # The checks of checked_tokens are skipped for the arrays callers
        # usually pass: every call saved is about 0.3 µs of a 2.5 µs match.
        if self._data is None:
            self._check_open()
        if namespace is not self._namespace:
            self._use_namespace(namespace)
        entry = self._kernels.get(tokens.dtype) if type(tokens) is _NDARRAY else None
        if entry is not None and tokens.strides == entry[0]:
            kernel = entry[1]
        else:
            tokens, kernel = checked_tokens(tokens, self.block_size)
        n = len(tokens) // self.block_size
        values = _empty(n, _INT64)
        k = kernel(tokens, self._ws, values)
        if k < 0:
            k = self._match_failed(k, tokens, values)
        return _new_tuple(PrefixMatch, (k * self.block_size, NO_VALUES if not k else values if k == n else values[:k]))

    def _match_failed(self, code: int, toks: np.ndarray, values: np.ndarray) -> int:
        """Handle a negative kernel answer: raise, or grow the workspace and
        match again; returns the matched block count."""
        if code == RETIRED:
            raise self._retired()
        if code != WS_TOO_SMALL:
            raise bad_token_error(toks, -code - 1)
        self._grow(len(values))
        toks, kernel = checked_tokens(toks, self.block_size)  # checked again: growing ran Python code
        k = kernel(toks, self._ws, values)
        return k if k >= 0 else self._match_failed(k, toks, values)

    def match_owners(self, tokens: object, namespace: Namespace = None) -> dict[str, int]:
        """For every owner named in the segment, how many leading tokens of
        ``tokens`` it holds (0 included), as one consistent snapshot: each
        owner held all the blocks it is credited with at one instant during
        the call, the same instant for every owner. Under concurrent writes
        an owner may be credited less, never more.

        The question a data-parallel router asks: which rank already holds
        the longest prefix of this prompt? A match of this kind is not a use
        of the blocks: it neither refreshes their recency nor counts as a
        query. ``tokens`` and ``namespace`` as in ``match_prefix``.
        """
        if self._data is None:
            self._check_open()
        if namespace is not self._namespace:
            self._use_namespace(namespace)
        entry = self._owner_kernels.get(tokens.dtype) if type(tokens) is _NDARRAY else None
        if entry is not None and tokens.strides == entry[0]:
            kernel = entry[1]
        else:
            tokens, kernel = checked_tokens(tokens, self.block_size, owners=True)
        out = _empty(len(self._owner_entries), _INT64)
        if kernel(tokens, self._ws, self._owner_entries, out) >= 0:
            return dict(zip(self._owner_names, out.tolist()))
        for _ in range(1000):
            out = _empty(len(self._owner_entries), _INT64)
            k = kernel(tokens, self._ws, self._owner_entries, out)
            if k >= 0:
                return dict(zip(self._owner_names, out.tolist()))
            if k == OWNERS_RENAMED:
                self._read_owner_names()
            elif k == WS_TOO_SMALL:
                self._grow(len(tokens) // self.block_size)
                tokens, kernel = checked_tokens(tokens, self.block_size, owners=True)  # checked again: growing ran Python code
            elif k == RETIRED:
                raise self._retired()
            else:
                raise bad_token_error(tokens, -k - 1)
        raise RuntimeError(f"the owner table of {self.name!r} kept being renamed during match_owners")

    def owners(self) -> dict[str, int]:
        """Every owner named in the segment, with the number of blocks it holds."""
        self._check_open()
        return owners.held(owners.snapshot(self._data, self._geom))

    def owner_info(self) -> dict[str, dict]:
        """Per named owner: blocks, kind, attached and, for KV-event sources,
        their counters and skips (``shmcache.owners.describe``)."""
        self._check_open()
        return owners.describe(owners.snapshot(self._data, self._geom))

    def match_and_pin(self, tokens: object, namespace: Namespace = None) -> PinnedMatch:
        """Match like ``match_prefix`` and pin the matched blocks: none of them
        is evicted until ``unpin(handle)`` (or the end of ``with handle:``).

        A block the writer evicts while this call runs is never reported
        pinned: the answer is then shorter. Pins protect against eviction
        only; ``Writer.remove``/``clear`` still drop pinned blocks (their
        owner freed the KV). If this process dies, the writer reclaims its
        pins. Raises PinLimitError when this reader already holds
        ``reader_pins`` pinned blocks, or when the reader table was full at
        attach.
        """
        self._check_open()
        if self._slot < 0:
            raise PinLimitError(
                f"this Reader has no reader-table slot (all {int(self._geom[G_READER_SLOTS])} were taken by live "
                "processes when it attached), so it cannot pin: close idle readers and attach again"
            )
        toks = as_tokens(tokens)
        if self._unreturned is not None:
            self._release_unreturned()
        match = self.match_prefix(toks, namespace)
        k = match.length // self.block_size  # not len(values): a caller may reshape the shared empty array of a miss
        in_use = int(self._wdata[reader_word(self._slot, RD_PINNED)])
        if in_use + k > self.reader_pins:
            raise PinLimitError(
                f"pinning {k} blocks would exceed this reader's {self.reader_pins} pin entries "
                f"({in_use} in use): unpin handles you no longer need, "
                "or create the segment with a larger reader_pins"
            )
        path, versions = workspace_path(self._ws, toks.shape[0] // self.block_size)
        entries = np.full(k, -1, dtype=np.int64)
        self._unreturned = entries  # before the kernel: whatever stops this call, they get released
        try:
            m = pin_path_kernel(self._data, self._wdata, self._pins, self._geom, path, versions, k, entries)
            handle = PinnedMatch(m * self.block_size, match.values[:m], entries[:m], self)
        except BaseException:
            self._release_unreturned()
            raise
        self._unreturned = None
        return handle

    def _release_unreturned(self) -> None:
        release_entries(self._wdata, self._pins, self._geom, self._slot, self._unreturned)
        self._unreturned = None  # after: interrupted before this, the next call releases them again (a no-op)

    def unpin(self, handle: PinnedMatch) -> None:
        """Release the pins of a ``match_and_pin`` handle of this reader."""
        self._check_open()
        if not isinstance(handle, PinnedMatch) or handle._reader is not self:
            raise InvalidInputError("unpin takes a handle returned by this Reader's match_and_pin")
        if handle._entries is None:
            raise InvalidInputError("this handle was already unpinned: unpin each handle once")
        entries, handle._entries = handle._entries, None
        release_entries(self._wdata, self._pins, self._geom, self._slot, entries)

    def match_keys(self, keys: np.ndarray) -> PrefixMatch:
        """Like ``match_prefix`` for precomputed ``(n, 2)`` uint64 keys
        (from ``block_keys`` with this segment's seed, or ``self.block_keys``)."""
        self._check_open()
        keys = as_keys(keys)
        n = keys.shape[0]
        if workspace_words(n, self.block_size) > self._ws.shape[0]:
            self._grow(n)
        values = _empty(n, _INT64)
        k = match_keys_kernel(keys, self._ws, values)
        if k == RETIRED:
            raise self._retired()
        return _match(k * self.block_size, NO_VALUES if not k else values if k == n else values[:k])

    def block_keys(self, tokens: object, namespace: Namespace = None) -> np.ndarray:
        """Chained keys of ``tokens`` under this segment's block size and seed."""
        self._check_open()
        return self._chain.keys(as_tokens(tokens), namespace)

    # --- inspection -----------------------------------------------------------------

    def stats(self) -> dict:
        """Segment-wide figures plus this reader's own query counters."""
        self._check_open()
        out = header_stats(self._map.data, self._map.geometry, liveness.is_held(self._map.fd, LOCK_WRITER))
        w = self._map.wdata
        mine = [int(w[reader_word(self._slot, f)]) if self._slot >= 0 else 0
                for f in (RD_QUERIES, RD_QUERY_BLOCKS, RD_HIT_BLOCKS, RD_PINNED)]
        out.update(reader_slot=self._slot, queries=mine[0], query_blocks=mine[1], hit_blocks=mine[2],
                   block_hit_rate=mine[2] / mine[1] if mine[1] else 0.0, pinned_entries=mine[3])
        return out

    def check(self) -> None:
        """Verify the segment's structural invariants from this read-only view.

        Raises IncompatibleSegmentError if the object was truncated or
        resized since this Reader mapped it (matching it then risks SIGBUS),
        SegmentCorruptError listing each violation. Meaningful when the
        writer is idle; during writes it may report transient states.
        """
        self._check_open()
        if self._map.resized():
            raise segment.resized_error(self.name)
        rows = check_segment(self._map.data, self._geom)
        if len(rows):
            raise SegmentCorruptError(f"segment {self.name!r} fails its invariant check", describe_violations(rows))

    # --- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Release every pin, leave the reader table and unmap. Never unlinks
        anything. Idempotent; handles of this reader are released with it.
        A Reader that is garbage-collected unclosed does the same."""
        if self._data is None:
            return
        self._data = self._wdata = self._pins = None
        self._leave()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._data is None else f"capacity={self.capacity} block_size={self.block_size}"
        return f"<shmcache.Reader {self.name!r} {state}>"


def _leave(mapping: segment.Mapping, geom: np.ndarray, slot: int, pid: int) -> None:
    """Clear reader ``slot``'s pins, free the slot, release its lock and
    unmap: ``Reader.close``, and the finalizer of a Reader collected open.
    A process forked from the attaching one shares the slot's lock
    (``shmcache.liveness``) and only unmaps: the slot stays its parent's."""
    try:
        if slot >= 0 and os.getpid() == pid:
            clear_slot(mapping.wdata, mapping.wdata.view(np.uint32), geom, slot)
            publish_word(mapping.wdata, reader_word(slot, RD_PID), np.uint64(0))
            liveness.unlock(mapping.fd, reader_lock_byte(slot))
    finally:
        mapping.close()
