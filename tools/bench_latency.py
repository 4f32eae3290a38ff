"""Benchmark: match latency in the cases a serving engine meets (issue 14).

    python tools/bench_latency.py            # ~1.1M cached blocks
    python tools/bench_latency.py --quick    # 131k blocks, fewer samples

The writer (this process) fills a segment with 16-token blocks: prompts of
2,048 tokens (128 blocks), distinct from their first block. A reader in a
spawned process then times ``match_prefix`` of int64 arrays, per call, in
these cases, each against a baseline timed in the same run:

* ``same prompt``: one cached 2k prompt again and again (the best case, and
  the baseline of the next three);
* ``200 prompts, interleaved``: 200 distinct cached 2k prompts in turn,
  each call followed by the work a vLLM-style dict index does for another
  prompt (``bench_match``'s baseline); compared with that dict work;
* ``random prompt``: a random cached 2k prompt of the whole segment, its
  tokens read just before (an engine matches what it just tokenized);
* ``segment-cold``: before each call a 64 MB sweep evicts the CPU caches,
  then the prompt's tokens are touched and the code path is warmed by a
  16-token miss; the timed match is then a 2k all-hit;
* ``131k, first block misses``: a 131,072-token prompt not cached at all,
  against a 16-token miss;
* ``131k, 128 blocks hit``: a cached 2k prompt followed by 129,024 tokens
  that miss, against ``same prompt``.

Prints the machine, p50 and p99 in µs, and each ratio (p50 over p50, p99
over p99).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_match import baseline_match, baseline_table, machine, percentiles  # noqa: E402

BS = 16
PROMPT = 2048
LONG = 131_072
SWEEP = np.zeros(64 << 20, dtype=np.uint8)


def prompt_tokens(i: int) -> np.ndarray:
    """Cached prompt ``i``: 2,048 ids, distinct from every other prompt's from
    the first block on."""
    return (np.arange(PROMPT, dtype=np.int64) + i * PROMPT) % (2**32 - 1)


def timed(fn, arg) -> int:
    t0 = time.perf_counter_ns()
    fn(arg)
    return time.perf_counter_ns() - t0


def reader_process(name: str, n_prompts: int, samples: int, q) -> None:
    from shmcache import Reader

    r = Reader.attach(name)
    match = r.match_prefix
    rng = np.random.default_rng(7)
    same = prompt_tokens(0)
    miss16 = np.arange(16, dtype=np.int64) + 2**31  # never cached
    long_miss = np.arange(LONG, dtype=np.int64) + 2**31
    long_hit = np.concatenate([prompt_tokens(1), long_miss[: LONG - PROMPT]])
    two_hundred = [prompt_tokens(int(i)) for i in rng.choice(n_prompts, 200, replace=False)]
    lists = [p.tolist() for p in two_hundred]
    table = baseline_table(lists)
    # Correctness first: every figure below is for the answer it claims.
    assert match(same).length == PROMPT and match(long_hit).length == PROMPT
    assert match(long_miss).length == 0 and match(miss16).length == 0
    assert all(match(p).length == PROMPT for p in two_hundred)
    assert all(len(baseline_match(table, p)) == PROMPT // BS for p in lists)

    out: dict[str, list[int]] = {k: [] for k in (
        "same", "interleaved", "dict", "random", "cold", "miss16", "long_miss", "long_hit")}
    for _ in range(samples):
        out["same"].append(timed(match, same))
        out["miss16"].append(timed(match, miss16))
        out["long_miss"].append(timed(match, long_miss))
        out["long_hit"].append(timed(match, long_hit))
    for k in range(samples):
        i = k % 200
        out["interleaved"].append(timed(match, two_hundred[i]))
        t0 = time.perf_counter_ns()
        baseline_match(table, lists[(i + 1) % 200])
        out["dict"].append(time.perf_counter_ns() - t0)
    randoms = [prompt_tokens(int(i)) for i in rng.integers(0, n_prompts, samples)]
    for p in randoms:
        p.sum()
        out["random"].append(timed(match, p))
    for p in randoms[: max(samples // 10, 50)]:
        np.add(SWEEP, 1, out=SWEEP)  # writes 64 MB: the CPU caches now hold the sweep, not the segment
        p.sum()
        match(miss16)
        out["cold"].append(timed(match, p))
    r.close()
    q.put({k: percentiles(v) for k, v in out.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="131k blocks and fewer samples")
    args = ap.parse_args()
    from shmcache import Writer

    n_prompts = 1024 if args.quick else 8704  # x 128 blocks: 131k or 1.11M
    samples = 500 if args.quick else 3000
    name = f"bench-latency-{uuid.uuid4().hex[:8]}"
    print(f"machine: {machine()}")
    w = Writer.create(name, capacity=n_prompts * PROMPT // BS + 4096, block_size=BS)
    try:
        for i in range(n_prompts):
            w.insert(prompt_tokens(i), np.arange(PROMPT // BS, dtype=np.int64) + i * (PROMPT // BS))
        print(f"segment: {w.stats()['live_blocks']:,} cached blocks of 16 tokens")
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=reader_process, args=(name, n_prompts, samples, q))
        p.start()
        res = q.get(timeout=1800)
        p.join()
    finally:
        w.close()
        import shmcache

        shmcache.unlink(name)

    def row(label: str, case: str, base: str | None, how: str) -> None:
        p50, p99 = res[case]
        ratio = ""
        if base is not None:
            b50, b99 = res[base]
            ratio = f"{p50 / b50:6.2f}x {p99 / b99:6.2f}x  {how}"
        print(f"{label:<36s} {p50:9.2f} {p99:9.2f}  {ratio}")

    print(f"\n{'case (int64 arrays, reader process)':<36s} {'p50 µs':>9s} {'p99 µs':>9s}  ratio p50, p99")
    row("same 2k prompt (warm)", "same", None, "")
    row("200 prompts, interleaved", "interleaved", "same", "of same prompt")
    row("  dict baseline, interleaved", "dict", "interleaved", "dict / shmcache: the speedup")
    row("random prompt of the segment", "random", "same", "of same prompt")
    row("segment-cold 2k all-hit", "cold", "same", "of same prompt")
    row("16-token miss", "miss16", None, "")
    row("131k, first block misses", "long_miss", "miss16", "of 16-token miss")
    row("131k, 128 blocks hit", "long_hit", "same", "of same prompt")


if __name__ == "__main__":
    main()
