"""Replay the Mooncake synthetic trace through shmcache and an exact-LRU reference.

    python tools/replay_trace.py                     # capacities 25% and 100% of unique blocks
    python tools/replay_trace.py --trace PATH --requests 1000

Prints token hit rate beside the reference's, reader match p50/p99 and writer
insert throughput, and the machine it ran on. Exits non-zero if shmcache's
hit rate falls below 98% of the reference's.
"""

from __future__ import annotations

import argparse
import sys
import time

from shmcache.replay import format_results, load_trace, replay, unique_blocks

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_match import machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", help="trace JSONL (default: the copy bundled with shmcache)")
    ap.add_argument("--requests", type=int, help="replay only the first N requests")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--fractions", default="0.25,1.0", help="capacities as fractions of the unique blocks")
    args = ap.parse_args()
    trace = load_trace(args.trace, args.requests)
    uniq = unique_blocks(trace, args.block_size)
    print(f"machine: {machine()}")
    print(f"trace: {len(trace):,} requests, {sum(l for l, _ in trace):,} prompt tokens, {uniq:,} unique blocks of {args.block_size}")
    results = []
    for f in (float(x) for x in args.fractions.split(",")):
        t0 = time.perf_counter()
        results.append(replay(trace, max(1, int(uniq * f)), args.block_size))
        print(f"  capacity {f:.0%} replayed in {time.perf_counter() - t0:.1f} s", flush=True)
    print(format_results(results))
    worst = min(r.hit_rate / r.reference_hit_rate for r in results if r.reference_hit_rate)
    print(f"worst hit-rate ratio vs exact LRU: {worst:.4f} (must be >= 0.98)")
    return 0 if worst >= 0.98 else 1


if __name__ == "__main__":
    sys.exit(main())
