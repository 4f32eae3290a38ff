"""``shmcache demo``: the main job end to end, needing nothing but the package.

Part 1 starts a writer daemon (``shmcache serve``, a child process) and
several worker processes, and replays the bundled Mooncake trace: worker
``w`` takes requests ``w, w + W, w + 2W, ...``; for each one it matches the
prompt lock-free against the shared segment, then (after its simulated
prefill) inserts the prompt through the daemon, and counts the values of its
blocks the cache hands back. The main process shows a live progress line,
then a summary table and the dump of the segment, and stops everything it
started.

Part 2 (with the ``events`` extra: pyzmq, msgspec) is why shmcache exists:
a router places the same trace on 4 simulated data-parallel ranks by
round-robin, least-loaded and cache-aware (``Reader.match_owners``) routing
(``shmcache.routing``); for the last, the ranks publish vLLM-format KV
events to a daemon.
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing as mp
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable, TextIO

import numpy as np

from .cli import serve_command
from .replay import load_trace, prompt_tokens, unique_blocks
from .warmup import throwaway_writer, warm_events, warm_owners


def _worker(name: str, index: int, n_workers: int, trace, progress, done, drain, release, results) -> None:
    from .client import Client

    c = Client.connect(name)
    hits = prompt = inserted = delivered = 0
    latencies = []
    clock = time.perf_counter_ns
    next_value = index << 40
    for i in range(index, len(trace), n_workers):
        toks = prompt_tokens(*trace[i])
        t0 = clock()
        m = c.match_prefix(toks)
        latencies.append(clock() - t0)
        hits += m.length
        prompt += len(toks)
        n = len(toks) // c.block_size
        inserted += n - c.insert(toks, np.arange(next_value, next_value + n)) // c.block_size
        next_value += n
        delivered += len(c.poll_evicted())
        with progress.get_lock():
            progress.value += 1
    done.set()
    # Other workers' inserts keep evicting this worker's blocks until all are
    # done; then one round trip ensures every eviction pushed has arrived.
    drain.wait()
    c.remove([])
    delivered += len(c.poll_evicted())
    results.put((index, hits, prompt, inserted, delivered, latencies))
    release.wait()
    c.close()


HINT_AFTER_S = 5.0
COMPILING_HINT = ("  the daemon is not ready after 5 s: the first run after an install compiles its Numba kernels "
                  "into the on-disk cache (about a minute, once)")


def _start_daemon(name: str, capacity: int, block_size: int,
                  meanwhile: Callable[[], object] | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``shmcache serve`` for the segment, call ``meanwhile()`` (if
    given) while it gets ready, and return it with its ready line."""
    proc = subprocess.Popen(
        serve_command(name, "--capacity", str(capacity), "--block-size", str(block_size), "--log-level", "warning",
                      "--compile-alone"),
        stdout=subprocess.PIPE, bufsize=0,
    )
    start = time.monotonic()
    hinted = threading.Event()  # the hint is due 5 s after the start, while meanwhile() runs too

    def hint() -> None:
        print(COMPILING_HINT, file=sys.stderr, flush=True)
        hinted.set()

    timer = threading.Timer(HINT_AFTER_S, hint)
    timer.start()
    try:
        if meanwhile is not None:
            meanwhile()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        timer.cancel()
        timer.join()
    left = math.inf if hinted.is_set() else max(0.0, HINT_AFTER_S - (time.monotonic() - start))
    return proc, wait_ready(proc, hint_after=left)


def _warm(block_size: int, routing: bool) -> None:
    """What the demo's other processes use, compiled into the cache while
    its first daemon compiles the writer's kernels (on a first run; later
    runs load them): the workers' int64 match, the dump's check, and for
    part 2 the router's ``match_owners`` and the kernels its daemon adds for
    KV events. Only these: every reader kernel (``warm_reader``) took longer
    than the daemon's warm-up, which then waited for it."""
    from .dump import describe
    from .reader import Reader

    toks = np.arange(4 * block_size, dtype=np.int64)
    with throwaway_writer(block_size) as w, Reader.attach(w.name) as r:
        r.match_prefix(toks)
        describe(r, depth=1, width=1, check=True)
        if routing:
            r.match_owners(toks)
    if routing:
        warm_owners(block_size)
        warm_events()


def wait_ready(proc: subprocess.Popen, timeout: float = 900.0, hint_after: float = HINT_AFTER_S) -> str:
    """The ``ready ...`` line a daemon started with an unbuffered stdout pipe prints.

    Lines it prints before that (a library's output) are passed on to stderr.
    After ``hint_after`` seconds it says, once, that a first run compiles. If
    the daemon exits first, or is not ready in ``timeout`` seconds, it is
    killed (if still running) and reaped, and RuntimeError is raised.
    """
    fd = proc.stdout.fileno()
    start = time.monotonic()
    hint_at, deadline = start + hint_after, start + timeout
    pending = b""
    hinted = False
    while (now := time.monotonic()) < deadline:
        if not hinted and now >= hint_at:
            print(COMPILING_HINT, file=sys.stderr, flush=True)
            hinted = True
        if not select.select([fd], [], [], (deadline if hinted else min(hint_at, deadline)) - now)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            proc.wait()
            raise RuntimeError(
                f"the daemon exited (status {proc.returncode}) before it was ready: see its errors above"
            )
        *lines, pending = (pending + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if line.startswith("ready"):
                return line
            if line:
                print(f"  daemon: {line}", file=sys.stderr, flush=True)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"the daemon was not ready after {timeout:.0f} s")


def run(workers: int = 4, requests: int | None = None, capacity_fraction: float = 0.25, block_size: int = 16,
        out: TextIO | None = None, routing: bool = True) -> int:
    """Run the demo, printing to ``out`` (``sys.stdout`` at call time); 0 if
    every eviction reached its owner and the segment checked clean, else 1.
    ``routing``: also run part 2."""
    out = sys.stdout if out is None else out
    trace = load_trace(limit=requests)
    uniq = unique_blocks(trace, block_size)
    capacity = max(1, int(uniq * capacity_fraction))
    name = f"demo-{uuid.uuid4().hex[:8]}"
    print(f"shmcache demo: {len(trace):,} requests of the Mooncake synthetic trace, {uniq:,} unique blocks "
          f"of {block_size} tokens; segment {name!r} of {capacity:,} blocks ({capacity_fraction:.0%}); "
          f"{workers} workers", file=out)
    daemon, ready = _start_daemon(name, capacity, block_size, meanwhile=lambda: _warm(block_size, routing))
    print(f"daemon: {ready}", file=out)
    ctx = mp.get_context("spawn")
    progress = ctx.Value("q", 0)
    drain, release, results = ctx.Event(), ctx.Event(), ctx.Queue()
    dones = [ctx.Event() for _ in range(workers)]
    procs = [ctx.Process(target=_worker, args=(name, w, workers, trace, progress, dones[w], drain, release, results))
             for w in range(workers)]
    try:
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        pending = list(dones)
        while pending:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("a worker failed")
            rate = progress.value / max(time.perf_counter() - t0, 1e-9)
            print(f"\r  {progress.value:,}/{len(trace):,} requests  ({rate:,.0f}/s)", end="", file=sys.stderr, flush=True)
            pending[0].wait(0.25)  # refresh the progress line until every worker is done
            pending = [d for d in pending if not d.is_set()]
        wall = time.perf_counter() - t0
        print(f"\r  {len(trace):,}/{len(trace):,} requests in {wall:.1f} s", file=sys.stderr, flush=True)
        drain.set()
        rows = sorted(results.get(timeout=60) for _ in procs)
        from .dump import describe, render
        from .reader import Reader

        with Reader.attach(name) as r:
            info = describe(r, depth=2, width=3, check=True)
        evicted = info["counters"]["evicted_blocks"]
        lat = np.concatenate([np.asarray(row[5], dtype=np.float64) for row in rows]) / 1e3
        hits, prompt, inserted, delivered = (sum(row[k] for row in rows) for k in (1, 2, 3, 4))
        print(f"\n{'worker':>8s} {'requests':>9s} {'token hit rate':>15s} {'inserted blocks':>16s} {'evictions delivered':>20s}", file=out)
        for index, h, p_, ins, dl, l in rows:
            print(f"{index:>8d} {len(l):>9,d} {h / p_:>15.2%} {ins:>16,d} {dl:>20,d}", file=out)
        print(f"{'all':>8s} {len(lat):>9,d} {hits / prompt:>15.2%} {inserted:>16,d} {delivered:>20,d}", file=out)
        print(f"\nmatch latency p50 {np.percentile(lat, 50):.1f} µs, p99 {np.percentile(lat, 99):.1f} µs (lock-free, in each worker)", file=out)
        print(f"inserts: {inserted / wall:,.0f} new blocks/s through the daemon; evictions {evicted:,}, "
              f"delivered to their owners {delivered:,}", file=out)
        print("\n" + render(info), file=out)
        ok = delivered == evicted and not info["violations"]
    finally:
        drain.set()
        release.set()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
        if daemon.poll() is None:
            os.kill(daemon.pid, signal.SIGTERM)
        daemon.wait(60)
    print(f"\nstopped the daemon and {workers} workers; segment removed", file=out)
    if routing:
        routing_part(requests, capacity_fraction, out)
    return 0 if ok else 1


def routing_part(requests: int | None, capacity_fraction: float, out: TextIO, ranks: int = 4) -> None:
    """Part 2: the same trace over ``ranks`` simulated data-parallel ranks,
    routed three ways (``shmcache.routing``)."""
    if importlib.util.find_spec("zmq") is None or importlib.util.find_spec("msgspec") is None:
        print("\npart 2 (cache-aware routing over KV events) needs the events extra: pip install 'shmcache[events]'",
              file=out)
        return
    from .routing import POLICIES, Simulation, load_requests, shared_cache_hit_rate, table

    reqs = load_requests(requests)
    uniq = unique_blocks([(r.input_length, r.hash_ids) for r in reqs], 16)
    per_rank = max(1, int(uniq * capacity_fraction / ranks))
    print(f"\npart 2: {ranks} data-parallel ranks of {per_rank:,} KV blocks each; a router places each request "
          f"by round-robin, by least load, or by the longest prefix match_owners finds (load-balance guard on) "
          f"in one shmcache daemon, to which the ranks publish vLLM-format KV events (routing by round-robin or "
          f"least load reads nothing, so there the ranks publish nothing)", file=out)
    sim = Simulation(ranks, per_rank)
    results = []
    try:
        for policy in POLICIES:
            t0 = time.perf_counter()
            results.append(sim.run(reqs, policy))
            print(f"  {policy}: {len(reqs):,} requests in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    finally:
        sim.close()
    shared = shared_cache_hit_rate(reqs, per_rank * ranks)
    print(f"one cache of all {per_rank * ranks:,} blocks shared by every request would hit {shared:.1%} of tokens\n", file=out)
    print(table(results, shared), file=out)
