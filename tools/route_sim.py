"""Cache-aware data-parallel routing on the bundled trace, against round-robin
and least-loaded, in one run (``shmcache.routing`` has the model).

    python tools/route_sim.py --ranks 4                 # the whole trace
    python tools/route_sim.py --ranks 4 --plot out.png  # and the hit rate over the trace (matplotlib)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_match import machine  # noqa: E402

from shmcache.replay import unique_blocks  # noqa: E402
from shmcache.routing import POLICIES, Simulation, load_requests, shared_cache_hit_rate, table  # noqa: E402


def plot(results, path: str, window: int = 200) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for r in results:
        hits = np.asarray(r.hits)
        rolling = np.convolve(hits, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(hits) + 1), rolling, label=f"{r.policy} ({r.hit_rate:.1%})")
    ax.set_xlabel("request")
    ax.set_ylabel(f"token hit rate, last {window} requests")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--requests", type=int, default=None, help="only the first N requests of the trace")
    ap.add_argument("--capacity", type=float, default=0.25,
                    help="all ranks' KV together, as a fraction of the trace's unique blocks")
    ap.add_argument("--plot", help="write the hit rate over the trace to this PNG (needs matplotlib)")
    args = ap.parse_args()
    requests = load_requests(args.requests)
    uniq = unique_blocks([(r.input_length, r.hash_ids) for r in requests], 16)
    per_rank = int(uniq * args.capacity / args.ranks)
    print(f"machine: {machine()}")
    print(f"{len(requests):,} requests, {uniq:,} unique blocks of 16 tokens; {args.ranks} ranks of {per_rank:,} blocks each")
    sim = Simulation(args.ranks, per_rank)
    results = []
    try:
        for policy in POLICIES:
            t0 = time.perf_counter()
            results.append(sim.run(requests, policy))
            print(f"  {policy}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    finally:
        sim.close()
    shared = shared_cache_hit_rate(requests, per_rank * args.ranks)
    print(f"\none shared exact-LRU cache of {per_rank * args.ranks:,} blocks: token hit rate {shared:.1%}\n")
    print(table(results, shared))
    if args.plot:
        plot(results, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
