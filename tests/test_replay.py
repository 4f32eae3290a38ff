"""The trace replay behind tools/replay_trace.py: shmcache's hits equal an
exact LRU's, and the dict baseline it times gives the same answers."""

from __future__ import annotations

from shmcache.replay import dict_index, dict_match, load_trace, replay, unique_blocks


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
