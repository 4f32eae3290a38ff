"""KV events out (issue 13, part 1): a segment's changes published as vLLM
0.33 publishes its KV cache, decoded by a subscriber with vLLM's own
struct declarations, in both encodings; the model a subscriber builds
from the stream is exactly the segment's content after inserts, removes,
evictions, clears and owners letting go; replay heals a dropped range and
gives a late joiner a snapshot."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import zmq

from shmcache import Client, Reader, Writer
from shmcache.errors import InvalidInputError
from shmcache import evwire
from shmcache.publish import BATCH_EVENTS, KEPT_OPS, Pieces, Publisher, ReplayBuffer, Stream, batch_payload

from daemon_proc import Served
from kv_structs import ARRAY, MAP
from kv_subscriber import Consumer, check_model

BS = 4


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def ends(tmp_path):
    return f"ipc://{tmp_path}/pub", f"ipc://{tmp_path}/replay"


def prompt(i: int, blocks: int, shared: int = 0) -> np.ndarray:
    """``blocks`` blocks: the first ``shared`` shared by every prompt, the rest unique to ``i``."""
    head = np.arange(shared * BS)
    tail = 1_000 + i * 10_000 + np.arange((blocks - shared) * BS)
    return np.concatenate([head, tail]).astype(np.int64)


class Embedded:
    """A Writer with a Publisher, and a Consumer of its stream."""

    def __init__(self, name, ctx, ends, capacity=64, encoding=MAP, topic="", **kw):
        self.w = Writer.create(name, capacity=capacity, block_size=BS)
        self.pub = Publisher(self.w, ends[0], replay=ends[1], ctx=ctx, array_format=encoding is ARRAY, **kw)
        self.namespaces: dict = {}
        self.consumer = Consumer(ctx, ends[0], ends[1], topic=topic, encoding=encoding, pump=self.pub.serve_replay)
        self.ctx, self.ends, self.encoding = ctx, ends, encoding

    def insert(self, tokens, namespace=None, **kw):
        self.namespaces[tuple(tokens[:BS].tolist())] = namespace
        n = len(tokens) // BS
        return self.w.insert(tokens, np.arange(n) + 1_000_000 * (self.w.stats()["inserted_blocks"] + 1), namespace, **kw)

    def sync(self, consumer=None, owner_bit=None, left_out=frozenset()):
        self.pub.flush()
        c = consumer or self.consumer
        stream = next(s for s in self.pub._streams.values() if s.topic == c.topic)
        c.receive(stream.seq)
        check_model(c, self.w._map.data, self.w.geometry.vector(), self.w.block_keys, self.namespaces, owner_bit,
                    left_out)

    def close(self):
        self.consumer.close()
        self.pub.close()
        self.w.close(unlink=True)


@pytest.fixture
def embedded(shm_name, ctx, ends):
    made = []

    def make(**kw):
        made.append(Embedded(shm_name, ctx, ends, **kw))
        return made[-1]

    yield make
    for e in made:
        e.close()


@pytest.mark.parametrize("encoding", [MAP, ARRAY], ids=["map", "array"])
def test_stream_reproduces_the_segment(embedded, encoding):
    e = embedded(capacity=40, encoding=encoding)
    for i in range(6):  # a shared head, so later prompts extend cached ones
        e.insert(prompt(i, 5, shared=2))
        e.sync()
    e.insert(prompt(100, 3), namespace="adapter-a")  # a LoRA namespace: lora_name
    e.insert(prompt(101, 3), namespace=7)  # an int namespace: lora_id
    e.sync()
    for i in range(6, 14):  # past capacity: LRU evictions become BlockRemoved
        e.insert(prompt(i, 5, shared=2))
    e.sync()
    assert e.w.stats()["evicted_blocks"] > 0
    e.w.remove([int(e.w.match_prefix(prompt(13, 5, shared=2)).values[1])])  # a middle block and its subtree
    e.sync()
    e.w.evict(3)
    e.sync()
    e.w.clear()
    e.sync()
    assert e.consumer.blocks == {}
    e.insert(prompt(200, 4))
    e.sync()
    seqs = sorted(set(e.consumer.received) | set(e.consumer.healed))
    assert seqs == list(range(e.pub._node.seq)), "sequence numbers are consecutive from 0"


def test_owners_letting_go_and_lora_fields(embedded):
    e = embedded(capacity=64)
    e.insert(prompt(1, 4, shared=2), owner="rank0")
    e.insert(prompt(2, 4, shared=2), owner="rank1")
    e.insert(prompt(3, 4), owner="rank1", namespace="lora-x")
    e.sync()
    before = len(e.consumer.blocks)
    e.w.release(prompt(2, 4, shared=2)[: 3 * BS], "rank1")  # rank1 lets go of blocks only it held
    e.sync()
    assert len(e.consumer.blocks) < before
    e.w.clear_owner("rank0")
    e.sync()
    assert b"BlockRemoved" in e.consumer.last_payload


def test_per_owner_streams(shm_name, ctx, ends, embedded):
    e = embedded(capacity=64, per_owner=True, model="m", topic="kv@rank0@m")
    other = Consumer(ctx, ends[0], ends[1], topic="kv@rank1@m", pump=e.pub.serve_replay)
    try:
        e.insert(prompt(1, 4, shared=2), owner="rank0")
        e.insert(prompt(2, 4, shared=2), owner="rank1")  # the shared head: rank1 stores it too
        e.insert(prompt(1, 4, shared=2), owner="rank1")  # rank1 gains blocks rank0 stored: BlockStored for it
        e.insert(prompt(3, 2))  # no owner: on no owner's stream
        entries = e.w.owner_info()
        e.sync(owner_bit=entries["rank0"]["entry"])
        e.sync(other, owner_bit=entries["rank1"]["entry"])
        assert len(other.blocks) == 6 and len(e.consumer.blocks) == 4
        e.w.release(prompt(1, 4, shared=2)[: 3 * BS], "rank1")  # rank1 lets go; rank0 still holds them
        e.sync(owner_bit=entries["rank0"]["entry"])
        e.sync(other, owner_bit=entries["rank1"]["entry"])
        assert len(other.blocks) == 4 and len(e.consumer.blocks) == 4
        e.w.clear_owner("rank0")
        e.sync(owner_bit=entries["rank0"]["entry"])
        e.sync(other, owner_bit=entries["rank1"]["entry"])
        assert e.consumer.blocks == {} and len(other.blocks) == 4
        assert set(e.pub.stats()["streams"]) == {"kv@rank0@m", "kv@rank1@m"}
    finally:
        other.close()


def test_replay_heals_a_dropped_range(embedded):
    e = embedded(capacity=200)
    e.consumer.drop = {3, 4, 5}
    for i in range(10):
        e.insert(prompt(i, 3, shared=1))
        e.pub.flush()
    e.sync()
    assert {3, 4, 5} <= set(e.consumer.healed)
    assert e.consumer.snapshots == 0


def test_a_late_joiner_gets_a_snapshot(shm_name, ctx, ends, embedded):
    e = embedded(capacity=30, buffer=3)
    for i in range(12):  # with evictions: the content is not the sum of the stores
        e.insert(prompt(i, 4, shared=2))
        e.pub.flush()
    e.sync()
    for i in range(12, 15):  # kept, not encoded yet: the snapshot must stand for them too
        e.insert(prompt(i, 4, shared=2))
    assert e.pub._kept_count == 3
    late = Consumer(ctx, ends[0], ends[1], pump=e.pub.serve_replay)
    try:
        late.replay(0)  # batch 0 is long gone from a buffer of 3
        assert late.snapshots == 1
        e.insert(prompt(50, 3))
        e.sync(late)
        e.sync()
        assert late.blocks == e.consumer.blocks
    finally:
        late.close()


def test_a_sink_keeps_its_journal_rows_until_it_releases_them(shm_name):
    """Rows a sink returns True for stay as they were while later
    operations journal after them (also when an insert needs a fresh
    journal); an operation that needs more rows than are left comes as
    overflowed; once released, operations journal from the start again."""
    w = Writer.create(shm_name, capacity=64, block_size=BS)
    got, keep = [], [False]

    def sink(c):
        got.append((c.entries, c.entries.copy(), c.overflowed))
        return keep[0]

    try:
        w.watch(sink, entries=9)
        w.insert(prompt(0, 3), [0, 1, 2])
        w.insert(prompt(1, 3), [3, 4, 5])
        assert np.shares_memory(got[0][0], got[1][0]), "not kept: the next operation journals over them"
        keep[0] = True
        w.insert(prompt(2, 1), [6])
        w.insert(prompt(3, 1), [7])
        assert got[3][0].ctypes.data == got[2][0].ctypes.data + got[2][0].nbytes, "journaled after the kept row"
        kept = got[2:]
        w.clear()  # 8 drops, 7 rows left
        assert got[-1][2] and len(got[-1][0]) == 7
        w.insert(prompt(4, 3), [8, 9, 10])  # room for 9 rows needed, 7 left: a fresh journal
        w.insert(prompt(5, 1), [11])
        assert all((view == copy).all() for view, copy, _ in kept), "nothing kept was written over"
        w.release_journal()
        keep[0] = False
        w.insert(prompt(6, 1), [12])
        w.insert(prompt(7, 1), [13])
        assert np.shares_memory(got[-1][0], got[-2][0]) and got[-1][0].ctypes.data == got[-2][0].ctypes.data
    finally:
        w.close(unlink=True)


@pytest.mark.parametrize("misbehaving", ["releases then keeps", "raises"])
def test_the_next_operation_gets_its_own_journal_rows(shm_name, misbehaving):
    """Whatever a sink did (released the journal during its call and then
    kept its rows, or raised), the next operation's changes are its own
    rows, and rows kept are never written over."""
    w = Writer.create(shm_name, capacity=64, block_size=BS)
    got, mode = [], [misbehaving]

    def sink(c):
        got.append((c.entries, c.entries.copy()))
        if mode[0] == "raises":
            mode[0] = None
            raise KeyboardInterrupt  # not an Exception: nothing in between catches it
        if mode[0] == "releases then keeps":
            w.release_journal()
        return mode[0] is not None

    try:
        w.watch(sink, entries=64)
        if misbehaving == "raises":
            with pytest.raises(KeyboardInterrupt):
                w.insert(prompt(0, 3), [0, 1, 2])
        else:
            w.insert(prompt(0, 3), [0, 1, 2])
            mode[0] = None
        w.insert(prompt(1, 1), [3])
        assert len(got) == 2 and len(got[1][0]) == 1, "the next operation's one change, and nothing else"
        assert got[1][0][0, 0] == 1 and got[1][0][0, 2] == 0, "a store of the operation's block 0"
        if misbehaving == "releases then keeps":
            assert (got[0][0] == got[0][1]).all(), "kept rows are not written over"
    finally:
        w.close(unlink=True)


def test_an_overflowed_journal_resynchronises(shm_name, ctx, ends):
    e = Embedded(shm_name, ctx, ends, capacity=64, journal=4)
    try:
        for i in range(10):  # a journal of 4 grows to 6 for 2-block inserts
            e.insert(prompt(i, 2, shared=1))
        e.insert(prompt(99, 2))
        e.sync()
        assert len(e.consumer.blocks) == 13 and e.consumer.snapshots == 0
        e.w.remove([int(e.w.match_prefix(prompt(0, 2, shared=1)).values[0])])  # 11 drops overflow it
        e.sync()
        assert len(e.consumer.blocks) == 2
        assert b"AllBlocksCleared" in e.consumer.last_payload
        for i in range(10, 14):
            e.insert(prompt(i, 2))
        e.w.clear()  # 10 drops: a clear, then nothing
        e.sync()
        assert e.consumer.blocks == {} and e.consumer.snapshots == 0 and e.pub.errors == 0
    finally:
        e.close()
    assert not any(os.path.exists(end[len("ipc://"):]) for end in ends), "the ipc socket files are removed"


def test_encode_waits_for_enough_kept_operations(shm_name, ctx, ends):
    """``encode(at_least)``, as a daemon calls it while idle, leaves fewer
    kept operations for later; a flush sends them all."""
    e = Embedded(shm_name, ctx, ends, capacity=64)
    try:
        for i in range(3):
            e.insert(prompt(i, 2))
        e.pub.encode(4)
        assert e.pub._kept_count == 3 and e.pub._node.events == 0
        e.pub.encode(3)
        assert e.pub._kept_count == 0 and e.pub._node.events == 3
        e.insert(prompt(3, 2))
        e.sync()
        assert len(e.consumer.blocks) == 8
    finally:
        e.close()


def test_kept_operations_of_every_kind_fit_the_room_reserved(shm_name, ctx, ends):
    """A group of kept operations alternating stores and drops (each run an
    event of its own) is encoded within the room reserved for it, and the
    tokens' memory is reused from batch to batch."""
    e = Embedded(shm_name, ctx, ends, capacity=16, journal=512)  # room for the tokens of 65 blocks
    e.pub._room_bytes = 1  # each group reserves what the bound says, no more
    try:
        tokens = e.pub._kept_tokens
        for batch in range(4):
            for i in range(6):
                e.insert(prompt(10 * batch + i, 3, shared=1))  # past capacity: evictions too
                e.w.remove([int(e.w.match_prefix(prompt(10 * batch + i, 3, shared=1)).values[2])])
            assert e.pub._kept_count == 12
            e.pub.encode()
            assert e.pub._node.pos <= e.pub._node.limit
            e.sync()
        assert e.pub._kept_tokens is tokens
        assert e.w.stats()["evicted_blocks"] > 0 and e.pub.errors == 0
    finally:
        e.close()


def test_operations_kept_across_a_new_journal(shm_name, ctx, ends):
    """Operations kept in one journal, then an insert too large for the
    room left, which the writer journals in a new one: both groups are
    encoded, each from its own journal, in order."""
    e = Embedded(shm_name, ctx, ends, capacity=64, journal=64)  # operations kept up to 8 rows
    try:
        e.insert(prompt(0, 2, shared=1))
        e.insert(prompt(1, 2, shared=1))
        e.w.remove([int(e.w.match_prefix(prompt(0, 2, shared=1)).values[1])])
        assert e.pub._kept_count == 3 and len(e.pub._kept) == 1
        e.insert(prompt(2, 30, shared=1))  # 90 rows of room needed: a new journal, then encoded at once
        assert e.pub._kept_count == 0 and e.pub._node.events == 4
        e.sync()
        assert len(e.consumer.blocks) == 31 and e.pub.errors == 0
    finally:
        e.close()


def test_stats_are_current_while_operations_are_kept(shm_name, ctx, ends):
    with Writer.create(shm_name, capacity=16, block_size=BS) as w:
        w.insert(prompt(0, 3), [1, 2, 3])  # cached before publishing: their tokens are unknown
        pub = Publisher(w, ends[0], ctx=ctx)
        try:
            assert pub.stats()["unknown_blocks"] == 3
            w.insert(prompt(1, 2), [4, 5])
            w.remove([1])  # the three unknown blocks go: kept, not encoded yet
            assert pub._kept_count == 2
            assert pub.stats()["unknown_blocks"] == 0 and not pub._kept_count
            assert pub.flush() == 1
        finally:
            pub.close()


@pytest.mark.parametrize("failing", ["evict", "insert", "encode"])
def test_a_failing_publisher_resynchronises_with_the_tokens_of_every_kept_block(embedded, monkeypatch, failing):
    """The sink (a bug in a drop, or in an insert into evicted records) or
    the encoding of the kept operations fails while operations wait to be
    encoded: the snapshot that replaces the stream has every block those
    operations stored, with its own tokens, also where an eviction gave a
    record to another block. The blocks the failing operation stored are
    left out (their tokens never reached the publisher), never sent with
    the tokens of the block their record held before."""
    e = embedded(capacity=24)
    for i in range(4):
        e.insert(prompt(i, 4))
    e.sync()
    for i in range(4, 9):  # kept, not encoded yet; past capacity: records evicted and given again
        e.insert(prompt(i, 4))
    assert e.pub._kept_count == 5 and e.w.stats()["evicted_blocks"] > 0

    def fail(*args):
        raise RuntimeError("injected")

    left_out = frozenset()
    if failing == "encode":  # the first operation's events fail; the others must still be mirrored
        apply = e.pub._apply
        monkeypatch.setattr(e.pub, "_apply", lambda *a: fail() if a[3] else apply(*a))
        e.pub.encode()
    else:
        monkeypatch.setattr(e.pub, "_take", fail)
    if failing == "evict":
        e.w.evict(2)  # drops only: the snapshot can be whole
    elif failing == "insert":
        e.insert(prompt(9, 4))  # 4 blocks in records it evicted
        left_out = frozenset(int(k) for k in e.w.block_keys(prompt(9, 4))[:, 0])
    monkeypatch.undo()
    assert e.pub.errors == 1 and not e.pub._kept_count
    e.sync(left_out=left_out)
    assert e.consumer.snapshots == 0 and b"AllBlocksCleared" in e.consumer.last_payload
    live = e.w.stats()["live_blocks"]
    assert len(e.consumer.blocks) == live - len(left_out) and live == {"evict": 22, "insert": 24, "encode": 24}[failing]


@pytest.mark.parametrize("enc", [MAP, ARRAY], ids=["map", "array"])
def test_events_are_byte_for_byte_what_msgspec_encodes(enc):
    """The kernels' bytes equal msgspec's encoding of vLLM's own structs,
    but for the token ids: each a msgpack uint32, which decodes the same."""
    import msgspec

    def uint32s(tokens):
        n = len(tokens)
        head = bytes([0x90 | n]) if n < 16 else (b"\xdc" + n.to_bytes(2, "big") if n < 65536 else b"\xdd" + n.to_bytes(4, "big"))
        return msgspec.Raw(head + b"".join(b"\xce" + int(t).to_bytes(4, "big") for t in tokens))

    pieces = Pieces(enc is ARRAY, BS)
    edge = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1]
    rng = np.random.default_rng(5)
    for blocks in (1, 3, 15, 16, 20, 16_400):  # headers: fixarray, array 16, array 32 (tokens > 65535)
        keys = np.array((edge * blocks)[:blocks], dtype=np.uint64)
        tokens = rng.choice(np.array([0, 5, 127, 128, 300, 65535, 65536, 2**32 - 1], dtype=np.uint32), blocks * BS)
        for parent in (None, 0, 200, 2**64 - 1):
            for ns in (None, "adapter-a", 7):
                out = np.empty(evwire.bound(blocks, BS, pieces.size + len(pieces.rest(ns))), dtype=np.uint8)
                pos = evwire.put_stored(out, 0, keys, np.uint64(parent or 0), parent is not None, tokens,
                                        *pieces.arrays, pieces.rest(ns))
                fields = dict(block_hashes=keys.tolist(), parent_block_hash=parent, block_size=BS,
                              lora_id=ns if type(ns) is int else None, medium="GPU",
                              lora_name=ns if isinstance(ns, str) else None, group_idx=0,
                              kv_cache_spec_kind="full_attention")
                ours = out[:pos].tobytes()
                assert ours == msgspec.msgpack.encode(enc.BlockStored(token_ids=uint32s(tokens), **fields))
                assert msgspec.msgpack.decode(ours) == msgspec.msgpack.decode(
                    msgspec.msgpack.encode(enc.BlockStored(token_ids=tokens.tolist(), **fields)))
        out = np.empty(evwire.bound(blocks, 0, pieces.size), dtype=np.uint8)
        pos = evwire.put_removed(out, 0, keys, *pieces.removed_arrays)
        removed = out[:pos].tobytes()
        assert removed == msgspec.msgpack.encode(enc.BlockRemoved(block_hashes=keys.tolist(), medium="GPU", group_idx=0))
    cleared = msgspec.msgpack.encode(enc.AllBlocksCleared())
    assert pieces.cleared == cleared
    payload = batch_payload([cleared, removed], 2, 1.5)
    assert payload == msgspec.msgpack.encode([1.5, [msgspec.Raw(cleared), msgspec.Raw(removed)], None])
    assert len(msgspec.msgpack.Decoder(enc.Batch).decode(payload).events) == 2


def test_the_replay_buffer_keeps_the_last_batches_that_fit():
    """Two streams share a 1,000-byte ring: each keeps its newest batches,
    consecutive, byte for byte; what was overwritten is not offered."""
    ring = ReplayBuffer(1000, batches=4)
    a, b = Stream("a"), Stream("b")
    sent = {"a": {}, "b": {}}
    rng = np.random.default_rng(7)
    for i in range(60):
        stream = a if rng.random() < 0.7 else b
        payload = rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes()
        sent[stream.topic.decode()][stream.seq] = payload
        ring.keep(stream, stream.seq, payload)
        stream.seq += 1
        for s in (a, b):
            kept = ring.since(s, 0)
            seqs = [seq for seq, _ in kept]
            assert seqs == list(range(ring.oldest(s), s.seq)), "the newest, consecutive"
            assert len(seqs) <= 4
            assert all(payload == sent[s.topic.decode()][seq] for seq, payload in kept)
            assert sum(len(p) for _, p in kept) <= 1000
    assert ring.since(a, ring.oldest(a) + 1) == ring.since(a, 0)[1:]
    ring.keep(a, a.seq, bytes(600))  # more than half the ring: not kept, nor anything older of a's
    a.seq += 1
    assert ring.since(a, 0) == [] and ring.oldest(a) == a.seq
    alone, c = ReplayBuffer(1 << 20, batches=4), Stream("c")
    for seq in range(1000):  # tiny batches: the batches limit, not the bytes, lets them go
        alone.keep(c, seq, b"x")
    assert len(alone._order) == 4, "the ring's own list of batches stays bounded too"


def test_a_stream_gathers_its_batches_in_the_ring_and_keeps_them_there():
    """The node's stream gathers each batch in the ring at its head, in
    pieces, across the ring's end; what it sends is what a replay gives
    back, byte for byte; a batch grown past half the ring moves to the
    stream's own buffer, is sent whole and is not kept."""
    ring = ReplayBuffer(4096, batches=8)
    node = Stream("", size=64, ring=ring)
    sent = {}
    rng = np.random.default_rng(11)
    for i in range(200):
        big = i % 50 == 49
        events = [rng.integers(0, 256, int(rng.integers(1, 1100 if big else 300)), dtype=np.uint8).tobytes()
                  for _ in range(int(rng.integers(1, 5)) + (8 if big else 0))]
        for e in events:
            node.add([e])
        size = sum(map(len, events))
        assert node.in_ring() == (size + 1 + 16 <= 2048), "in the ring while it fits in half of it"
        payload = bytes(node.payload(float(i)))
        assert payload == batch_payload(events, len(events), float(i))
        ring.keep(node, node.seq, node.payload(float(i)))
        sent[node.seq] = payload
        node.seq += 1
        node.clear()
        kept = ring.since(node, 0)
        assert [seq for seq, _ in kept] == list(range(ring.oldest(node), node.seq))
        assert all(p == sent[seq] for seq, p in kept), "kept where gathered, byte for byte"
        if size + 17 > 2048:
            assert kept == [], "too large for the ring: not kept, nor anything older"
        else:
            assert 1 <= len(kept) <= 8


def test_a_batch_is_due_an_interval_after_its_first_change_and_stays_bounded(shm_name, ctx, ends):
    w = Writer.create(shm_name, capacity=BATCH_EVENTS + KEPT_OPS + 64, block_size=BS)
    pub = Publisher(w, ends[0], ctx=ctx, interval=0.5)
    try:
        assert pub.deadline() == float("inf") and not pub.due(time.monotonic())
        before = time.monotonic()
        w.insert(prompt(0, 1), [0])
        deadline = pub.deadline()
        assert before + 0.5 <= deadline <= time.monotonic() + 0.5
        assert not pub.due(deadline - 1e-3) and pub.due(deadline)
        w.insert(prompt(1, 1), [1])
        assert pub.deadline() == deadline, "a batch is due an interval after its first change"
        assert pub.flush() == 1 and pub.deadline() == float("inf")
        for i in range(BATCH_EVENTS + KEPT_OPS):  # never flushed by its owner: it sends by itself
            w.insert(prompt(2 + i, 1), [2 + i])
        assert pub.published_batches == 2 and pub.stats()["streams"][""] == 2
    finally:
        pub.close()
        w.close(unlink=True)


def test_bad_options_are_refused(shm_name, ctx, ends):
    w = Writer.create(shm_name, capacity=8, block_size=BS)
    try:
        with pytest.raises(InvalidInputError, match="positive number of batches"):
            Publisher(w, ends[0], buffer=0, ctx=ctx)
        with pytest.raises(InvalidInputError, match="positive number of bytes"):
            Publisher(w, ends[0], buffer_bytes=-(1 << 20), ctx=ctx)
        with pytest.raises(InvalidInputError, match="interval must be in"):
            Publisher(w, ends[0], interval=-1, ctx=ctx)
        with pytest.raises(InvalidInputError, match="cannot publish"):
            Publisher(w, "tcp://no-such-host.invalid:1", replay="nonsense://x", ctx=ctx)
        w.insert(np.arange(8), [1, 2])  # still a working writer, watched by nobody
        assert w.match_prefix(np.arange(8)).length == 8
    finally:
        w.close(unlink=True)


@pytest.mark.parametrize("fmt, interval_ms", [("map", "0"), ("array", "20")])
def test_daemon_publishes_what_clients_change(shm_name, ctx, fmt, interval_ms):
    served = Served(shm_name, 48, "--publish-events", "tcp://127.0.0.1:*", "--publish-replay", "tcp://127.0.0.1:*",
                    "--publish-format", fmt, "--publish-interval-ms", interval_ms, block_size=BS)
    fields = dict(kv.split("=", 1) for kv in served.ready.split()[1:])
    consumer = Consumer(ctx, fields["publish"], fields["replay"], encoding=MAP if fmt == "map" else ARRAY)
    r = Reader.attach(shm_name)
    try:
        a, b = Client.connect(shm_name), Client.connect(shm_name)
        namespaces: dict = {}
        for i in range(8):
            a.insert(prompt(i, 4, shared=1), np.arange(4) + 100 * i)
        for i in range(8, 16):  # past capacity: evictions
            b.insert(prompt(i, 4, shared=1), np.arange(4) + 100 * i)
        a.close()  # a client that leaves takes its blocks with it
        b.insert(prompt(99, 2), [1, 2])  # a round trip after the close: the removal is applied

        consumer.settle()
        check_model(consumer, r._data, r._geom, r.block_keys, namespaces)
        assert r.stats()["evicted_blocks"] > 0 and r.stats()["removed_blocks"] > 0
        b.close()
    finally:
        consumer.close()
        r.close()
        served.kill()
