"""Cache-aware routing (issue 12, part 3) end to end: simulated ranks
publish vLLM-format KV events to a real daemon process, and what
``match_owners`` says each rank holds is exactly what that rank's own cache
holds, request after request; routing by it beats round-robin."""

from __future__ import annotations

from shmcache.layout import O_NEXT_SEQ
from shmcache.replay import unique_blocks
from shmcache.replay import prompt_tokens
from shmcache.routing import Simulation, load_requests


def test_the_routers_view_is_each_ranks_cache_and_cache_aware_routing_wins(shm_name):
    requests = load_requests(400)
    per_rank = unique_blocks([(r.input_length, r.hash_ids) for r in requests], 16) // 16
    sim = Simulation(4, per_rank, name=shm_name)
    try:
        # The cache-aware router decides only once the daemon applied every
        # batch the ranks published (the previous request's KV included).
        match_owners, decided = sim.reader.match_owners, []

        def seen_everything_first(tokens):
            decided.append([int(words[O_NEXT_SEQ]) for words in sim._next_seq] == [e.seq for e in sim.engines])
            return match_owners(tokens)

        sim.reader.match_owners = seen_everything_first
        results = {p: sim.run(requests, p) for p in ("round-robin", "cache-aware")}
        assert len(decided) == len(requests) and all(decided)
        # After the last request, every rank's view in the segment is its cache:
        # for every prompt, the blocks match_owners credits it with are the
        # leading blocks its exact LRU holds.
        blocks, _ = sim.blocks(requests)
        for req, held_blocks in zip(requests[-100:], blocks[-100:]):
            held = sim.reader.match_owners(prompt_tokens(req.input_length, req.hash_ids))
            for e in sim.engines:
                n = next((i for i, b in enumerate(held_blocks.tolist()) if b not in e.lru), len(held_blocks))
                assert held[f"rank{e.rank}"] == 16 * n, (e.rank, held, n)
    finally:
        sim.close()
    rr, ca = results["round-robin"], results["cache-aware"]
    assert ca.hit_rate > rr.hit_rate
    assert sum(ca.requests_per_rank) == len(requests) and max(rr.requests_per_rank) == len(requests) // 4
