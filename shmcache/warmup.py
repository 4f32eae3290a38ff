"""Loading kernels before they are needed: what the daemon does before it
accepts clients, and what ``shmcache compile`` does for a container image.

Numba compiles a kernel the first time a process calls it with new argument
types, then keeps it in its on-disk cache (``NUMBA_CACHE_DIR``, by default
``__pycache__`` beside the package) for every later process. Each function
here calls kernels on a throwaway segment, so that they are compiled (on a
fresh machine) or loaded (otherwise) now:

* ``warm_writer(block_size, events)``: the writer kernels a daemon's
  requests use (and its KV events', if it has sources). The daemon calls
  it before it reports ready, so no common request waits on the compiler;
  ``warm_upkeep`` loads the rest, which a daemon compiles when first asked.
* ``warm_owners(block_size)``: the kernels of owners letting go, alone.
* ``warm_reader(block_size)``: the matchers for every token form a caller
  usually passes, ``match_owners``, pinning, the checks and the dump.
* ``warm_publish()``: the KV-event encoders of ``serve --publish-events``,
  which the daemon loads before it reports ready when it publishes.
* ``compile_all(block_sizes)``: all of these, and the KV-event parser; the
  body of ``shmcache compile``.

Kernels depend on the block size only through the key chain: 16-token
blocks use ``hashing.chain16``, every other size ``hashing.chain_any``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np

from . import jitcache, segment


@contextmanager
def throwaway_writer(block_size: int, capacity: int = 16) -> Iterator:
    """A Writer of a new segment, unlinked on leaving, whatever happens."""
    from .writer import Writer

    name = f"warmup-{os.getpid()}-{block_size}-{secrets.token_hex(4)}"
    try:
        with Writer.create(name, capacity=capacity, block_size=block_size) as w:
            yield w
    finally:
        segment.unlink(name)


def warm_writer(block_size: int = 16, events: bool = False, helper: bool = False) -> None:
    """Load or compile the writer kernels a daemon's requests use, for
    segments of ``block_size``: insert (int64 and uint32 tokens), remove,
    a client's departure, reaping dead readers; with ``events``, also what
    KV events and owners use (``extend``, ``release``, ``clear_owner``).
    The rest (``warm_upkeep``) compiles when first asked for, a few seconds
    each: requests that are rare, a takeover's rebuild (which a daemon that
    takes over compiles before it is ready anyway), and ``check``.

    With ``helper``, when the insert's kernels are not in the cache yet
    and there is more than one CPU to run on, a child process compiles all
    but the insert's kernels (``warm_removals``) while this one compiles
    the insert's, the longest; this process then loads the child's from
    the cache. A daemon gets ready in about the time of the insert's
    kernels alone."""
    toks = np.arange(4 * block_size, dtype=np.int64)
    cold = helper and not jitcache.is_cached("mutate", "insert_kernel")
    child = _in_child("warm_removals", block_size, events) if cold else None
    with throwaway_writer(block_size, capacity=4) as w:
        for t in (toks, toks.astype(np.uint32)):
            w.insert(t, [1, 2, 3, 4], client=1, owner="warm-up")
            w.insert(t[:block_size], [1], client=2)  # a full segment: evicts
        if child is not None:
            child.wait()  # what it compiled is in the cache now, whether it ended well or not
        _removals(w, toks, block_size, events)


def warm_removals(block_size: int = 16, events: bool = False) -> None:
    """The kernels ``warm_writer`` loads but the insert's, on a segment of
    their own: what its helper process compiles."""
    with throwaway_writer(block_size, capacity=4) as w:
        _removals(w, np.arange(4 * block_size, dtype=np.int64), block_size, events)


def _removals(w, toks: np.ndarray, block_size: int, events: bool) -> None:
    """Remove what ``warm_writer`` inserted (client 1, then 2), with the KV
    events' kernels between if ``events``, and reap a dead reader."""
    from .layout import RD_PID, reader_word

    w.remove([1], client=1)
    w.remove_client(1)
    if events:
        rows = w.extend(None, toks, [5, 6, 7, 8], owner="warm-up")
        w.extend(rows[1], toks[2 * block_size :], [9, 10], owner="warm-up")
        w.release(toks, "warm-up")
        w.clear_owner("warm-up")
    w.remove_client(2)
    w._map.wdata[reader_word(0, RD_PID)] = 1  # as a reader that died leaves its slot: reaped
    assert w.reap_readers() == 1
    w.stats()


def _in_child(function: str, *args: object) -> "subprocess.Popen | None":
    """``function(*args)`` of this module run in a child process, whose
    kernels land in the same cache (it inherits ``NUMBA_CACHE_DIR``); None
    when this process may run on one CPU only, where it would only take
    turns with its parent."""
    if len(os.sched_getaffinity(0)) < 2:
        return None
    from .cli import python_command

    return subprocess.Popen(python_command(f"from shmcache import warmup; warmup.{function}(*{args!r})"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def warm_owners(block_size: int = 16) -> None:
    """Load or compile the kernels of owners letting go (``release``,
    ``clear_owner``) without an insert: a process can compile them while
    another compiles the insert kernel (the demo, while its daemon starts)."""
    toks = np.arange(4 * block_size, dtype=np.int64)
    with throwaway_writer(block_size) as w:
        w.attach_owner("warm-up")
        w.release(toks, "warm-up")  # nothing cached: the path kernel finds no block
        w.clear_owner("warm-up")


def warm_upkeep(block_size: int = 16) -> None:
    """Load or compile the writer's other kernels: its own ``match_prefix``,
    writer pins, ``evict``, ``clear``, ``check`` and the rebuild of a
    takeover (``Writer.open``)."""
    from .writer import Writer

    toks = np.arange(4 * block_size, dtype=np.int64)
    with throwaway_writer(block_size) as w:
        w.insert(toks, [1, 2, 3, 4], owner="warm-up")
        w.match_prefix(toks)
        w.unpin(w.pin(toks))
        w.pin(toks)
        w.unpin(toks)
        w.evict(1)
        w.check()
        w.clear()
        w.close()
        Writer.open(w.name).close()


def warm_reader(block_size: int = 16) -> None:
    """Load or compile the reader's kernels for segments of ``block_size``:
    ``match_prefix`` and ``match_owners`` of int64, int32 and uint32 arrays
    and of lists, ``match_and_pin``, ``match_keys``, ``check`` and the dump.
    The segment stays empty (every match misses: the kernels are the same),
    so no writer kernel is compiled here."""
    from .dump import describe
    from .reader import Reader

    toks = np.arange(4 * block_size, dtype=np.int64)
    with throwaway_writer(block_size) as w, Reader.attach(w.name) as r:
        for t in (toks, toks.astype(np.int32), toks.astype(np.uint32), toks.tolist()):
            r.match_prefix(t)
            r.match_owners(t)
        r.unpin(r.match_and_pin(toks))
        r.match_keys(r.block_keys(toks))
        r.check()
        describe(r, depth=1, width=1, check=True)


def warm_events() -> bool:
    """Load or compile the KV-event token parser; False when the ``events``
    extra (msgspec) is not installed, so there is nothing to parse with."""
    try:
        import msgspec
    except ImportError:
        return False
    from .wire_tokens import parse_tokens

    raw = np.frombuffer(msgspec.msgpack.encode(list(range(20))), dtype=np.uint8)
    assert parse_tokens(raw, np.empty(len(raw), dtype=np.int64)) == 20
    return True


def warm_publish(block_size: int = 16) -> bool:
    """Load or compile the KV-event encoders (``shmcache.evwire``) of a
    publishing daemon, for the node's stream and per-owner streams; False
    when the ``events`` extra (pyzmq, msgspec) is not installed. The
    encoders do not depend on the block size, but the writer kernels the
    warm-up calls do: given the daemon's, they are those ``warm_writer``
    loaded (another block size would compile a second key chain's)."""
    try:
        from .publish import Publisher
    except ImportError:
        return False

    toks = np.arange(4 * block_size, dtype=np.int64)
    with throwaway_writer(block_size) as w:
        for per_owner in (False, True):
            pub = Publisher(w, f"inproc://shmcache-warmup-{secrets.token_hex(4)}", per_owner=per_owner)
            try:
                w.insert(toks, [1, 2, 3, 4], owner="a")
                w.insert(toks[: 2 * block_size], [1, 2], owner="b")  # b gains blocks a stored
                w.remove([1, 2, 3, 4])  # with warm_writer's kernels only: a clear would compile its own
                pub.flush()
            finally:
                pub.close()
    return True


def compile_all(block_sizes: Iterable[int] = (16,), progress: Callable[[str, float], None] | None = None) -> float:
    """Load or compile every kernel a process may use with segments of
    ``block_sizes``; returns the seconds it took. ``progress(step, seconds)``
    is called after each step."""
    steps: list[tuple[str, Callable[[], object]]] = []
    for bs in block_sizes:
        steps += [(f"writer kernels, block size {bs}", lambda bs=bs: warm_writer(bs, events=True)),
                  (f"writer takeover and checks, block size {bs}", lambda bs=bs: warm_upkeep(bs)),
                  (f"reader kernels, block size {bs}", lambda bs=bs: warm_reader(bs))]
    steps += [("KV-event parser", warm_events)]
    steps += [(f"KV-event publisher, block size {bs}", lambda bs=bs: warm_publish(bs)) for bs in block_sizes]
    start = time.perf_counter()
    for label, step in steps:
        t = time.perf_counter()
        done = step()
        if progress is not None:
            progress(label if done is not False else f"{label}: skipped, the events extra is not installed",
                     time.perf_counter() - t)
    return time.perf_counter() - start

