"""Differential test: random operation sequences against the plain-Python model."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from shmcache import CacheFullError, InvalidInputError, PinLimitError, Reader, Writer

from helpers import children_before_parents, live_states
from reference import RefCache, RefError

BS = 2
CAPACITY = 7
ids = st.lists(st.integers(0, 2), min_size=0, max_size=5)


def tokens_of(block_ids: list[int], tail: int) -> list[int]:
    return [b for b in block_ids for _ in range(BS)] + [7] * tail


class CacheMachine(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.name = f"t-hyp-{uuid.uuid4().hex[:12]}"
        self.evicted: list[int] = []
        self.w = Writer.create(self.name, capacity=CAPACITY, block_size=BS, on_evict=lambda v: self.evicted.extend(v.tolist()))
        self.ref = RefCache(CAPACITY, BS)
        self.next_value = 1000
        self.r = Reader.attach(self.name)
        self.handles: list = []  # (PinnedMatch, the model's nodes it pins)
        self.wpins: list = []  # (WriterPin, its tokens, the model's handle)

    def teardown(self):
        if hasattr(self, "w"):
            self.r.close()
            self.w.close(unlink=True)

    def _parents_by_value(self) -> dict[int, int | None]:
        return {n.value: (self.ref.nodes[n.parent].value if n.parent else None) for n in self.ref.nodes.values()}

    @rule(block_ids=ids, tail=st.integers(0, BS - 1), reuse=st.booleans())
    def insert(self, block_ids, tail, reuse):
        toks = tokens_of(block_ids, tail)
        n = len(block_ids)
        values = list(range(self.next_value, self.next_value + n))
        live = sorted(node.value for node in self.ref.nodes.values())
        if reuse and live and n:
            values[-1] = live[len(live) // 2]
        self.next_value += n
        self.evicted.clear()
        try:
            want = self.ref.insert(toks, values)
        except RefError as e:
            exc = InvalidInputError if e.kind == "dup" else CacheFullError
            try:
                self.w.insert(np.asarray(toks, dtype=np.int64), values)
            except exc:
                return
            raise AssertionError(f"writer accepted an insert the model refuses ({e.kind})")
        got = self.w.insert(np.asarray(toks, dtype=np.int64), values)
        assert (got, self.evicted) == want

    @rule(block_ids=ids)
    def match(self, block_ids):
        toks = tokens_of(block_ids, 0)
        want = self.ref.match(toks)
        m = self.w.match_prefix(toks)
        assert m.values.tolist() == want and m.length == len(want) * BS

    @rule(picks=st.lists(st.integers(0, 20), max_size=3))
    def remove(self, picks):
        live = sorted(node.value for node in self.ref.nodes.values())
        values = [live[i % len(live)] if live and i < 15 else 10**9 + i for i in picks]
        parents = self._parents_by_value()
        want = self.ref.remove(values)
        got = self.w.remove(values).tolist()
        assert sorted(got) == sorted(want)
        assert children_before_parents(got, parents)

    @rule(n=st.integers(0, 4))
    def evict(self, n):
        assert self.w.evict(n).tolist() == self.ref.evict(n)

    @rule(block_ids=ids, tail=st.integers(0, BS - 1))
    def pin(self, block_ids, tail):
        toks = tokens_of(block_ids, tail)
        length, handle = self.ref.pin(toks)
        pin = self.w.pin(toks)
        assert pin.length == length
        self.wpins.append((pin, tokens_of(block_ids, 0), handle))

    @rule(pick=st.integers(0, 10), by_tokens=st.booleans())
    def unpin(self, pick, by_tokens):
        if not self.wpins:
            return
        pin, toks, handle = self.wpins[pick % len(self.wpins)]
        if by_tokens:  # releases the latest pin of exactly these tokens
            pin, toks, handle = [p for p in self.wpins if p[1] == toks][-1]
        self.wpins.remove((pin, toks, handle))
        want = self.ref.unpin(handle)
        assert (self.w.unpin(toks) if by_tokens else self.w.unpin(pin)) == want
        assert not pin.pinned

    @rule(block_ids=ids)
    def unpin_what_is_not_pinned(self, block_ids):
        toks = tokens_of(block_ids, 0)
        if any(t == toks for _, t, _ in self.wpins):
            return
        with pytest.raises(InvalidInputError, match="not pinned"):
            self.w.unpin(toks)

    @rule()
    def recover(self):
        """The writer goes (its pins with it) and a new one takes over; the
        reader and its pins stay."""
        old = self.wpins[0][0] if self.wpins else None
        self.w.close()
        self.w = Writer.open(self.name, on_evict=lambda v: self.evicted.extend(v.tolist()))
        self.ref.recover()
        self.wpins.clear()
        if old is not None:
            with pytest.raises(InvalidInputError, match="another Writer"):
                self.w.unpin(old)

    @rule(block_ids=ids, pin=st.booleans())
    def reader_match(self, block_ids, pin):
        # A writer operation first: two reader hits between the same two
        # writer operations carry equal LRU stamps, and their order is a tie.
        assert self.w.match_prefix([]).length == 0 and self.ref.match([]) == []
        toks = tokens_of(block_ids, 0)
        nodes = self.ref.reader_match(toks)
        in_use = sum(len(n) for _, n in self.handles)
        if pin and in_use + len(nodes) > self.r.reader_pins:
            try:
                self.r.match_and_pin(toks)
            except PinLimitError:
                return
            raise AssertionError("the reader pinned past its reader_pins")
        m = self.r.match_and_pin(toks) if pin else self.r.match_prefix(toks)
        assert m.values.tolist() == [n.value for n in nodes] and m.length == len(nodes) * BS
        if pin:
            self.ref.reader_pin(nodes)
            self.handles.append((m, nodes))

    @rule(pick=st.integers(0, 10))
    def reader_unpin(self, pick):
        if self.handles:
            handle, nodes = self.handles.pop(pick % len(self.handles))
            self.r.unpin(handle)
            self.ref.reader_unpin(nodes)

    @rule()
    def clear(self):
        assert sorted(self.w.clear().tolist()) == sorted(self.ref.clear())

    @invariant()
    def same_content_and_invariants_hold(self):
        if not hasattr(self, "w"):
            return
        keyed = {}
        for prefix, node in self.ref.nodes.items():
            k = self.w.block_keys(np.asarray(prefix, dtype=np.int64))[-1]
            keyed[prefix] = (int(k[0]), int(k[1]))
        want = {
            keyed[p]: (n.value, keyed[n.parent] if n.parent else None, n.pins) for p, n in self.ref.nodes.items()
        }
        assert live_states(self.w._map.data, self.w.geometry) == want
        rpinned = {id(n) for _, nodes in self.handles for n in nodes}
        assert self.w.stats()["reader_pinned_blocks"] == len(rpinned)
        self.w.check()


CacheMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("SHMCACHE_HYPOTHESIS_EXAMPLES", "150")), stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestCache = CacheMachine.TestCase
