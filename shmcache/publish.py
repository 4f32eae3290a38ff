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
  When ``start_seq`` is older than the oldest buffered batch (a consumer
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
block); the node's stream encodes an operation's events in one kernel call
at ``flush``, which the daemon runs after it has answered its clients.
The publisher keeps each block's tokens (4 bytes a token: 64 MB for a
million 16-token blocks) for snapshots.
"""

from __future__ import annotations

import logging
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
from .wstate import J_DROPPED, J_OWNERS, J_STORED
from .writer import JOURNAL_ENTRIES, Changes, Writer

log = logging.getLogger("shmcache.publish")

#: Batches each stream keeps for replay unless told otherwise.
BUFFER_BATCHES = 10_000
#: Events per batch of a snapshot answer.
SNAPSHOT_EVENTS = 1024
END_SEQ = (-1).to_bytes(8, "big", signed=True)
_NO_TOKENS = np.zeros(0, dtype=np.uint32)


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
        self.longest = 0
        self.arrays = tuple(np.frombuffer(p, dtype=np.uint8) for p in (self.s_head, self.s_mid, self.s_tail))
        self.removed_arrays = tuple(np.frombuffer(p, dtype=np.uint8) for p in (self.r_head, self.r_rest))

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
            self.longest = max(self.longest, len(raw))
        return r

    def size(self) -> int:
        """Constant bytes of the longest event."""
        return sum(len(p) for p in self.arrays) + self.longest + len(self.r_head) + len(self.r_rest)


def batch_payload(events: list[bytes], count: int, ts: float) -> bytes:
    """``[ts, events, nil]`` around ``count`` encoded events (vLLM's
    ``KVEventBatch``; the rank is nil: the node is no data-parallel rank)."""
    return b"".join([b"\x93\xcb", struct.pack(">d", ts), _array_header(count), *events, b"\xc0"])


class Stream:
    """One topic: its next sequence number, the events of the batch being
    gathered, and the last ``buffer`` batches for replay."""

    def __init__(self, topic: str, buffer: int) -> None:
        self.topic = topic.encode()
        self.seq = 0
        self.pending: list[bytes] = []  # encoded events, several per item
        self.events = 0
        self.ring: deque[tuple[int, bytes]] = deque(maxlen=buffer)


class Publisher:
    """Publish what ``writer``'s segment gains and loses (see the module).

    ``endpoint`` is bound when it has ``*`` or ``::`` or is ``ipc://`` or
    ``inproc://``, connected to otherwise (as vLLM does); ``replay`` (a
    ROUTER endpoint) is bound. ``journal``: changes one operation may make
    before the publisher resynchronises instead (``Writer.watch``). Events gather until ``flush``, which sends
    one batch per stream that has any; ``serve_replay`` answers what the
    replay socket received. The caller's loop does both (the daemon, once per
    pass); neither blocks. Owns its sockets and watches ``writer`` until
    ``close``.
    """

    def __init__(self, writer: Writer, endpoint: str, *, replay: str | None = None, topic: str = "",
                 per_owner: bool = False, model: str | None = None, buffer: int = BUFFER_BATCHES,
                 array_format: bool = False, ctx: "zmq.Context | None" = None, journal: int = JOURNAL_ENTRIES) -> None:
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise InvalidInputError(f"the publish buffer must be a positive number of batches, got {buffer!r}")
        self.writer = writer
        self.block_size = writer.block_size
        self.per_owner = per_owner
        self.model = model if model is not None else writer.name
        self.buffer = buffer
        self.published_batches = 0
        self.replay_requests = 0
        self.errors = 0  # operations whose changes could not be published (then resynchronised)
        self._pieces = Pieces(array_format, self.block_size)
        self._buf = np.empty(1 << 16, dtype=np.uint8)
        self._queue: list[tuple[np.ndarray, np.ndarray, int]] = []  # the node stream's operations not yet encoded
        cap = writer.capacity
        self._data = writer._map.data
        self._geom = writer.geometry.vector()
        self._base = int(self._geom[G_STATES])
        # By state: the tokens as stored, and the namespace id (-1: tokens
        # unknown). Faulted in now, not one page per insert (as wstate._zeros).
        self._tokens = np.empty((cap, self.block_size), dtype=np.uint32)
        self._tokens.fill(0)
        self._ns = np.empty(cap, dtype=np.int32)
        self._ns.fill(-1)
        self._namespaces: list = []
        self._ns_ids: dict = {}
        self._names: dict[int, str] = {}
        self._names_epoch = -1
        self._streams: dict[str, Stream] = {}
        self._node = None if per_owner else self._stream(topic)
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
        """File descriptors to poll for replay requests (edge-triggered: call
        ``serve_replay`` every pass, not only when they are readable)."""
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
            s = self._streams[topic] = Stream(topic, self.buffer)
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
        if len(self._buf) < size:
            self._buf = np.empty(max(size, 2 * len(self._buf)), dtype=np.uint8)
        return self._buf

    def _stored_event(self, keys: np.ndarray, parent: int, tokens: np.ndarray, ns_id: int) -> bytes:
        """One encoded ``BlockStored``: a chain of blocks (``keys``, their
        ``tokens`` in order) below the block whose state is ``parent`` (-1: none)."""
        p = self._pieces
        rest = p.rest(self._namespaces[ns_id])
        out = self._buffer(evwire.bound(len(keys), self.block_size, p.size()))
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
        out = self._buffer(evwire.bound(len(keys), 0, self._pieces.size()))
        pos = evwire.put_removed(out, 0, keys.view(np.uint64), *self._pieces.removed_arrays)
        return out[:pos].tobytes()

    def _ns_id(self, namespace) -> int:
        i = self._ns_ids.get(namespace)
        if i is None:
            i = self._ns_ids[namespace] = len(self._namespaces)
            self._namespaces.append(namespace)
        return i

    def _on_changes(self, c: Changes) -> None:
        """The sink. The node's stream takes the operation's journal (which
        carries every key) and tokens as they are, and encodes them at
        ``flush``: the daemon answers its clients first. Owner streams read
        the segment, so they take their events now."""
        try:
            self._take(c)
        except Exception:  # a bug here must not take the writer's process down with it
            log.exception("publishing an operation's changes failed: the streams resynchronise")
            self.errors += 1
            self._queue.clear()
            try:
                self._resync()
            except Exception:
                log.exception("resynchronising the streams failed: consumers see a gap and may ask for a snapshot")

    def _take(self, c: Changes) -> None:
        if c.overflowed:
            self._apply_queued()
            self._resync()
            return
        tokens = _NO_TOKENS if c.tokens is None else np.asarray(c.tokens, dtype=np.uint32)
        ns_id = self._ns_id(c.namespace) if c.tokens is not None else -1
        if self._node is not None:  # kept until flush: a copy, the caller's may change
            self._queue.append((c.entries, tokens.copy() if tokens is c.tokens else tokens, ns_id))
            return
        known = self._ns[c.entries[:, 1]] >= 0  # before the drops forget them
        self._apply(c.entries, tokens, ns_id, False)
        self._owner_events(c.entries, known)

    def _apply(self, entries: np.ndarray, tokens: np.ndarray, ns_id: int, emit: bool) -> None:
        p = self._pieces
        rest = p.rest(self._namespaces[ns_id]) if ns_id >= 0 else p.arrays[0]  # before size(): it may be the longest
        out = self._buffer(evwire.bound(len(entries), self.block_size, p.size()))
        pos, events, unknown = evwire.apply_changes(entries, tokens, self.block_size, self._tokens, self._ns, ns_id,
                                                    emit, out, *p.arrays, rest, *p.removed_arrays)
        self.unknown_blocks -= unknown
        if events:
            self._node.pending.append(out[:pos].tobytes())
            self._node.events += events

    def _apply_queued(self) -> None:
        for entries, tokens, ns_id in self._queue:
            self._apply(entries, tokens, ns_id, True)
        self._queue.clear()

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
                    stream.pending += event
                    stream.events += len(event)
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
                    stream.pending += events
                    stream.events += len(events)

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
        for stream in streams:
            stream.pending = [e for batch in self._snapshot(stream) for e in batch]
            stream.events = len(stream.pending)

    # --- sending ------------------------------------------------------------------------

    def flush(self) -> int:
        """Send one batch per stream with gathered events; returns how many."""
        self._apply_queued()
        sent = 0
        for stream in self._streams.values():
            if not stream.pending:
                continue
            payload = batch_payload(stream.pending, stream.events, time.time())
            stream.pending, stream.events = [], 0
            seq = stream.seq
            stream.seq += 1
            stream.ring.append((seq, payload))
            self._pub.send(stream.topic, zmq.SNDMORE)
            self._pub.send(seq.to_bytes(8, "big"), zmq.SNDMORE)
            self._pub.send(payload, copy=False)
            sent += 1
        self.published_batches += sent
        return sent

    def serve_replay(self) -> int:
        """Answer every replay request received so far; returns how many."""
        if self._router is None:
            return 0
        served = 0
        while True:
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return served
            served += 1
            self.replay_requests += 1
            self._answer(frames)

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
        oldest = stream.ring[0][0] if stream.ring else stream.seq
        if start >= oldest:
            for seq, payload in stream.ring:
                if seq >= start:
                    self._router.send_multipart([client, b"", stream.topic, seq.to_bytes(8, "big"), payload])
        else:
            at = max(stream.seq - 1, 0).to_bytes(8, "big")
            for events in self._snapshot(stream):
                self._router.send_multipart([client, b"", stream.topic, at, batch_payload(events, len(events), time.time())])
        self._router.send_multipart(end)

    def stats(self) -> dict:
        """Counters: batches published, replay requests answered, per stream
        the next sequence number, and blocks whose tokens are unknown."""
        return {"published_batches": self.published_batches, "replay_requests": self.replay_requests,
                "errors": self.errors,
                "unknown_blocks": self.unknown_blocks,
                "streams": {s.topic.decode(): s.seq for s in self._streams.values()}}
