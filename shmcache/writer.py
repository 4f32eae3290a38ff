"""``Writer``: the one process that changes a segment.

Exactly one Writer holds a segment at a time, across processes, PID
namespaces and containers. What decides it is the writer lock: a
kernel-released lock on the segment object's ``LOCK_WRITER`` byte
(``shmcache.liveness``). ``Writer.create`` takes it before the header
exists; ``Writer.open`` takes it without waiting, so a live holder (in this
PID namespace or any other) is refused with ``WriterBusyError``, and one
that died, SIGKILL included, is taken over at once, by exactly one of any
number of racing claimers: the kernel grants the lock to one description.
The winner records who it is (pid and PID namespace, for people), bumps
the epoch, stamps a fresh claim id, and repairs the segment
(``recovery.rebuild``). Before every operation a Writer checks that the claim
id is still its own and the segment not retired; if not, it raises
``WriterLostError`` and writes nothing.

The named semaphore ``/shmcache.<name>.writer`` is only the gate of that
claim: a creator holds it until the header is published (attachers wait on
it), and claimers pass through it one at a time, so one that is refused
names the holder that beat it. Nothing depends on its count: a claimer that
finds it taken for ``GATE_WAIT_S`` goes on without it, and one that then
wins gives the gate back, so a claimer that died inside it costs the next
one that wait once.

A Writer is not thread-safe; in the daemon a single thread owns it.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
import weakref
from typing import Callable, NamedTuple

import numpy as np
import posix_ipc

from . import liveness, segment
from .atomics import publish_word
from .errors import (
    CacheFullError,
    ClosedError,
    InvalidInputError,
    SegmentCorruptError,
    SegmentExistsError,
    SegmentRetiredError,
    WriterBusyError,
    WriterLostError,
)
from .identity import me, who
from .keys import NO_VALUES, KeyChain, Namespace, PrefixMatch, as_int64_array, as_tokens, as_values, check_seed
from .layout import (
    G_STATES,
    H_RETIRED,
    H_SEED_HI,
    H_SEED_LO,
    H_WRITER_CLAIM,
    H_WRITER_EPOCH,
    H_WRITER_PID,
    H_WRITER_PIDNS,
    LOCK_WRITER,
    MAX_OWNERS,
    O_ATTACHED,
    OWNER_CLIENT,
    R_KEY_HI,
    R_KEY_LO,
    R_OWNERS,
    RD_PID,
    RD_PINNED,
    READER_WORDS,
    READERS_WORD,
    RECORD_WORDS,
    Geometry,
    check_geometry_args,
    reader_lock_byte,
    reader_word,
)
from . import mutate, owners
from .checks import check_private, check_segment
from .pins import PinnedMatch, clear_slot
from .presence import path_kernel, release_kernel
from .recovery import rebuild
from .report import describe_violations, header_stats
from .wstate import JOURNAL_WORDS, M_CRASH, M_JOURNAL, WriterCrashed, init_empty, new_arrays

__all__ = ["Changes", "Writer", "WriterPin"]

EvictCallback = Callable[[np.ndarray], None]
ClientEvictCallback = Callable[[np.ndarray, np.ndarray], None]

#: How long a claimer waits for the gate (the semaphore) before it goes on
#: without it: another claimer is inside for microseconds, a creator for
#: as long as reserving the segment takes.
GATE_WAIT_S = 1.0
#: Numbered steps of ``Writer.open``'s claim, for its test hook: 1 before
#: the gate, 2 inside it, 3 holding the lock, 4 with the claim stamped, 5
#: out of the gate, before the repair.
CLAIM_STEPS = 5
#: Default seconds between two checks of the reader table for dead readers
#: holding pins (``Writer.reap_interval``).
REAP_INTERVAL_S = 1.0
#: Journal rows a watcher gets by default: more changes than that in one
#: operation (a clear or remove of a larger subtree) come as ``overflowed``.
JOURNAL_ENTRIES = 1 << 16


class Changes(NamedTuple):
    """What one operation changed, as a ``Writer.watch`` sink receives it.

    ``entries`` is an ``(n, wstate.JOURNAL_WORDS)`` int64 array, rows
    ``(op, state, a, ...)`` in the order the kernel made the changes
    (``wstate.J_*`` says what each column is). A ``J_STORED`` row's ``a``
    indexes the blocks of ``tokens`` (the operation's token ids, or None
    for operations that store nothing), all chained from ``namespace``.
    ``entries`` and ``tokens`` are the Writer's and the caller's: valid
    during the sink's call only, unless the sink returns True for
    ``entries``: the Writer then leaves those rows alone (later operations
    journal after them) until ``Writer.release_journal``. ``overflowed``:
    the operation made more changes than the journal holds and ``entries``
    is incomplete; the sink must resynchronise from the segment.
    """

    entries: np.ndarray
    tokens: "np.ndarray | None"
    namespace: Namespace
    overflowed: bool


def check_client(client: object) -> None:
    if isinstance(client, bool) or not isinstance(client, (int, np.integer)) or not 0 <= client <= 0xFFFFFFFF:
        raise InvalidInputError(f"client must be an int in [0, 2**32), got {client!r}")


def _holder(data: np.ndarray) -> str:
    """Who the header says holds the segment, for messages."""
    return who(int(data[H_WRITER_PID]), int(data[H_WRITER_PIDNS]))


def _stamp_claim(data: np.ndarray, epoch: int) -> int:
    """Record this process as the holder of the writer lock it just took:
    identity, epoch, and a fresh claim id (returned), published last."""
    pid, pidns = me()
    data[H_WRITER_PID], data[H_WRITER_PIDNS], data[H_WRITER_EPOCH] = pid, pidns, epoch
    claim = secrets.randbits(63) + 1
    publish_word(data, H_WRITER_CLAIM, np.uint64(claim))
    return claim


class _Gate:
    """The writer semaphore used as the gate of the claim procedure (see the
    module docstring): ``enter`` waits at most ``GATE_WAIT_S``; ``leave``
    gives back what ``enter`` took, and heals a gate left taken (by a claimer
    that died in it) when this one went on without it and won."""

    def __init__(self, name: str) -> None:
        segment.check_semaphore(name)
        try:
            self.sem = posix_ipc.Semaphore(segment.sem_path(name))
        except posix_ipc.ExistentialError:
            self.sem = posix_ipc.Semaphore(segment.sem_path(name), posix_ipc.O_CREAT, mode=0o600, initial_value=1)
        self.entered = False

    def enter(self) -> None:
        try:
            self.sem.acquire(GATE_WAIT_S)
            self.entered = True
        except posix_ipc.BusyError:
            pass

    def leave(self, won: bool) -> None:
        if self.entered or (won and self.sem.value == 0):
            self.sem.release()
        self.sem.close()


_NO_REFS = np.empty((0, 2), dtype=np.int64)


def _request(keys: np.ndarray) -> tuple[int, ...]:
    """What identifies the tokens of a pin: their block count and the chained
    key of the last block (which covers every token and the namespace)."""
    n = keys.shape[0]
    return (n, int(keys[n - 1, 0]), int(keys[n - 1, 1])) if n else (0,)


class WriterPin:
    """The handle ``Writer.pin`` returns: its blocks stay cached (never
    evicted) until ``Writer.unpin(handle)``.

    ``length`` is the tokens pinned. The handle records which states it
    pinned and how often each record had been dropped then, so a release
    touches exactly the blocks it still holds. A handle belongs to its
    Writer and lapses with it: the next writer of the segment starts with
    no writer pins.
    """

    __slots__ = ("length", "_states", "_gens", "_writer", "_request")

    def __init__(self, length: int, states: np.ndarray, gens: np.ndarray, writer: "Writer", request: tuple[int, ...]) -> None:
        self.length = length
        self._states: np.ndarray | None = states
        self._gens = gens
        self._writer = writer
        self._request = request

    @property
    def pinned(self) -> bool:
        """True until the handle is released or its Writer closed."""
        return self._states is not None and self._writer._A is not None

    def __repr__(self) -> str:
        return f"<WriterPin length={self.length} {'pinned' if self.pinned else 'released'}>"


class Writer:
    """The single writer of a segment. Create with ``Writer.create`` or ``Writer.open``.

    ``on_evict`` (optional) is called after an ``insert`` that had to evict,
    with the evicted values (an int64 array the callee owns), so the engine
    can free that KV, and after an owner let go of blocks no other owner
    held (``release``, ``clear_owner``: they left the cache).
    ``on_evict_clients(values, clients)`` is the same with the client id of
    each value, for writers shared by several clients (the daemon).
    Explicit ``evict``/``remove``/``clear`` return their values instead (and
    clients, with ``with_clients=True``).

    Owners: ``insert(..., owner="rank0")`` records that the named owner (a
    data-parallel rank, an engine) holds every block of the prompt;
    ``Reader.match_owners`` then tells, per owner, how much of a prompt it
    holds. An owner holds a block until it lets go of it (``release``,
    ``clear_owner``); a block held by owners leaves the cache when the last
    one lets go, or when capacity eviction or ``remove`` drops it. A block
    no owner ever held (inserted without one) stays until evicted or
    removed.

    Readers' pins (``Reader.match_and_pin``) are honoured by every eviction.
    Pins of a reader process that died are reclaimed by ``reap_readers``,
    which the Writer runs itself before an operation once ``reap_interval``
    seconds have passed since the last run, and before it gives up an insert
    as full.
    """

    on_evict_clients: ClientEvictCallback | None = None
    reap_interval: float = REAP_INTERVAL_S
    _sink: "Callable[[Changes], bool | None] | None" = None
    _call: tuple = (None, None)  # (tokens, namespace) of the operation running, for the sink
    _kept = 0  # journal rows [0, _kept) a sink keeps (returned True for): not written until released

    def __init__(self, mapping: segment.Mapping, claim: int, on_evict: EvictCallback | None, crash_at_step: int = 0,
                 fresh: bool = False) -> None:
        self._map = mapping
        self._claim_id = np.uint64(claim)
        self._pid = os.getpid()
        self._let_go = weakref.finalize(self, _let_go, mapping, self._claim_id, self._pid)
        try:
            self.name = mapping.name
            self.block_size = mapping.geometry.block_size
            self.capacity = mapping.geometry.capacity
            self.geometry: Geometry = mapping.geometry
            self.seed = int(mapping.data[H_SEED_LO]) | (int(mapping.data[H_SEED_HI]) << 64)
            self.on_evict = on_evict
            self._chain = KeyChain(self.block_size, self.seed)
            self._A = new_arrays(mapping.data, mapping.wdata, mapping.geometry.vector())
            self._A.meta[M_CRASH] = crash_at_step
            self._reaped_at = time.monotonic()
            self._pins: dict[tuple[int, ...], list[WriterPin]] = {}  # unreleased handles, by _request of their tokens
            self._entries: dict[str, int] = {}  # owner name -> owner-table entry, as this Writer named them
            #: States dropped by the repair when this Writer took the segment over.
            if fresh:  # just created: nothing to repair, and no rebuild kernel to compile
                init_empty(self._A)
                self.recovered = 0
            else:
                self.recovered = int(self._run(rebuild, self._A))
            owners.repair(mapping.data, self._A.geom)
            for entry in range(MAX_OWNERS):
                self._owner_word(entry)[O_ATTACHED] = 0  # whatever was attached was the previous writer's
        except BaseException:
            self._A = None
            self._let_go()
            raise

    # --- acquiring the segment ---------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        capacity: int,
        block_size: int = 16,
        *,
        seed: int | None = None,
        mode: int = 0o600,
        on_evict: EvictCallback | None = None,
        reader_pins: int | None = None,
    ) -> "Writer":
        """Create segment ``name`` holding up to ``capacity`` blocks, and hold it.

        ``seed`` keys the hash chain (default: a random 128-bit secret, so
        prompts from outside cannot be crafted to collide; readers use the
        segment's seed automatically). ``mode`` is the object's permission
        bits. ``reader_pins`` is how many blocks each reader process may
        hold pinned at once (default ``min(4096, capacity)``; 1 KiB of
        segment per 1,024 across the 256 reader slots). Raises
        SegmentExistsError if the name is taken (WriterBusyError if by a live
        writer), SegmentSpaceError if ``/dev/shm`` is too small.
        """
        segment.validate_name(name)
        check_geometry_args(capacity, block_size, 1 if reader_pins is None else reader_pins)
        mode = segment.check_mode(mode)
        seed = secrets.randbits(128) if seed is None else check_seed(seed)
        geometry = Geometry.for_capacity(int(capacity), int(block_size), None if reader_pins is None else int(reader_pins))
        try:  # the gate, taken (0) until the header is published: attachers wait on it
            gate = posix_ipc.Semaphore(segment.sem_path(name), posix_ipc.O_CREX, mode=mode, initial_value=0)
        except posix_ipc.ExistentialError:
            cls._refuse_taken(name)
        try:
            mapping = segment.create(name, geometry, mode, (seed & (2**64 - 1), seed >> 64), {H_WRITER_EPOCH: 0})
        except BaseException:
            gate.unlink()
            gate.close()
            raise
        claim = _stamp_claim(mapping.data, 1)
        gate.release()
        gate.close()
        try:
            return cls(mapping, claim, on_evict, fresh=True)
        except BaseException:
            segment.unlink(name, only=mapping.fd)  # a create that failed leaves nothing
            raise

    @staticmethod
    def _refuse_taken(name: str) -> None:
        if not segment.exists(name):
            raise SegmentExistsError(
                f"the writer semaphore of segment {name!r} exists without its segment (left by a create that "
                f"crashed, or made by someone else): it is never adopted; check, then shmcache.unlink({name!r})"
            )
        try:
            m = segment.attach(name, writable=False)
        except Exception:
            m = None
        if m is not None:
            try:
                if liveness.is_held(m.fd, LOCK_WRITER):
                    raise WriterBusyError(f"segment {name!r} is held by a live writer, {_holder(m.data)}",
                                          int(m.data[H_WRITER_PID]))
            finally:
                m.close()
        raise SegmentExistsError(
            f"segment {name!r} already exists: Writer.open({name!r}) takes it over, "
            f"or shmcache.unlink({name!r}) removes it"
        )

    @classmethod
    def open(
        cls, name: str, *, on_evict: EvictCallback | None = None, _crash_at_step: int = 0, _stop_at_claim_step: int = 0
    ) -> "Writer":
        """Take over the existing segment ``name`` and repair it.

        Succeeds at once if no live process holds it: its writer closed, or
        died (SIGKILL included), in any PID namespace. The half-written
        states a dead writer left are dropped with their descendants, every
        writer pin is dropped (whoever held them went with that writer),
        and the index is rebuilt (``recovered`` says how many states were
        dropped). Raises WriterBusyError naming a live holder,
        SegmentNotReadyError while the segment is still being created.
        (Test hooks: ``_crash_at_step`` is the crash hook, applied to the
        repair; ``_stop_at_claim_step`` stops this process with SIGSTOP at
        that step of the claim, 1 to ``CLAIM_STEPS``.)
        """
        mapping = segment.attach(name, writable=True)
        try:
            claim = cls._claim(name, mapping, _stop_at_claim_step)
        except BaseException:
            liveness.unlock(mapping.fd, LOCK_WRITER)  # if the claim got that far
            mapping.close()
            raise
        return cls(mapping, claim, on_evict, _crash_at_step)

    @staticmethod
    def _claim(name: str, mapping: segment.Mapping, stop_at: int) -> int:
        """Take the writer lock of ``mapping`` through the gate; returns the
        new claim id. Raises WriterBusyError if a live process holds it."""
        def step(k: int) -> None:
            if k == stop_at:
                os.kill(os.getpid(), signal.SIGSTOP)

        data = mapping.data
        if data[H_RETIRED]:
            raise SegmentRetiredError(
                f"segment {name!r} is marked removed, but is still there (whoever removed it died before "
                f"unlinking it): shmcache.unlink({name!r}), then create it again"
            )
        step(1)
        gate = _Gate(name)
        won = False
        try:
            gate.enter()
            step(2)
            if not liveness.try_lock(mapping.fd, LOCK_WRITER):
                raise WriterBusyError(
                    f"segment {name!r} is held by a live writer, {_holder(data)}: stop it first "
                    "(a segment has exactly one writer)",
                    int(data[H_WRITER_PID]),
                )
            won = True
            step(3)
            claim = _stamp_claim(data, int(data[H_WRITER_EPOCH]) + 1)
            step(4)
        finally:
            gate.leave(won)
        step(CLAIM_STEPS)
        return claim

    # --- running kernels -------------------------------------------------------------

    def _run(self, kernel, *args):
        """Run a mutation kernel, reaping dead readers first when due, and
        hand what it changed to the watcher. Every public method has called
        ``_check_open`` once before it gets here."""
        self._reap_if_due()
        result = self._kernel(kernel, *args)
        if self._sink is not None:
            self._drain()
        return result

    def _drain(self) -> None:
        meta, journal = self._A.meta, self._A.journal
        n, kept = int(meta[M_JOURNAL]), self._kept
        if n > kept:
            end = min(n, len(journal))
            keep = False
            try:
                keep = self._sink(Changes(journal[kept:end], *self._call, n > end)) is True and n == end
            finally:  # also if the sink raised: the next operation's rows must be its own
                if keep:
                    self._kept = end
                meta[M_JOURNAL] = self._kept  # the sink may have released the journal meanwhile

    def release_journal(self) -> None:
        """Let the journal rows that sinks kept be written again: call it
        once nothing uses any ``entries`` kept (``Changes``). Until then
        each operation journals after them, and one that needs more rows
        than are left comes as ``overflowed``; a sink that keeps rows
        should release them often. Nothing to do once closed."""
        if self._A is not None:
            self._A.meta[M_JOURNAL] = 0
        self._kept = 0

    def watch(self, sink: "Callable[[Changes], bool | None] | None", entries: int = JOURNAL_ENTRIES) -> None:
        """Call ``sink(changes)`` after every operation that changed which
        blocks are cached or which owners hold them (``Changes``), in this
        process, before the operation returns; ``None`` stops. Blocks
        already cached when watching starts are not reported: a sink reads
        those from the segment. The journal grows to hold any insert; a
        larger drop (a clear, a remove of a large subtree) than ``entries``
        (less the rows a sink keeps: ``release_journal``) comes as
        ``overflowed``. A sink must not raise; it returns True to keep
        ``changes.entries`` past its call. The journal costs a few
        nanoseconds per changed block while on, nothing while off."""
        self._check_open()
        if isinstance(entries, bool) or not isinstance(entries, int) or entries < 1:
            raise InvalidInputError(f"entries must be a positive int, got {entries!r}")
        self._new_journal(0 if sink is None else entries)
        self._sink = sink

    def _new_journal(self, rows: int) -> None:
        """An empty journal of ``rows`` rows (0: journaling off). Rows a
        sink kept stay valid: they are views of the previous one."""
        self._A = self._A._replace(journal=np.zeros((rows, JOURNAL_WORDS), dtype=np.int64))
        self._kept = 0
        self._A.meta[M_JOURNAL] = 0

    def _reap_if_due(self) -> None:
        if time.monotonic() - self._reaped_at >= self.reap_interval:
            self.reap_readers()

    @staticmethod
    def _kernel(kernel, *args):
        """Call a mutation kernel; the crash test hook ends the process here."""
        try:
            return kernel(*args)
        except WriterCrashed:
            os.kill(os.getpid(), signal.SIGKILL)
            raise

    def _crash_at_step(self, step: int) -> None:
        """Test hook: the ``step``-th numbered step of the coming mutations
        SIGKILLs this process, with nothing after that step written."""
        self._A.meta[M_CRASH] = step

    def _keys(self, tokens: object, namespace: Namespace) -> tuple[np.ndarray, np.ndarray]:
        self._check_open()
        toks = as_tokens(tokens)
        return toks, self._chain.keys(toks, namespace)

    def _check_open(self) -> None:
        """Raise unless this Writer is open and still the segment's writer."""
        if self._A is None:
            raise ClosedError(f"Writer for {self.name!r} is closed: open it again with Writer.open")
        data = self._map.data
        if data[H_WRITER_CLAIM] != self._claim_id:
            raise WriterLostError(
                f"this Writer no longer holds segment {self.name!r}: it was claimed by {_holder(data)} "
                "(this Writer's lock was lost); it writes nothing more: close it"
            )
        if data[H_RETIRED]:
            raise SegmentRetiredError(
                f"segment {self.name!r} was removed (unlinked) under this Writer: close it, "
                "then create the segment again"
            )

    # --- operations ----------------------------------------------------------------------

    def insert(self, tokens: object, values: object, namespace: Namespace = None, *, client: int = 0,
               owner: str | None = None) -> int:
        """Cache every full block of ``tokens``, block ``i`` holding ``values[i]``;
        with ``owner``, that named owner holds every one of them.

        Returns how many leading tokens were already cached (those blocks
        keep their old values; ``values`` for them are ignored). Evicts LRU
        unpinned leaves when full and passes their values to ``on_evict``.
        Raises InvalidInputError (bad tokens, values or owner name, or a new
        block's value already cached for this client: ``remove`` needs
        values unique), CacheFullError (not enough unpinned room) or
        OwnerLimitError; nothing changes then.
        """
        toks, keys = self._keys(tokens, namespace)
        n = keys.shape[0]
        vals = as_values(values, n, toks.shape[0], self.block_size)
        check_client(client)
        held = self._owner_bit(owner)
        _, cached = self._insert(-1, 0, keys, vals, client, held, _NO_REFS, toks, namespace)
        return cached * self.block_size

    def _insert(self, start: int, start_gen: int, keys: np.ndarray, vals: np.ndarray, client: int, held: np.uint64,
                refs: np.ndarray, tokens: np.ndarray, namespace: Namespace) -> tuple[int, int]:
        """Run the insert kernel (once more after reaping dead readers if it
        found no room) and raise its errors; returns ``(status, cached
        blocks)``, status OK or ERR_STALE. ``tokens`` and ``namespace``
        (those ``keys`` were chained from) go to the watcher."""
        n = keys.shape[0]
        if self._sink is not None and 3 * n > len(self._A.journal) - self._kept:
            # An insert journals at most n stores, n evictions and n owner
            # gains: never an overflow, whose resync could not know the tokens.
            self._new_journal(max(3 * n, len(self._A.journal)))
        args = (self._A, start, start_gen, keys, vals, n, client, held, refs)
        self._call = (tokens, namespace)
        try:
            status, info, cached, evicted = self._run(mutate.insert_kernel, *args)
            if status == mutate.ERR_FULL and self.reap_readers():
                status, info, cached, evicted = self._run(mutate.insert_kernel, *args)
        finally:
            self._call = (None, None)
        if status == mutate.ERR_DUP_VALUE:
            raise InvalidInputError(
                f"value {int(vals[info])} of block {info} is already cached for another block: "
                "values must be unique per client (remove the old block first)"
            )
        if status == mutate.ERR_DUP_IN_CALL:
            raise InvalidInputError(f"value {int(vals[info])} appears twice in this insert: give each block its own value")
        if status == mutate.ERR_FULL:
            raise CacheFullError(
                f"insert needs {n - cached} free blocks but only {info} can be made free (capacity "
                f"{self.capacity}, the rest is pinned or on this prompt's path): unpin blocks or create a larger segment"
            )
        self._notify(evicted)
        if status == mutate.ERR_PARTIAL:
            raise CacheFullError(
                f"readers pinned blocks while this insert evicted: only its first {info} new blocks "
                f"(blocks {cached}..{cached + info - 1}) were cached, the other {n - cached - info} were not "
                "(free their KV, or insert again)",
                int(info),
                int(cached) * self.block_size,
            )
        return status, int(cached)

    def _notify(self, dropped: np.ndarray) -> None:
        """Hand ``(value, client)`` rows the cache dropped by itself to the callbacks."""
        if len(dropped):
            if self.on_evict is not None:
                self.on_evict(dropped[:, 0].copy())
            if self.on_evict_clients is not None:
                self.on_evict_clients(dropped[:, 0].copy(), dropped[:, 1].copy())

    def extend(self, below: "np.ndarray | None", tokens: object, values: object, *, owner: str,
               namespace: Namespace = None, client: int = 0) -> "np.ndarray | None":
        """Cache the full blocks of ``tokens`` as the continuation of an
        already cached block, all held by ``owner``: the insert of a feed
        that names blocks by their predecessor, as engines' KV events do.

        ``below`` is the ``(state, drop count)`` row this method (or an
        earlier ``extend`` from the root) returned for the preceding block,
        or None for blocks at the start of a prompt (chained from
        ``namespace``). Returns one such row per block of ``tokens`` (an
        ``(n, 2)`` int64 array), or None when ``below`` is no longer a block
        ``owner`` holds (dropped, or released by it since): its successors
        cannot be keyed then. Errors as ``insert``; a CacheFullError whose
        ``inserted_blocks`` is not 0 carries the rows of the blocks that were
        cached in ``rows``.
        """
        self._check_open()
        toks = as_tokens(tokens)
        root = None
        if below is not None:
            state, gen = int(below[0]), int(below[1])
            if not 0 <= state < self.capacity:
                raise InvalidInputError(f"below must be a row returned by extend, got {below!r}")
            data, at = self._A.data, int(self._A.geom[G_STATES]) + state * RECORD_WORDS
            root = (data[at + R_KEY_LO], data[at + R_KEY_HI])
        else:
            state, gen = -1, 0
        keys = self._chain.keys(toks, namespace, root)
        vals = as_values(values, keys.shape[0], toks.shape[0], self.block_size)
        check_client(client)
        refs = np.empty((keys.shape[0], 2), dtype=np.int64)
        try:
            status, _ = self._insert(state, gen, keys, vals, client, self._owner_bit(owner), refs, toks, namespace)
        except CacheFullError as e:
            if e.inserted_blocks:
                e.rows = refs[: e.cached_tokens // self.block_size + e.inserted_blocks]
            raise
        return None if status == mutate.ERR_STALE else refs

    def holds(self, row: "np.ndarray | tuple[int, int]", owner: str) -> bool:
        """Whether ``owner`` still holds the block of an ``extend`` row (it was
        neither dropped nor let go of since)."""
        self._check_open()
        entry = self._owner_entry(owner, create=False)
        state, gen = int(row[0]), int(row[1])
        if entry < 0 or not 0 <= state < self.capacity or int(self._A.gen[state]) != gen:
            return False
        word = self._A.data[int(self._A.geom[G_STATES]) + state * RECORD_WORDS + R_OWNERS]
        return bool((int(word) >> entry) & 1)

    def block_id(self, row: "np.ndarray | tuple[int, int]") -> tuple[int, int]:
        """``(state, low 64 bits of its key)`` of an ``extend`` row: names the
        block for another Writer of the segment (drop counts are this one's)."""
        state = int(row[0])
        return state, int(self._A.data[int(self._A.geom[G_STATES]) + state * RECORD_WORDS + R_KEY_LO])

    def find_block(self, block_id: tuple[int, int], owner: str) -> "np.ndarray | None":
        """The ``extend`` row of a ``block_id``, if that block is still there
        and ``owner`` holds it; else None."""
        self._check_open()
        state, key_lo = int(block_id[0]), int(block_id[1])
        if not 0 <= state < self.capacity:
            return None
        row = np.array([state, int(self._A.gen[state])], dtype=np.int64)
        return row if self.block_id(row)[1] == key_lo and self.holds(row, owner) else None

    def release(self, tokens: object, owner: str, namespace: Namespace = None) -> int:
        """``owner`` stops holding the last full block of ``tokens`` and every
        block after it (they are no prefix it holds any more); it keeps the
        blocks before. Blocks no other owner holds leave the cache (their
        values go to ``on_evict``). Returns how many blocks ``owner`` let go
        of (0 if it did not hold that block)."""
        _, keys = self._keys(tokens, namespace)
        entry = self._owner_entry(owner, create=False)
        if entry < 0 or not len(keys):
            return 0
        refs = self._run(path_kernel, self._A, keys)
        if len(refs) < len(keys):
            return 0
        return self.release_refs(refs[-1:], owner)

    def release_refs(self, refs: np.ndarray, owner: str) -> int:
        """``release`` of the blocks named by ``(state, drop count)`` rows from
        ``extend``: rows whose block was dropped since are skipped."""
        self._check_open()
        entry = self._owner_entry(owner, create=False)
        if entry < 0:
            return 0
        refs = np.ascontiguousarray(refs, dtype=np.int64).reshape(-1, 2)
        dropped, released = self._run(release_kernel, self._A, refs, entry)
        self._notify(dropped)
        return int(released)

    def clear_owner(self, owner: str) -> int:
        """``owner`` lets go of every block it holds (its engine restarted or
        cleared its cache; its client left). Returns how many."""
        self._check_open()
        entry = self._owner_entry(owner, create=False)
        if entry < 0:
            return 0
        everything = np.array([[self.capacity, 0]], dtype=np.int64)
        dropped, released = self._run(release_kernel, self._A, everything, entry)
        self._notify(dropped)
        return int(released)

    def owners(self) -> dict[str, int]:
        """Every named owner with the number of blocks it holds."""
        self._check_open()
        return owners.held(owners.snapshot(self._A.data, self._A.geom))

    def owner_info(self) -> dict[str, dict]:
        """Per named owner: blocks, kind, attached and, for KV-event sources,
        their counters (``shmcache.owners.describe``)."""
        self._check_open()
        return owners.describe(owners.snapshot(self._A.data, self._A.geom))

    def attach_owner(self, owner: str, kind: int = OWNER_CLIENT) -> None:
        """Count one more connected source of ``owner`` (a client or an event
        publisher), naming it if new: an attached owner's entry is never
        given to another name, even while it holds no block."""
        self._check_open()
        entry = self._owner_entry(owner, kind=kind)
        self._owner_word(entry)[O_ATTACHED] += 1

    def detach_owner(self, owner: str) -> int:
        """Count one source of ``owner`` less; returns how many remain."""
        self._check_open()
        entry = self._owner_entry(owner, create=False)
        if entry < 0:
            return 0
        words = self._owner_word(entry)
        words[O_ATTACHED] = max(int(words[O_ATTACHED]) - 1, 0)
        return int(words[O_ATTACHED])

    def _owner_bit(self, owner: str | None) -> np.uint64:
        return np.uint64(0) if owner is None else np.uint64(1) << np.uint64(self._owner_entry(owner))

    def _owner_entry(self, owner: str, create: bool = True, kind: int = OWNER_CLIENT) -> int:
        """The owner-table entry of ``owner``; named now if it has none and
        ``create`` (else -1)."""
        entry = self._entries.get(owner)
        if entry is not None:
            return entry
        table = owners.snapshot(self._A.data, self._A.geom)
        entry = table.find(owners.check_owner_name(owner))
        if entry < 0 and not create:
            return -1
        if entry < 0:
            entry = owners.claim(self._A.data, self._A.geom, owner, kind)  # checks the name
            renamed = table.name(entry)
            if renamed is not None:
                self._entries.pop(renamed, None)
        self._entries[owner] = entry
        return entry

    def _owner_word(self, entry: int) -> np.ndarray:
        """The words of owner-table entry ``entry``, writable (this process is the writer)."""
        return owners.entry_words(self._A.data, self._A.geom, entry)

    def match_prefix(self, tokens: object, namespace: Namespace = None) -> PrefixMatch:
        """The longest cached prefix of ``tokens``; counts as a use for LRU."""
        _, keys = self._keys(tokens, namespace)
        values = self._run(mutate.match_kernel, self._A, keys, keys.shape[0])
        return PrefixMatch(len(values) * self.block_size, values if len(values) else NO_VALUES)

    @staticmethod
    def _dropped(rows: np.ndarray, with_clients: bool):
        values = rows[:, 0].copy()
        return (values, rows[:, 1].copy()) if with_clients else values

    def remove(self, values: object, *, client: int = 0, with_clients: bool = False):
        """Drop the blocks holding ``values`` (inserted by ``client``) and their
        subtrees, pinned or not.

        Values not cached are ignored. Returns every removed value, children
        before parents; with ``with_clients=True``, ``(values, clients)``: a
        subtree may hold blocks other clients inserted.
        """
        self._check_open()
        check_client(client)
        return self._dropped(self._run(mutate.remove_kernel, self._A, as_int64_array(values, "values"), client), with_clients)

    def remove_client(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        """Drop every block ``client`` inserted, with their subtrees (its KV is
        gone). Returns ``(values, clients)`` of everything removed."""
        self._check_open()
        return self._dropped(self._run(mutate.remove_client_kernel, self._A, client), True)

    def evict(self, n_blocks: int, *, with_clients: bool = False):
        """Evict up to ``n_blocks`` LRU unpinned leaves, cascading to parents
        that become leaves. Returns the evicted values in eviction order
        (``(values, clients)`` with ``with_clients=True``)."""
        self._check_open()
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, (int, np.integer)) or n_blocks < 0:
            raise InvalidInputError(f"n_blocks must be a non-negative int, got {n_blocks!r}")
        return self._dropped(self._run(mutate.evict_kernel, self._A, int(n_blocks)), with_clients)

    def pin(self, tokens: object, namespace: Namespace = None) -> "WriterPin":
        """Pin the cached blocks of ``tokens`` (and so their ancestors) against
        eviction until ``unpin``; returns the handle (``length``: tokens
        pinned). Pins nest: each block counts the pins that hold it."""
        _, keys = self._keys(tokens, namespace)
        n = keys.shape[0]
        states, gens = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.uint64)
        k = int(self._run(mutate.pin_kernel, self._A, keys, n, states, gens))
        handle = WriterPin(k * self.block_size, states[:k].copy(), gens[:k].copy(), self, _request(keys))
        self._pins.setdefault(handle._request, []).append(handle)
        return handle

    def unpin(self, pin: "WriterPin | object", namespace: Namespace = None) -> int:
        """Release a pin: a handle ``pin`` returned, or the latest pin of
        exactly these tokens (in ``namespace``) that this Writer holds.

        Returns the tokens released: the pin's blocks still cached. Blocks
        removed since (and perhaps inserted again) went with their pins and
        are left alone, so a pin is released exactly once, whatever happened
        in between. Raises InvalidInputError, changing nothing, for a handle
        of another Writer or one already released, or tokens with no pin.
        """
        self._check_open()
        if isinstance(pin, WriterPin):
            if pin._writer is not self:
                raise InvalidInputError("this pin handle belongs to another Writer (every pin goes with the Writer that "
                                        "made it): unpin handles of this Writer only")
            if pin._states is None:
                raise InvalidInputError("this pin handle was already released: unpin each handle once")
            handle = pin
        elif isinstance(pin, PinnedMatch):
            raise InvalidInputError("this is a Reader's match_and_pin handle: release it with that Reader's unpin")
        else:
            handle = self.find_pin(pin, namespace)
            if handle is None:
                raise InvalidInputError("these tokens are not pinned by this Writer: unpin only what you pinned "
                                        "(with the same tokens and namespace, or the handle pin returned)")
        self._reap_if_due()  # whatever can fail, before the handle is marked released
        states, handle._states = handle._states, None  # released before the kernel: never twice
        held = self._pins[handle._request]
        held.remove(handle)
        if not held:
            del self._pins[handle._request]
        return int(self._kernel(mutate.unpin_kernel, self._A, states, handle._gens)) * self.block_size

    def find_pin(self, tokens: object, namespace: Namespace = None, among: "list[WriterPin] | None" = None) -> "WriterPin | None":
        """The latest unreleased pin of exactly these tokens (in
        ``namespace``), among ``among`` (default: every pin of this Writer),
        or None. The daemon uses it to find a client's own pins."""
        _, keys = self._keys(tokens, namespace)
        request = _request(keys)
        if among is None:
            held = self._pins.get(request)
            return held[-1] if held else None
        return next((h for h in reversed(among) if h._request == request and h._states is not None), None)

    def clear(self, *, with_clients: bool = False):
        """Drop every block; returns their values, children before parents
        (``(values, clients)`` with ``with_clients=True``)."""
        self._check_open()
        return self._dropped(self._run(mutate.clear_kernel, self._A), with_clients)

    def block_keys(self, tokens: object, namespace: Namespace = None) -> np.ndarray:
        """Chained keys of ``tokens`` under this segment's block size and seed."""
        return self._keys(tokens, namespace)[1]

    def reap_readers(self) -> int:
        """Reclaim the reader-table slots, and so the pins, of reader
        processes that died; returns how many slots were reclaimed.

        A slot in use whose lock no live process holds lost its reader
        (``shmcache.liveness``): the writer takes that lock itself, so no
        reader claims the slot meanwhile, clears the pins, frees the slot
        and lets go. Live readers, in any PID namespace, are never touched,
        and no grace period is needed.
        """
        self._check_open()
        self._reaped_at = time.monotonic()
        A, fd = self._A, self._map.fd
        records = A.wdata[READERS_WORD : READERS_WORD + self.geometry.reader_slots * READER_WORDS].reshape(-1, READER_WORDS)
        reaped = 0
        for slot in np.flatnonzero(records[:, RD_PID] | records[:, RD_PINNED]).tolist():
            if not liveness.try_lock(fd, reader_lock_byte(slot)):
                continue  # a live reader holds it
            try:
                if records[slot, RD_PID] | records[slot, RD_PINNED]:  # not left cleanly meanwhile
                    clear_slot(A.wdata, A.pins, A.geom, slot)
                    publish_word(A.wdata, reader_word(slot, RD_PID), np.uint64(0))
                    reaped += 1
            finally:
                liveness.unlock(fd, reader_lock_byte(slot))
        if reaped:
            mutate.sync_kernel(A)
        return reaped

    # --- inspection -----------------------------------------------------------------------

    def stats(self) -> dict:
        """Segment-wide figures (occupancy, counters, writer identity), and
        ``reader_pinned_blocks``: blocks that reader pins keep cached."""
        self._check_open()
        out = header_stats(self._map.data, self.geometry, writer_alive=True)
        out["reader_pinned_blocks"] = int(mutate.sync_kernel(self._A))
        return out

    def check(self) -> None:
        """Verify every structural invariant of the segment and of this
        writer's private structures. Raises SegmentCorruptError listing each
        violation (IncompatibleSegmentError if the object was resized)."""
        self._check_open()
        if self._map.resized():
            raise segment.resized_error(self.name)
        rows = np.concatenate([check_segment(self._A.data, self._A.geom), check_private(self._A)])
        if len(rows):
            raise SegmentCorruptError(f"segment {self.name!r} fails its invariant check", describe_violations(rows))

    # --- lifetime ----------------------------------------------------------------------------

    def close(self, unlink: bool = False) -> None:
        """Release the segment; with ``unlink=True`` also remove it (and its
        semaphore) from the system, if this Writer still holds it (a Writer
        that lost its claim, or one inherited by a forked child, removes
        nothing). Attached readers keep their mapping until they close.
        Idempotent. Every pin this Writer holds goes with it: the next
        writer starts with none. A Writer garbage-collected open releases
        the segment the same way (without removing it)."""
        if self._A is None:
            return
        self._A = None
        self._pins.clear()
        data = self._map.data
        try:
            if unlink and os.getpid() == self._pid and data[H_WRITER_CLAIM] == self._claim_id and not data[H_RETIRED]:
                segment.unlink(self.name, only=self._map.fd)
        finally:
            self._let_go()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._A is None else f"capacity={self.capacity} block_size={self.block_size}"
        return f"<shmcache.Writer {self.name!r} {state}>"


def _let_go(mapping: segment.Mapping, claim: np.uint64, pid: int) -> None:
    """Give up the writer lock and unmap: ``Writer.close``, and the finalizer
    of a Writer collected open. A process forked from the holder shares its
    lock (``shmcache.liveness``) and only unmaps: the lock stays with the
    process that claimed it."""
    try:
        if os.getpid() == pid:
            data = mapping.data
            if data[H_WRITER_CLAIM] == claim:
                data[H_WRITER_PID] = data[H_WRITER_PIDNS] = 0
            liveness.unlock(mapping.fd, LOCK_WRITER)
    finally:
        mapping.close()

