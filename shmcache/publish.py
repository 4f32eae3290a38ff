"""KV events out: a segment's content published as vLLM publishes its KV
cache, so a cluster router (Dynamo's KV router, llm-d's indexer) sees a
shmcache node as one more engine.

What is published is what the segment gains and loses, from the Writer's
journal (``Writer.watch``): blocks inserted by clients or stored by
engines' events are ``BlockStored``; blocks removed, evicted by capacity,
dropped with a client or released by their last owner are
``BlockRemoved``; an operation too large for the journal (a clear of a
large segment) is ``AllBlocksCleared`` followed by the content as it is.

The wire format is vLLM 0.33's (``vllm/distributed/kv_events.py``):

* a ZMQ PUB socket, one message per batch of three frames: the topic, the
  sequence number as 8 bytes big-endian (0 for the first batch of a
  publisher, +1 per batch), and a msgpack payload ``[ts, events, rank]``
  (``rank`` is nil);
* events are maps tagged by ``"type"`` (``array_format``: positional arrays
  ``[tag, field, ...]`` in declaration order, for consumers that still
  decode vLLM <= 0.23);
* ``BlockStored`` carries ``block_hashes`` (the low 64 bits of each block's
  shmcache key, unsigned), ``parent_block_hash`` (nil for a first block),
  ``token_ids`` (always: routers key blocks from the tokens), ``block_size``,
  ``lora_name`` (the namespace when it is a string; ``lora_id`` when an
  int), ``medium: "GPU"``, ``group_idx: 0`` and ``kv_cache_spec_kind:
  "full_attention"``. Events are encoded by ``shmcache.evwire``, byte for
  byte as msgspec encodes vLLM's structs except that every token id is a
  msgpack uint32 (5 bytes), which every decoder reads the same.
* a ROUTER replay socket: ``[b"", start_seq (8 bytes)]`` from a DEALER is
  answered with ``[b"", topic, seq, payload]`` for every buffered batch
  from ``start_seq`` on, then ``[b"", b"", -1 (8 bytes, signed), b""]``.
  The buffer keeps the last ``buffer`` batches of each stream that fit in
  ``buffer_bytes`` (for all streams). When ``start_seq`` is older than the
  oldest buffered batch (a consumer
  that joins late asks from 0), the answer is a snapshot instead: batches
  whose first event is ``AllBlocksCleared`` followed by ``BlockStored``
  events of every block the stream holds (parents first), each carrying the
  sequence number of the latest published batch, which they stand for. A
  third frame ``topic`` asks for that topic's stream (``per_owner``).

Per owner (``per_owner``): one stream per named owner instead of the
node's, topic ``kv@<owner>@<model>`` (llm-d's convention), each with its
own sequence numbers and buffer: an owner's stream stores a block when the
owner starts holding it and removes it when the owner lets go or the block
leaves the cache.

A publisher that starts on a segment that already has blocks (a daemon
taking a segment over) does not know their tokens: they are not published,
and a snapshot leaves them out (``unknown_blocks`` counts them). Sequence
numbers restart at 0 with every publisher: consumers drop their view of the
node then, as they do when an engine restarts.

Cost: the writer journals each change (``Writer.watch``, a few ns a
block). The sink keeps the operation's journal rows where they are (the
writer journals the next operations after them until ``encode`` releases
them) and a copy of its tokens; ``encode`` turns the kept operations into
events with one kernel call (``evwire.apply_ops``: a call costs more than
the events of a small operation), written straight into the batch that
``flush`` sends. With a replay socket, that batch is
gathered in the replay ring itself and kept where it lies. The daemon
encodes when no request waits, once a few operations are kept or before
it sleeps (its clients are busy with its replies then), and flushes
``interval`` after a batch's first change. The
publisher keeps each block's tokens (4 bytes a token: 64 MB for a million
16-token blocks) for snapshots, and the last batches for replay
(``buffer_bytes``); both are allocated and faulted in at start, as is the
batch buffer: on a VM a page fault costs more than encoding the page.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import time
from collections import deque

import msgspec
import numpy as np
import zmq

from .errors import InvalidInputError, ShmCacheError
from .layout import (
    G_CAPACITY,
    G_STATES,
    H_OWNERS_EPOCH,
    LINK_FREE,
    LINK_PARENT_BIAS,
    LOW32,
    R_KEY_LO,
    R_LINK,
    R_OWNERS,
    RECORD_WORDS,
)
from . import evwire
from . import owners as owner_table
from .wstate import J_DROPPED, J_OWNERS, J_STORED, faulted
from .writer import JOURNAL_ENTRIES, Changes, Writer

log = logging.getLogger("shmcache.publish")

#: Batches each stream keeps for replay unless told otherwise.
BUFFER_BATCHES = 10_000
#: Bytes of batches kept for replay, for all streams together, unless told
#: otherwise (allocated when the publisher has a replay socket).
BUFFER_BYTES = 64 << 20
#: How long a daemon gathers changes into one batch (seconds): as an engine
#: publishes once per scheduler step, a batch per interval, not per
#: operation, bounds the subscribers' wake-ups and the per-batch cost.
INTERVAL_S = 0.002
#: Events the node's stream gathers before it flushes by itself (its owner
#: should have flushed long before).
BATCH_EVENTS = 2048
#: Operations the node's stream keeps (their rows of the writer's journal,
#: a copy of their tokens) before it encodes them by itself (a daemon
#: encodes them sooner, while no request waits).
KEPT_OPS = 64
#: Bytes of room the node's stream reserves at a time for the events it
#: gathers (more when one operation needs more; at most a sixteenth of the
#: replay ring): each operation checks a bound, not the ring.
ROOM_BYTES = 1 << 18
#: Events per batch of a snapshot answer.
SNAPSHOT_EVENTS = 1024
END_SEQ = (-1).to_bytes(8, "big", signed=True)
_U32 = np.dtype(np.uint32)
_NO_TOKENS = np.zeros(0, dtype=_U32)
_HEADER_ROOM = 16  # a batch's header before its events: fixarray, float64 ts, array header (at most 15 bytes)


def _array_header(n: int) -> bytes:
    return bytes([0x90 | n]) if n < 16 else (b"\xdc" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xdd" + n.to_bytes(4, "big"))


class Pieces:
    """The constant bytes of the events, exactly as msgspec encodes vLLM
    0.33's structs (``BlockStored`` has 15 fields, ``BlockRemoved`` 5;
    tagged): as maps of the fields sent (``omit_defaults``: every required
    field, and of the defaulted ones ``group_idx`` and
    ``kv_cache_spec_kind``; msgspec writes a map16 header for a struct of
    16 possible entries), or (``array_format``) positional arrays of every
    field, defaults included, as msgspec writes ``array_like`` structs."""

    def __init__(self, array_format: bool, block_size: int) -> None:
        e = msgspec.msgpack.encode
        self.array_format = array_format
        self.block_size = block_size
        if array_format:
            self.s_head, self.s_mid, self.s_tail = b"\xdc\x00\x10" + e("BlockStored"), b"", b""
            self.r_head = _array_header(6) + e("BlockRemoved")
            self.r_rest = e("GPU") + e(0) + e(None) + e(None)  # medium, group_idx, locality, ownership
            self.cleared = _array_header(1) + e("AllBlocksCleared")
        else:
            self.s_head = b"\xde\x00\x0a" + e("type") + e("BlockStored") + e("block_hashes")
            self.s_mid, self.s_tail = e("parent_block_hash"), e("token_ids")
            self.r_head = b"\x84" + e("type") + e("BlockRemoved") + e("block_hashes")
            self.r_rest = e("medium") + e("GPU") + e("group_idx") + e(0)
            self.cleared = b"\x81" + e("type") + e("AllBlocksCleared")
        self._rest: dict[object, np.ndarray] = {}
        self.arrays = tuple(np.frombuffer(p, dtype=np.uint8) for p in (self.s_head, self.s_mid, self.s_tail))
        self.removed_arrays = tuple(np.frombuffer(p, dtype=np.uint8) for p in (self.r_head, self.r_rest))
        self._fixed = sum(len(p) for p in self.arrays) + len(self.r_head) + len(self.r_rest)
        self.size = self._fixed  # constant bytes of the longest event: grows with the longest ``rest``
        self.namespaces: list = []  # by namespace id (``ns_id``)
        self._ids: dict = {}
        self._packed = [*self.arrays, *self.removed_arrays]
        self.table = self._pack()

    def _pack(self) -> tuple[np.ndarray, np.ndarray]:
        """Every piece in one array, in ``evwire.PIECE_*`` order, and the offsets that delimit them."""
        offs = np.zeros(len(self._packed) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in self._packed], out=offs[1:])
        return np.concatenate(self._packed), offs

    def ns_id(self, namespace) -> int:
        """The id of ``namespace`` (numbered as first seen): its ``rest``
        is piece ``evwire.PIECE_REST + id`` of ``table``."""
        i = self._ids.get(namespace)
        if i is None:
            i = self._ids[namespace] = len(self.namespaces)
            self.namespaces.append(namespace)
            self._packed.append(self.rest(namespace))
            self.table = self._pack()
        return i

    def rest(self, namespace) -> np.ndarray:
        """The fields after ``token_ids`` of a block in ``namespace``: its
        name as ``lora_name`` when a string, as ``lora_id`` when an int."""
        r = self._rest.get(namespace)
        if r is None:
            e = msgspec.msgpack.encode
            lora_id = namespace if type(namespace) is int else None
            lora_name = namespace if isinstance(namespace, str) else None
            if self.array_format:
                # block_size, lora_id, medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind, then nil for
                # the sliding window, locality, ownership, session_id and lookahead_token_ids
                raw = (e(self.block_size) + e(lora_id) + e("GPU") + e(lora_name) + e(None) + e(0) + e("full_attention")
                       + e(None) * 5)
            else:
                raw = (e("block_size") + e(self.block_size) + e("lora_id") + e(lora_id) + e("medium") + e("GPU")
                       + e("lora_name") + e(lora_name) + e("group_idx") + e(0) + e("kv_cache_spec_kind")
                       + e("full_attention"))
            r = self._rest[namespace] = np.frombuffer(raw, dtype=np.uint8)
            self.size = max(self.size, self._fixed + len(raw))
        return r


def _batch_header(count: int, ts: float) -> bytes:
    """What comes before ``count`` events in vLLM's ``KVEventBatch``
    ``[ts, events, rank]``; the rank after them is nil (``b"\\xc0"``): the
    node is no data-parallel rank."""
    return b"\x93\xcb" + struct.pack(">d", ts) + _array_header(count)


def batch_payload(events: list[bytes], count: int, ts: float) -> bytes:
    """A whole batch of ``count`` encoded events."""
    return b"".join([_batch_header(count, ts), *events, b"\xc0"])


def _room(buf: np.ndarray, used: int, size: int) -> np.ndarray:
    """``buf``, or a larger copy of its first ``used`` elements, with
    ``size`` elements free after them."""
    if used + size <= len(buf):
        return buf
    grown = np.empty(max(used + size, 2 * len(buf)), dtype=buf.dtype)
    grown[:used] = buf[:used]
    return grown


class Stream:
    """One topic: its next sequence number, the batch being gathered (its
    ``events`` encoded in place after room for the batch's header, in
    memory reused from batch to batch: fresh pages cost more than the
    encoding), and where its last batches lie in the ``ReplayBuffer``.

    With ``ring`` (one stream per ring at most: the node's), the batch is
    gathered in the replay ring itself, at its head, and kept there when
    sent, instead of copied in: one copy of every byte published fewer. A
    batch too large for the ring is gathered in the stream's own buffer."""

    def __init__(self, topic: str, size: int = 1 << 16, ring: "ReplayBuffer | None" = None) -> None:
        self.topic = topic.encode()
        self.seq = 0
        self.events = 0
        self.ring = ring
        self.own = faulted(size, np.uint8)
        self.buf = self.own  # where the batch is gathered: ``own`` or the ring's ``window``
        self.pos = _HEADER_ROOM  # the end of the events gathered
        self.limit = 0  # the end of the room ``room`` last made: writing up to it needs no new room
        self.start = 0  # where in ``buf`` the last ``payload`` began
        self.kept: deque[tuple[int, int, int]] = deque()  # (seq, start, end) in the ring, consecutive seqs
        self.replay_id = -1  # its index in the ReplayBuffer, once it kept a batch

    def in_ring(self) -> bool:
        """Whether the batch is being gathered in the ring."""
        return self.ring is not None and self.buf is not self.own

    def room(self, size: int) -> np.ndarray:
        """The buffer, with ``size`` bytes free after the events (and one
        for the batch's end) up to ``limit``."""
        self.limit = self.pos + size
        need = size + 1
        if self.ring is not None and (self.in_ring() or self.pos == _HEADER_ROOM):
            window = self.ring.window(self.pos, need)
            if window is not None:
                self.buf = window
                return window
            if self.in_ring():  # grown too large for the ring: the batch so far moves out
                self.own = _room(self.own, 0, self.pos + need)
                self.own[: self.pos] = self.buf[: self.pos]
            self.buf = self.own
        self.buf = self.own = _room(self.own, self.pos, need)
        return self.buf

    def add(self, events: list[bytes]) -> None:
        """Append encoded events."""
        joined = b"".join(events)
        self.room(len(joined))[self.pos : self.pos + len(joined)] = np.frombuffer(joined, dtype=np.uint8)
        self.pos += len(joined)
        self.events += len(events)

    def payload(self, ts: float) -> memoryview:
        """The batch gathered, its header written in the room before its
        events; valid until the stream gathers again."""
        header = _batch_header(self.events, ts)
        self.start = _HEADER_ROOM - len(header)
        self.buf[self.start : _HEADER_ROOM] = np.frombuffer(header, dtype=np.uint8)
        self.buf[self.pos] = 0xC0
        return memoryview(self.buf[self.start : self.pos + 1])

    def clear(self) -> None:
        """Drop the batch gathered (one kept in the ring stays there)."""
        self.pos, self.events, self.limit = _HEADER_ROOM, 0, 0
        self.buf = self.own


class ReplayBuffer:
    """The last batches of every stream, in one byte ring of ``nbytes``
    allocated and faulted in at start (copied in, or gathered there in
    place: ``window``), at most ``batches`` per stream. A batch kept as a
    Python object of its own would take fresh pages every time (the ring
    of them only grows), and a page fault costs
    more than encoding the page (about 25 faults, 54 µs, for each 100 KB
    batch on the 2-core development VM, against 9 µs to copy it here).
    Oldest batches give way first; a stream's kept batches stay
    consecutive, so a replay from an older one gets a snapshot instead. A
    batch larger than half the ring is not kept, nor are its stream's older
    ones (a replay from before it gets a snapshot)."""

    def __init__(self, nbytes: int, batches: int) -> None:
        self.data = faulted(nbytes, np.uint8)
        self.batches = batches
        self._head = 0
        self._streams: list[Stream] = []  # by the ids that ``_order`` holds
        # (stream id, seq, start, end) of the batches in the ring, oldest
        # first; tuples of ints, which the cyclic GC does not track.
        self._order: deque[tuple[int, int, int, int]] = deque()

    def window(self, used: int, need: int) -> "np.ndarray | None":
        """The ring from its head on, for the stream that gathers its batch
        in place (``Stream``; the first ``used`` bytes from the head are its
        batch so far), with ``used + need`` bytes from the head free of kept
        batches, the oldest giving way; None when that is more than half
        the ring. Where the ring's end is too near, the batch so far moves
        to its start."""
        end = used + need
        if end > len(self.data) // 2:
            return None
        if self._head + end > len(self.data):
            old = self._head
            self._wrap()
            self._drop(0, end)
            self.data[:used] = self.data[old : old + used]  # apart: old > half the ring >= end
        self._drop(self._head, self._head + end)
        return self.data[self._head :]

    def _wrap(self) -> None:
        """Give the ring's end up (its batches are the oldest) and go on from its start."""
        self._drop(self._head, len(self.data))
        self._head = 0

    def keep(self, stream: Stream, seq: int, payload: bytes) -> None:
        """Keep ``stream``'s batch ``seq``: where it was gathered, if in the
        ``window``; else copied in, dropping what it overwrites."""
        n = len(payload)
        if stream.in_ring():
            start = self._head + stream.start
        elif n > len(self.data) // 2:  # it would push out nearly everything: keep none of this stream
            stream.kept.clear()
            return
        else:
            if self._head + n > len(self.data):
                self._wrap()
            start = self._head
            self._drop(start, start + n)
            self.data[start : start + n] = np.frombuffer(payload, dtype=np.uint8)
        end = start + n
        self._head = end
        if stream.replay_id < 0:
            stream.replay_id = len(self._streams)
            self._streams.append(stream)
        self._order.append((stream.replay_id, seq, start, end))
        stream.kept.append((seq, start, end))
        if len(stream.kept) > self.batches:
            stream.kept.popleft()
        while self._order and not self._listed(self._order[0]):  # given up by the batches limit
            self._order.popleft()

    def _drop(self, lo: int, hi: int) -> None:
        """Forget the batches in bytes [lo, hi): the oldest ones, as the ring is written in order."""
        while self._order and self._order[0][2] < hi and self._order[0][3] > lo:
            entry = self._order.popleft()
            if self._listed(entry):
                self._streams[entry[0]].kept.popleft()

    def _listed(self, entry: tuple[int, int, int, int]) -> bool:
        """Whether ``entry`` (the oldest in the ring) is still its stream's oldest kept batch."""
        kept = self._streams[entry[0]].kept
        return bool(kept) and kept[0][0] == entry[1]

    def oldest(self, stream: Stream) -> int:
        """The oldest sequence number of ``stream`` kept (its next when none)."""
        return stream.kept[0][0] if stream.kept else stream.seq

    def since(self, stream: Stream, start: int) -> list[tuple[int, bytes]]:
        """``stream``'s kept batches from ``start`` on, as (seq, payload)."""
        return [(seq, self.data[a:b].tobytes()) for seq, a, b in stream.kept if seq >= start]


class Publisher:
    """Publish what ``writer``'s segment gains and loses (see the module).

    ``endpoint`` is bound when it has ``*`` or ``::`` or is ``ipc://`` or
    ``inproc://``, connected to otherwise (as vLLM does); ``replay`` (a
    ROUTER endpoint) is bound. ``journal``: the writer's journal rows
    (``Writer.watch``); an operation that makes more changes than the
    seven eighths of them that are never kept is published as a snapshot
    instead.

    The node's stream keeps each operation for ``encode``, which gathers
    their events in its batch; ``flush`` encodes what is kept and sends one
    batch per stream that has events; ``serve_replay`` answers what the
    replay socket received. None of them blocks. The caller's loop calls
    them: the daemon encodes while no request waits (``encode``'s
    ``at_least``), flushes when ``due``
    (``interval`` seconds after the first change of a batch: one batch per
    interval, as an engine sends one per step), and serves replay when
    ``fds`` are readable. An embedded writer's owner calls ``flush``
    (``due`` says when); past ``KEPT_OPS`` kept operations the publisher
    encodes by itself, and past ``BATCH_EVENTS`` gathered events it
    flushes by itself. Call everything from
    the writer's thread. ``buffer`` batches per stream, within ``buffer_bytes`` for all
    of them, are kept for replay. Owns its sockets and watches ``writer``
    until ``close``.
    """

    def __init__(self, writer: Writer, endpoint: str, *, replay: str | None = None, topic: str = "",
                 per_owner: bool = False, model: str | None = None, buffer: int = BUFFER_BATCHES,
                 array_format: bool = False, ctx: "zmq.Context | None" = None, journal: int = JOURNAL_ENTRIES,
                 interval: float = INTERVAL_S, buffer_bytes: int = BUFFER_BYTES) -> None:
        for what, v in (("batches", buffer), ("bytes", buffer_bytes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInputError(f"the publish buffer must be a positive number of {what}, got {v!r}")
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval <= 60:
            raise InvalidInputError(f"the publish interval must be in [0, 60] seconds, got {interval!r}")
        self.interval = float(interval)
        self.writer = writer
        self.block_size = writer.block_size
        self.model = model if model is not None else writer.name
        self.published_batches = 0
        self.gathering_since: float | None = None  # time.monotonic() of the oldest change not yet sent
        self.replay_requests = 0
        self.errors = 0  # operations whose changes could not be published (then resynchronised)
        self._pieces = Pieces(array_format, self.block_size)
        self._buf = np.empty(1 << 16, dtype=np.uint8)  # one owner-stream event at a time
        # The node's operations not encoded yet, as groups of consecutive
        # rows of one of the writer's journals, which it leaves alone until
        # released: [the journal, its rows 0.. the group holds, per
        # operation its rows, where its tokens begin and end in
        # ``_kept_tokens`` and its namespace id]. A group begins at row 0:
        # the writer journals from there after each release and in each new
        # journal (an insert larger than the room left), and after the rows
        # kept otherwise.
        # The tokens are copied (the caller's array is theirs again after
        # the call), back to back in memory reused from batch to batch (it
        # grows to the largest insert's, and stays). Past an eighth of the
        # journal the operations are encoded at once, so that an operation
        # still has most of the journal's room.
        self._kept: list[list] = []
        self._kept_count = 0
        self._kept_rows = 0
        self._kept_rows_max = journal // 8
        self._kept_tokens = _NO_TOKENS if per_owner else faulted((self._kept_rows_max + 1) * self.block_size, np.uint32)
        self._kept_ntokens = 0
        self._room_bytes = min(ROOM_BYTES, buffer_bytes // 16) if replay is not None else ROOM_BYTES
        cap = writer.capacity
        self._data = writer._map.data
        self._geom = writer.geometry.vector()
        self._base = int(self._geom[G_STATES])
        # By state: the tokens as stored, and the namespace id (-1: tokens
        # unknown). Faulted in now, not one page per insert.
        self._tokens = faulted((cap, self.block_size), np.uint32)
        self._tokens_flat = self._tokens.reshape(-1)
        self._ns = faulted(cap, np.int32, -1)
        self._names: dict[int, str] = {}
        self._names_epoch = -1
        self._streams: dict[str, Stream] = {}
        self._replay = ReplayBuffer(buffer_bytes if replay is not None else 0, buffer)
        self._node = None
        if not per_owner:
            self._node = self._streams[topic] = Stream(topic, 1 << 20, self._replay if replay is not None else None)
        self.unknown_blocks = int(self._live_states().size)
        self._ctx = ctx or zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 100_000)
        self._router = None
        self._ipc_files: dict[str, int] = {}
        try:
            if "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
                self._pub.bind(endpoint)
            else:
                self._pub.connect(endpoint)
            if replay is not None:
                self._router = self._ctx.socket(zmq.ROUTER)
                self._router.setsockopt(zmq.LINGER, 0)
                self._router.bind(replay)
            # ZMQ removes a bound ipc:// socket file in its I/O thread, which a
            # process that exits right after closing may never let run.
            self._ipc_files = {path: os.lstat(path).st_ino for path in (e[len("ipc://"):] for e in (endpoint, replay or "")
                                                                         if e.startswith("ipc://"))}
        except zmq.ZMQError as e:
            self._close_sockets()
            raise InvalidInputError(f"cannot publish KV events on {endpoint!r} (replay {replay!r}): {e}") from None
        writer.watch(self._on_changes, journal)

    # --- endpoints and sockets ----------------------------------------------------

    def endpoints(self) -> tuple[str, str | None]:
        """The PUB socket's and the replay socket's last endpoints (a bound
        ``tcp://*:0`` shows its port)."""
        pub = self._pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        return pub, None if self._router is None else self._router.getsockopt(zmq.LAST_ENDPOINT).decode()

    def fds(self) -> list[int]:
        """File descriptors to poll for replay requests: call
        ``serve_replay`` when one is readable (ZMQ's: readable when the
        socket has news; ``serve_replay`` reads until it has no request left,
        which is what keeps this signal reliable)."""
        return [] if self._router is None else [self._router.getsockopt(zmq.FD)]

    def _close_sockets(self) -> None:
        self._pub.close()
        if self._router is not None:
            self._router.close()
        for path, ino in self._ipc_files.items():
            try:
                if os.lstat(path).st_ino == ino:  # still ours, not another publisher's since
                    os.unlink(path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Send what is gathered, stop watching the writer, close the sockets."""
        try:
            self.flush()
            self.writer.watch(None)
        except ShmCacheError:
            pass  # the writer is closed or lost its segment: it calls no sink any more
        finally:
            self._close_sockets()

    # --- from the journal to events ------------------------------------------------

    def _stream(self, topic: str) -> Stream:
        s = self._streams.get(topic)
        if s is None:
            s = self._streams[topic] = Stream(topic)
        return s

    def _owner_streams(self, bits: int) -> list[Stream]:
        """The streams of the owners whose bits are set in ``bits``."""
        epoch = int(self._data[H_OWNERS_EPOCH])
        if epoch != self._names_epoch:
            table = owner_table.snapshot(self._data, self._geom)
            self._names = dict(table.named())
            self._names_epoch = epoch
        out = []
        i = 0
        while bits:
            if bits & 1 and i in self._names:
                out.append(self._stream(self._owner_topic(self._names[i])))
            bits >>= 1
            i += 1
        return out

    def _owner_topic(self, owner: str) -> str:
        return f"kv@{owner}@{self.model}"

    def _word(self, states: np.ndarray, field: int) -> np.ndarray:
        return self._data[self._base + states * RECORD_WORDS + field]

    def _parents(self, states: np.ndarray) -> np.ndarray:
        """Parent state of each (-1: a first block)."""
        link = (self._word(states, R_LINK) & np.uint64(LOW32)).astype(np.int64)
        return link - LINK_PARENT_BIAS

    def _live_states(self) -> np.ndarray:
        cap = int(self._geom[G_CAPACITY])
        return np.flatnonzero((self._word(np.arange(cap), R_LINK) & np.uint64(LOW32)) != LINK_FREE)

    def _buffer(self, size: int) -> np.ndarray:
        self._buf = _room(self._buf, 0, size)
        return self._buf

    def _stored_event(self, keys: np.ndarray, parent: int, tokens: np.ndarray, ns_id: int) -> bytes:
        """One encoded ``BlockStored``: a chain of blocks (``keys``, their
        ``tokens`` in order) below the block whose state is ``parent`` (-1: none)."""
        p = self._pieces
        rest = p.rest(p.namespaces[ns_id])
        out = self._buffer(evwire.bound(len(keys), self.block_size, p.size))
        pos = evwire.put_stored(out, 0, keys, self._word(max(parent, 0), R_KEY_LO), parent >= 0,
                                np.ascontiguousarray(tokens, dtype=np.uint32), *p.arrays, rest)
        return out[:pos].tobytes()

    def _stored_events(self, states: np.ndarray) -> list[bytes]:
        """Encoded ``BlockStored`` events of live ``states`` whose tokens are
        known (each one's parent stored before it, or a first block), one
        per run that chains."""
        if not len(states):
            return []
        parents = self._parents(states)
        cuts = np.flatnonzero(parents[1:] != states[:-1]) + 1
        keys = self._word(states, R_KEY_LO)
        return [self._stored_event(keys[run], int(parents[run[0]]), self._tokens[states[run]].ravel(),
                                   int(self._ns[states[run[0]]]))
                for run in np.split(np.arange(len(states)), cuts)]

    def _removed_event(self, keys: np.ndarray) -> bytes:
        out = self._buffer(evwire.bound(len(keys), 0, self._pieces.size))
        pos = evwire.put_removed(out, 0, keys.view(np.uint64), *self._pieces.removed_arrays)
        return out[:pos].tobytes()

    def _on_changes(self, c: Changes) -> bool:
        """The sink. The node's stream keeps the operation (its journal rows,
        which the writer then leaves alone, and its tokens) for ``encode``:
        a daemon answers its clients first. Owner streams read the segment,
        so they take their events now. Returns whether it kept the rows."""
        try:
            return self._take(c)
        except Exception:  # a bug here must not take the writer's process down with it
            log.exception("publishing an operation's changes failed: the streams resynchronise")
            self._recover(c.entries)
            return False

    def _recover(self, failed: "np.ndarray | None") -> None:
        """After a publishing error (a bug): mirror the kept operations (or
        leave their blocks out of snapshots, if that fails too), leave out
        the blocks the failed operation (journal rows ``failed``) stored,
        whose tokens may never have been recorded, and resynchronise every
        stream with a snapshot. A snapshot must never miss a block, nor
        send a record with the tokens of the block it held before."""
        self.errors += 1
        try:
            self._apply_kept(emit=False)
        except Exception:
            log.exception("mirroring the kept operations failed: snapshots leave their blocks out")
            for journal, rows, _ in self._kept:
                self._forget_stores(journal[:rows])
            self._drop_kept()
        if failed is not None:  # after the kept ones: its stores are the newer
            self._forget_stores(failed)
        try:
            self._resync()
        except Exception:
            log.exception("resynchronising the streams failed: consumers see a gap and may ask for a snapshot")
        if self.gathering_since is None:  # a failed flush cleared it: the snapshot goes out when due
            self.gathering_since = time.monotonic()

    def _take(self, c: Changes) -> bool:
        if self.gathering_since is None:
            self.gathering_since = time.monotonic()
        if c.overflowed:
            self.encode()
            self._resync()
            return False
        if c.tokens is None:
            ns_id, tokens = -1, _NO_TOKENS
        else:
            ns_id, tokens = self._pieces.ns_id(c.namespace), c.tokens
        entries = c.entries
        if self._node is None:
            if tokens.dtype is not _U32:  # one kernel for every caller; the writer checked that the ids fit
                tokens = tokens.astype(_U32)
            known = self._ns[entries[:, 1]] >= 0  # before the drops forget them
            self._apply(entries, np.array([[len(entries), 0, len(tokens), ns_id]], dtype=np.int64), tokens, False,
                        self._buf, 0)
            self._owner_events(entries, known)
            return False
        t0, t1 = self._kept_ntokens, self._kept_ntokens + len(tokens)
        self._kept_tokens = _room(self._kept_tokens, t0, len(tokens))  # grown by one large insert, from now on
        self._kept_tokens[t0:t1] = tokens  # uint32: the writer checked that the ids fit
        self._kept_ntokens = t1
        if not self._kept or entries.base is not self._kept[-1][0]:
            self._kept.append([entries.base, 0, []])
        group = self._kept[-1]
        group[1] += len(entries)
        group[2] += (len(entries), t0, t1, ns_id)
        self._kept_count += 1
        self._kept_rows += len(entries)
        if self._kept_count < KEPT_OPS and self._kept_rows <= self._kept_rows_max:
            return True
        self.encode()  # nobody encoded for long: the journal keeps its room, memory stays bounded
        if self._node.events >= BATCH_EVENTS:
            self.flush()
        return False

    def _apply(self, entries: np.ndarray, ops: np.ndarray, tokens: np.ndarray, emit: bool, out: np.ndarray,
               pos: int) -> tuple[int, int]:
        """Mirror the tokens of consecutive operations' stores and (``emit``)
        encode their node-stream events into ``out`` from ``pos`` (room:
        ``evwire.bound``): their journal rows ``entries``, per operation
        ``ops`` (``evwire.apply_ops``), their ``tokens``; returns ``(the new
        pos, events)``."""
        pos, events, unknown = evwire.apply_ops(entries, ops, tokens, self.block_size, self._tokens_flat, self._ns,
                                                emit, out, pos, *self._pieces.table)
        self.unknown_blocks -= unknown
        return pos, events

    def _apply_kept(self, emit: bool) -> None:
        """Apply the operations the node's stream kept, oldest first, one
        kernel call per journal they lie in (one, unless an insert needed a
        new one): mirror their tokens and (``emit``) encode their events
        into its batch; then hand the journal back to the writer. A group
        leaves the list once applied, so after an error the rest is still
        there to mirror (without ``emit``, before the snapshot that stands
        for them; mirroring a group again writes what it wrote, though
        ``unknown_blocks`` may then count drops the failed call made)."""
        node, kept = self._node, self._kept
        tokens = self._kept_tokens
        while kept:
            journal, rows, ops = kept[0]
            entries, ops = journal[:rows], np.array(ops, dtype=np.int64).reshape(-1, 4)
            if emit:
                # An event per run of rows of one kind, at most: runs within
                # operations, and the operations.
                runs = int(np.count_nonzero(entries[1:, 0] != entries[:-1, 0])) + len(ops)
                need = evwire.bound(rows, self.block_size, self._pieces.size, runs)
                if node.pos + need > node.limit:
                    node.room(max(need, self._room_bytes))
                node.pos, events = self._apply(entries, ops, tokens, True, node.buf, node.pos)
                node.events += events
            else:
                self._apply(entries, ops, tokens, False, self._buf, 0)
            del kept[0]
        self._drop_kept()

    def _drop_kept(self) -> None:
        """Forget the kept operations and let the writer journal over their rows."""
        self._kept.clear()
        self._kept_count = self._kept_rows = self._kept_ntokens = 0
        self.writer.release_journal()

    def encode(self, at_least: int = 1) -> None:
        """Encode the operations the node's stream kept into its batch, if
        there are ``at_least`` of them (``flush`` encodes all first; a
        daemon calls it when no request waits, once a few are kept)."""
        if self._kept_count >= at_least:
            try:
                self._apply_kept(emit=True)
            except Exception:  # a bug: the daemon's loop goes on
                log.exception("encoding the kept operations failed: the streams resynchronise")
                self._recover(None)

    def _forget_stores(self, entries: np.ndarray) -> None:
        """Count the blocks an operation whose journal rows are ``entries``
        stored as of unknown tokens: snapshots leave them out, instead of
        sending them with the tokens of the blocks their records held
        before."""
        stored = entries[entries[:, 0] == J_STORED, 1]
        self.unknown_blocks += len(stored)
        self._ns[stored] = -1

    def _owner_events(self, e: np.ndarray, known: np.ndarray) -> None:
        """Per-owner streams: a block is stored on an owner's stream when
        the owner starts holding it, removed when it stops or the block
        leaves the cache."""
        ops = e[:, 0]
        bounds = [0, *(np.flatnonzero(ops[1:] != ops[:-1]) + 1).tolist(), len(e)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            rows, op = e[lo:hi], e[lo, 0]
            if op == J_STORED:
                event = self._stored_events(rows[:, 1])  # one insert: one chain, the same owners for all
                for stream in self._owner_streams(int(rows[0, 3])):
                    stream.add(event)
            else:
                rows = rows[known[lo:hi]]
                before, after = rows[:, 2 if op == J_OWNERS else 3].view(np.uint64), rows[:, 3].view(np.uint64)
                if op == J_DROPPED:
                    after = np.zeros_like(before)
                self._owner_changes(before, after, rows[:, 1], rows[:, 2] if op == J_DROPPED else None)

    def _owner_changes(self, before: np.ndarray, after: np.ndarray, states: np.ndarray,
                       keys: "np.ndarray | None") -> None:
        """Owners whose bit went on store the (live) ``states``; owners whose
        bit went off remove them (``keys``: of dropped records; None: read
        from live ones)."""
        if not len(states):
            return
        for bits, gain in ((np.bitwise_or.reduce(before & ~after), False), (np.bitwise_or.reduce(after & ~before), True)):
            bits = int(bits)
            for bit in range(bits.bit_length()):
                if not (bits >> bit) & 1:
                    continue
                sel = ((after & ~before if gain else before & ~after) & np.uint64(1 << bit)) != 0
                if gain:
                    events = self._stored_events(states[sel])
                else:
                    events = [self._removed_event(keys[sel] if keys is not None else self._word(states[sel], R_KEY_LO))]
                for stream in self._owner_streams(1 << bit):
                    stream.add(events)

    # --- snapshots ----------------------------------------------------------------------

    def _content(self, stream: Stream) -> np.ndarray:
        """The known live states a stream holds, parents before children."""
        states = self._live_states()
        states = states[self._ns[states] >= 0]
        if stream is not self._node:
            self._owner_streams(0)  # the names current
            wanted = [i for i, name in self._names.items() if stream.topic == self._owner_topic(name).encode()]
            if not wanted:
                return states[:0]
            states = states[(self._word(states, R_OWNERS) & np.uint64(1 << wanted[0])) != 0]
        cap = int(self._geom[G_CAPACITY])
        up = np.full(cap + 1, cap, dtype=np.int64)  # ancestor pointers; cap: above the root
        parents = self._parents(states)
        up[states] = np.where(parents < 0, cap, parents)
        depth = np.zeros(cap + 1, dtype=np.int64)
        depth[states] = 1
        while True:  # pointer jumping: log2(height) passes
            a = up[states]
            if (a == cap).all():
                break
            depth[states] += depth[a]
            up[states] = up[a]
        return states[np.argsort(depth[states], kind="stable")]

    def _snapshot(self, stream: Stream) -> list[list[bytes]]:
        """Encoded events of a snapshot of ``stream``, in batches of
        ``SNAPSHOT_EVENTS``: a clear, then its content."""
        events = [self._pieces.cleared, *self._stored_events(self._content(stream))]
        return [events[i : i + SNAPSHOT_EVENTS] for i in range(0, len(events), SNAPSHOT_EVENTS)]

    def _resync(self) -> None:
        """After a journal overflow: every stream is told to clear and gets
        its content again, as published batches."""
        log.info("an operation changed more blocks than the journal holds: publishing a snapshot")
        self._owner_streams(0)  # names current
        streams = [self._node] if self._node is not None else [
            self._stream(self._owner_topic(name)) for name in self._names.values()]
        for stream in streams:  # what a batch held is superseded by the clear
            stream.clear()
            stream.add([e for batch in self._snapshot(stream) for e in batch])

    # --- sending ------------------------------------------------------------------------

    def deadline(self) -> float:
        """When (``time.monotonic()``) what is gathered should be sent:
        ``interval`` after the oldest change not yet sent (an operation
        counts even if it encodes to no event); infinity when none waits."""
        return math.inf if self.gathering_since is None else self.gathering_since + self.interval

    def due(self, now: float) -> bool:
        """Whether ``deadline`` has come at ``now``."""
        return now >= self.deadline()

    def flush(self) -> int:
        """Send one batch per stream with gathered events; returns how many."""
        self.gathering_since = None
        self.encode()
        sent = 0
        for stream in self._streams.values():
            if not stream.events:
                continue
            payload = stream.payload(time.time())
            seq = stream.seq
            stream.seq += 1
            self._replay.keep(stream, seq, payload)  # first: a replay never skips a number that went out
            self._pub.send(stream.topic, zmq.SNDMORE)
            self._pub.send(seq.to_bytes(8, "big"), zmq.SNDMORE)
            self._pub.send(payload)  # a copy: the buffer is reused
            stream.clear()
            sent += 1
        self.published_batches += sent
        return sent

    def serve_replay(self) -> int:
        """Answer every replay request received so far; returns how many."""
        if self._router is None:
            return 0
        served = 0
        # ZMQ_EVENTS first: a NOBLOCK receive that raises Again costs
        # microseconds, and reading until it says no more keeps fds() reliable.
        while self._router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = self._router.recv_multipart(zmq.NOBLOCK)
            served += 1
            self.replay_requests += 1
            self._answer(frames)
        return served

    def _answer(self, frames: list[bytes]) -> None:
        client = frames[0]
        end = [client, b"", b"", END_SEQ, b""]
        if len(frames) not in (3, 4) or frames[1] != b"" or len(frames[2]) != 8:
            log.warning("replay request with %d frames ignored: expected [b'', start_seq (8 bytes)]", len(frames) - 1)
            self._router.send_multipart(end)
            return
        start = int.from_bytes(frames[2], "big")
        topic = frames[3].decode(errors="replace") if len(frames) == 4 else None
        stream = self._node if topic is None else self._streams.get(topic)
        if stream is None:
            log.warning("replay request for unknown topic %r answered with nothing", topic)
            self._router.send_multipart(end)
            return
        self.flush()  # what is gathered goes out first, so the answer and the stream agree
        if start >= self._replay.oldest(stream):
            answer = [(seq.to_bytes(8, "big"), payload) for seq, payload in self._replay.since(stream, start)]
        else:  # a snapshot stands for the latest batch
            at = max(stream.seq - 1, 0).to_bytes(8, "big")
            answer = [(at, batch_payload(events, len(events), time.time())) for events in self._snapshot(stream)]
        for seq, payload in answer:
            self._router.send_multipart([client, b"", stream.topic, seq, payload])
        self._router.send_multipart(end)

    def stats(self) -> dict:
        """Counters: batches published, replay requests answered, per stream
        the next sequence number, and blocks whose tokens are unknown, as of
        the writer's last operation (what is kept is encoded first: the
        events wait in the batch, as they would have for ``flush``)."""
        self.encode()
        return {"published_batches": self.published_batches, "replay_requests": self.replay_requests,
                "errors": self.errors,
                "unknown_blocks": self.unknown_blocks,
                "streams": {s.topic.decode(): s.seq for s in self._streams.values()}}
