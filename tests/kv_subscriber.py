"""What a cluster router keeps of one shmcache KV-event stream, built as
Dynamo's and llm-d's subscribers build it: a SUB socket, a DEALER for
replay, events decoded with the structs vLLM 0.33 declares
(``kv_structs``), and a model of the blocks the stream holds.

Gaps in the sequence numbers are healed from replay: every batch of one
answer is applied in order, then the stream continues after the last one
(a snapshot answer repeats one sequence number and starts by clearing).
"""

from __future__ import annotations

import time
from typing import Callable

import msgspec
import numpy as np
import zmq

from kv_structs import MAP, Encoding

END_SEQ = (-1).to_bytes(8, "big", signed=True)


class Consumer:
    def __init__(self, ctx: zmq.Context, endpoint: str, replay: str | None, topic: str = "",
                 encoding: Encoding = MAP, pump: Callable[[], object] | None = None) -> None:
        self.ctx, self.replay_endpoint, self.topic = ctx, replay, topic.encode()
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        self.sub.connect(endpoint)
        self.enc = encoding
        self.decode = msgspec.msgpack.Decoder(encoding.Batch).decode
        self.pump = pump  # called while waiting for a replay answer (an in-process publisher serves it)
        self.blocks: dict[int, tuple[int | None, tuple[int, ...]]] = {}  # hash -> (parent hash, tokens)
        self.expected = 0
        self.received: list[int] = []  # sequence numbers seen live, in order
        self.drop: set[int] = set()  # live batches to ignore, as if lost
        self.healed: list[int] = []  # sequence numbers applied from replay
        self.snapshots = 0
        self.last_payload = b""  # the last batch applied

    def close(self) -> None:
        self.sub.close()

    def apply(self, payload: bytes) -> None:
        self.last_payload = payload
        batch = self.decode(payload)
        assert batch.data_parallel_rank is None
        for e in batch.events:
            if isinstance(e, self.enc.BlockStored):
                assert e.medium == "GPU" and e.group_idx == 0 and e.kv_cache_spec_kind == "full_attention"
                bs = e.block_size
                assert len(e.token_ids) == bs * len(e.block_hashes)
                parent = e.parent_block_hash
                for i, h in enumerate(e.block_hashes):
                    assert 0 <= h < 1 << 64 and isinstance(h, int)
                    assert parent is None or parent in self.blocks, "a block stored before its parent"
                    self.blocks[h] = (parent, tuple(e.token_ids[i * bs:(i + 1) * bs]))
                    parent = h
            elif isinstance(e, self.enc.BlockRemoved):
                for h in e.block_hashes:
                    assert h in self.blocks, "a block removed that was never stored"
                    del self.blocks[h]
            else:
                self.blocks.clear()

    def replay(self, start: int, timeout: float = 30.0) -> None:
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.replay_endpoint)
        dealer.send_multipart([b"", start.to_bytes(8, "big"), *([self.topic] if self.topic else [])])
        deadline = time.monotonic() + timeout
        answer = []
        try:
            while True:
                if self.pump is not None:
                    self.pump()
                if dealer.poll(5):
                    frames = dealer.recv_multipart()
                    if frames[-2] == END_SEQ:
                        break
                    empty, topic, seq, payload = frames
                    assert empty == b"" and topic == self.topic
                    answer.append((int.from_bytes(seq, "big"), payload))
                assert time.monotonic() < deadline, "no end of the replay answer"
        finally:
            dealer.close()
        seqs = [s for s, _ in answer]
        first = self.decode(answer[0][1]).events[:1] if answer else []
        if len(set(seqs)) == 1 and first and isinstance(first[0], self.enc.AllBlocksCleared):
            self.snapshots += 1  # the content as of batch seqs[0]
        else:
            assert seqs == list(range(start, start + len(seqs))), f"replay from {start} answered {seqs}"
        for seq, payload in answer:
            self.apply(payload)
            self.healed.append(seq)
        if answer:
            self.expected = max(self.expected, answer[-1][0] + 1)

    def settle(self, quiet: float = 0.3) -> None:
        """Take live batches until none comes for ``quiet`` seconds, then
        ask replay for anything after them: for a publisher in another
        process, whose latest sequence number the test does not know."""
        while self.sub.poll(int(quiet * 1000)):
            self._take(*self.sub.recv_multipart())
        self.replay(self.expected)

    def _take(self, topic: bytes, seq_b: bytes, payload: bytes) -> None:
        assert topic == self.topic or not self.topic
        seq = int.from_bytes(seq_b, "big")
        self.received.append(seq)
        if seq in self.drop or seq < self.expected:
            return
        if seq > self.expected:
            self.replay(self.expected)
            if seq < self.expected:
                return
        self.apply(payload)
        self.expected = seq + 1

    def receive(self, until_seq: int, timeout: float = 30.0) -> None:
        """Take live batches (healing gaps) until every batch before ``until_seq`` is applied."""
        deadline = time.monotonic() + timeout
        while self.expected < until_seq:
            left = deadline - time.monotonic()
            assert left > 0, f"stream stuck at {self.expected}, waiting for {until_seq}"
            if self.pump is not None:
                self.pump()
            if not self.sub.poll(min(int(left * 1000), 50)):
                if self.expected < until_seq and self.replay_endpoint and not self.sub.poll(200):
                    self.replay(self.expected)  # a slow joiner missed the first batches
                continue
            self._take(*self.sub.recv_multipart())


def segment_blocks(data: np.ndarray, geom: np.ndarray, owner_bit: int | None = None) -> dict[int, int | None]:
    """Every cached block of a segment (held by owner ``owner_bit``, if
    given): low 64 bits of its key -> its parent's, None for a first block."""
    from shmcache.layout import G_CAPACITY, G_STATES, LINK_FREE, LINK_PARENT_BIAS, R_KEY_LO, R_LINK, R_OWNERS, RECORD_WORDS

    base = int(geom[G_STATES]) + np.arange(int(geom[G_CAPACITY])) * RECORD_WORDS
    link = (data[base + R_LINK] & np.uint64(0xFFFFFFFF)).astype(np.int64)
    live = link != LINK_FREE
    if owner_bit is not None:
        live &= (data[base + R_OWNERS] & np.uint64(1 << owner_bit)) != 0
    keys = data[base + R_KEY_LO]
    out = {}
    for s in np.flatnonzero(live):
        p = link[s] - LINK_PARENT_BIAS
        out[int(keys[s])] = None if p < 0 else int(keys[p])
    return out


def check_model(consumer: Consumer, data: np.ndarray, geom: np.ndarray, block_keys: Callable, namespaces: dict,
                owner_bit: int | None = None, left_out: frozenset = frozenset()) -> None:
    """The consumer's model is exactly the segment's content (but the
    blocks ``left_out``, by the low 64 bits of their keys): the same
    blocks with the same parents, and each block's tokens, chained from
    its first block, give its key (``block_keys(tokens, namespace)``)."""
    want = {h: p for h, p in segment_blocks(data, geom, owner_bit).items() if h not in left_out}
    assert {h: p for h, (p, _) in consumer.blocks.items()} == want
    for h in consumer.blocks:
        chain, cur = [], h
        while cur is not None:
            chain.append(consumer.blocks[cur][1])
            cur = consumer.blocks[cur][0]
        tokens = np.array([t for block in reversed(chain) for t in block], dtype=np.int64)
        ns = namespaces.get(tuple(tokens[: len(chain[-1])]))
        assert int(block_keys(tokens, ns)[-1, 0]) == h
