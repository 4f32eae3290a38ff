"""Benchmark: aggregate lock-free match throughput with 1, 2 and 4 reader processes.

    python tools/bench_scaling.py [--seconds 5] [--rate 50000]

A segment is filled with 2,048-token prompts (128 blocks of 16). For each
reader count, reader processes match random cached prompts for a fixed time
while a writer process inserts new prompts at ``--rate`` blocks/s; the
baseline is the same readers with no writer. Reports matches/s in total and
per reader, per-match p50/p99, and the machine's core count: readers beyond
the number of cores share them, so past that point throughput cannot grow.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_match import machine, percentiles  # noqa: E402

BS = 16
TOKENS = 2048
PREFILL = 1500


def prompt(i: int) -> np.ndarray:
    base = i * TOKENS
    return (np.arange(base, base + TOKENS, dtype=np.int64) * 2_654_435_761) % 4_000_000_000


def reader(name: str, seconds: float, go, q) -> None:
    from shmcache import Reader

    r = Reader.attach(name)
    prompts = [prompt(i) for i in range(PREFILL)]
    rng = np.random.default_rng(os.getpid())
    order = rng.integers(0, PREFILL, 1 << 16)
    clock = time.perf_counter_ns
    samples = []
    go.wait()  # a barrier: every process attached, the clock starts for all at once
    end = clock() + int(seconds * 1e9)
    n = 0
    while True:
        t0 = clock()
        if t0 >= end:
            break
        r.match_prefix(prompts[order[n & 0xFFFF]])
        samples.append(clock() - t0)
        n += 1
    r.close()
    q.put((n, samples[:: max(1, len(samples) // 20000)]))


def writer(name: str, seconds: float, rate: float, go, q) -> None:
    """Open the segment and insert fresh 128-block prompts at ``rate`` blocks/s."""
    from shmcache import Writer

    w = Writer.open(name)
    go.wait()
    start = time.perf_counter()
    done = 0
    i = PREFILL
    while (now := time.perf_counter()) - start < seconds:
        if done < rate * (now - start):
            w.insert(prompt(i), np.arange(i * 128, (i + 1) * 128))
            done += 128
            i += 1
        else:
            time.sleep(0.0005)  # pacing: the writer is rate-limited on purpose
    q.put(done / (time.perf_counter() - start))
    w.close()


def run(name: str, n_readers: int, seconds: float, rate: float | None):
    ctx = mp.get_context("spawn")
    go = ctx.Barrier(n_readers + (1 if rate else 0) + 1)
    q, wq = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=reader, args=(name, seconds, go, q)) for _ in range(n_readers)]
    if rate:
        procs.append(ctx.Process(target=writer, args=(name, seconds, rate, go, wq)))
    for p in procs:
        p.start()
    go.wait()
    results = [q.get(timeout=600) for _ in range(n_readers)]
    achieved = wq.get(timeout=600) if rate else 0.0
    for p in procs:
        p.join()
    total = sum(n for n, _ in results)
    p50, p99 = percentiles([s for _, ss in results for s in ss])
    return total / seconds, p50, p99, achieved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=50_000, help="writer insert rate, blocks/s")
    args = ap.parse_args()
    from shmcache import Writer

    name = f"scale-{uuid.uuid4().hex[:8]}"
    capacity = (PREFILL + int(args.rate * args.seconds * 3 / 128) + 64) * 128
    w = Writer.create(name, capacity=capacity, block_size=BS)
    try:
        for i in range(PREFILL):
            w.insert(prompt(i), np.arange(i * 128, (i + 1) * 128))
        w.close()
        print(f"machine: {machine()}")
        print(f"segment: {PREFILL * 128:,} cached blocks; readers match random cached 2,048-token prompts")
        print(f"{'readers':>7s} {'writer':>18s} {'matches/s':>11s} {'per reader':>11s} {'p50 µs':>8s} {'p99 µs':>8s}")
        for n in (1, 2, 4):
            for rate in (None, args.rate):
                total, p50, p99, achieved = run(name, n, args.seconds, rate)
                label = "none (baseline)" if not rate else f"{achieved:,.0f} blk/s"
                print(f"{n:>7d} {label:>18s} {total:>11,.0f} {total / n:>11,.0f} {p50:>8.2f} {p99:>8.2f}", flush=True)
    finally:
        from shmcache import unlink

        unlink(name)


if __name__ == "__main__":
    main()
