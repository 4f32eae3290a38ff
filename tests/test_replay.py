"""The trace replay behind tools/replay_trace.py: shmcache's hits equal an
exact LRU's, and the dict baseline it times gives the same answers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmcache.errors import InvalidInputError
from shmcache.replay import TRACE_BLOCK, ExactLRU, dict_index, dict_match, load_trace, replay, unique_blocks
from shmcache.routing import Request, engine_hashes


def test_a_dict_index_of_k_blocks_matches_k():
    toks = list(range(100))
    for k in range(7):
        assert dict_match(dict_index(toks, k, 16), toks, 16) == k


def test_replay_hits_equal_exact_lru_and_the_reader_checked_the_dict_against_itself():
    trace = load_trace(limit=120)
    res = replay(trace, capacity=unique_blocks(trace, 16) // 4)
    assert res.hit_tokens == res.reference_hit_tokens > 0
    mean, p50, p90, top = res.matched_blocks
    assert mean == res.hit_tokens / 16 / len(trace)
    assert 0 <= p50 <= p90 <= top
    assert res.dict_p50_us > 0 and res.match_p50_us > 0


def check_exact_lru(capacity: int, universe: int, requests) -> None:
    """``ExactLRU`` against the plain definition: the leading cached blocks
    are the hit, each block is touched from the deepest, the least recently
    used go first; also where a request names a block twice."""
    lru, order = ExactLRU(capacity, universe), []  # order: least recently used first
    for blocks in requests:
        hit = 0
        while hit < len(blocks) and blocks[hit] in order:
            hit += 1
        for b in reversed(blocks):
            if b in order:
                order.remove(b)
            order.append(b)
        evicted, order = order[: max(len(order) - capacity, 0)], order[max(len(order) - capacity, 0) :]
        got_hit, got_evicted = lru.serve(np.asarray(blocks, dtype=np.int64))
        assert (got_hit, got_evicted.tolist()) == (hit, evicted)
        assert list(lru) == order and len(lru) == len(order)
        assert all(b in lru for b in order) and sum(b in lru for b in range(universe)) == len(order)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 12), st.lists(st.lists(st.integers(0, 15), max_size=8), max_size=30))
def test_the_lru_model_is_exact_lru_touched_deepest_first(capacity, requests):
    check_exact_lru(capacity, 16, requests)


def test_the_lru_model_stays_exact_while_its_log_is_compacted_and_grown():
    """Thousands of requests: the touch log (1,024 entries at first) drops
    its walked-past head and grows, and every stamp stays true."""
    rng = np.random.default_rng(7)
    requests = [rng.integers(0, 60, rng.integers(0, 40)).tolist() for _ in range(3000)]
    check_exact_lru(25, 60, requests)
    check_exact_lru(5000, 60, requests)  # nothing evicted


def test_eviction_walks_past_a_long_run_of_stale_log_entries():
    """The least recently used block lies after more stale entries than one
    window of the log holds: eviction goes on to the next window."""
    lru = ExactLRU(5000, 5001)
    lru.serve(np.arange(5000))  # the log from its head: 4999, 4998, ..., 0 (deepest first)
    lru.serve(np.arange(800, 5000))  # touched again: the log's first 4,200 entries are stale
    hit, evicted = lru.serve(np.array([5000]))
    assert (hit, evicted.tolist(), len(lru)) == (0, [799], 5000)


def test_the_lru_log_keeps_only_current_entries_when_it_fills():
    """Touching the same blocks over and over evicts nothing and grows
    nothing: a full log keeps its current entries only."""
    lru = ExactLRU(100, 100)
    assert lru.serve(np.arange(50))[0] == 0
    for _ in range(10_000):
        assert lru.serve(np.arange(50))[0] == 50
    assert len(lru) == 50 and list(lru) == list(range(49, -1, -1)) and len(lru._log) <= 1024


@pytest.mark.parametrize("capacity", [-1, 1.5, True, "8"])
def test_an_lru_of_a_bad_capacity_is_refused(capacity):
    with pytest.raises(InvalidInputError, match="capacity"):
        ExactLRU(capacity, 4)


def test_unique_blocks_and_engine_hashes_name_each_trace_block_once():
    trace = load_trace(limit=300)
    for bs in (16, 64):
        per = TRACE_BLOCK // bs
        names = {(ids[j // per], j % per) for length, ids in trace for j in range(length // bs)}
        assert unique_blocks(trace, bs) == len(names)
        hashes = {}
        for length, ids in trace:
            for j, h in enumerate(engine_hashes(Request(0.0, length, ids), bs)):
                assert 0 <= h < 1 << 64
                assert hashes.setdefault(h, (ids[j // per], j % per)) == (ids[j // per], j % per)
        assert len(hashes) == len(names)
    assert unique_blocks([], 16) == 0 and unique_blocks([(15, [7])], 16) == 0


@pytest.mark.parametrize("ids, block_size", [([1 << 62], 16), ([1 << 63], 16), (["x"], 16), ([1], 0), ([1], 513)])
def test_a_trace_whose_names_cannot_be_formed_is_refused(ids, block_size):
    with pytest.raises(InvalidInputError, match="trace"):
        unique_blocks([(512, ids)], block_size)
