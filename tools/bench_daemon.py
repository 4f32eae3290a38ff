"""Benchmark: inserts through the writer daemon, from 1 and 2 producer processes.

    python tools/bench_daemon.py [--prompts 2000] [--spin-us 200] [--publish-events] [--rounds 5] [--control]

Starts ``shmcache serve`` as a child process, then producer processes that
each insert distinct 128-block prompts (2,048 tokens, block size 16) through
a Client, one round trip per insert. Reports aggregate blocks/s and the
per-insert round trip p50/p99, next to the same inserts into an embedded
Writer in this process (the baseline: no socket, no daemon). Then the round
trip of small requests (a 1-block insert, an empty remove) beside the floor
of this machine: a bare Python ping-pong over a Unix socket between two
processes. ``--spin-us`` sets how long the daemon and the clients poll
before they sleep (``shmcache serve --spin-us``, ``Client.connect(spin_us=)``).
``--publish-events`` also runs each daemon case publishing its changes as
KV events (``shmcache serve --publish-events`` with a replay socket), to nobody (the daemon's
own cost) and to a subscriber process (which shares this machine's cores);
publishing's own cost per insert, paired: two embedded Writers in one
process, one publishing, inserting the same prompts in turn (what the
daemon's figures are made of, without their spread); and an embedded
Writer under churn (every insert evicts as many blocks) with and without a
``Publisher``: whether publishing keeps up with 1M blocks/s. The daemon and churn cases run ``--rounds`` times,
alternating: each publishing run is compared with the plain run of its own
round, and the median, the middle half (p25-p75) and the range of those
ratios are printed. ``--control`` adds a second plain daemon to every
round, compared with the first like a publishing one: the spread of
ratios this machine gives two identical runs (an A/A test), against which
to read the others.
``--daemon-cpu N`` runs the daemon on CPU ``N`` alone and the producers and
the subscriber on the others, as on a serving node where the daemon has a
core of its own (on a 2-core machine the producers then share one core).
Prints the machine it ran on.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import select
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(__file__))
from bench_match import machine, percentiles  # noqa: E402

BS = 16
TOKENS = 2048


def prompt(producer: int, i: int) -> np.ndarray:
    base = (producer * 7_919 + i) * TOKENS
    return (np.arange(base, base + TOKENS, dtype=np.int64) * 2_654_435_761) % 4_000_000_000


def produce(name: str, index: int, n: int, go, q, spin_us: int, cpus: set[int] | None = None) -> None:
    from shmcache import Client

    if cpus is not None:
        os.sched_setaffinity(0, cpus)

    c = Client.connect(name, spin_us=spin_us)
    samples = []
    go.wait()
    t_all = time.perf_counter()
    for i in range(n):
        toks = prompt(index, i)
        values = np.arange(i * 128, (i + 1) * 128) + index * 10**9
        t0 = time.perf_counter_ns()
        c.insert(toks, values)
        samples.append(time.perf_counter_ns() - t0)
    q.put((time.perf_counter() - t_all, samples))
    c.close()


def serve(name: str, capacity: int, spin_us: int, publish: str | None = None, cpu: int | None = None) -> subprocess.Popen:
    extra = ["--publish-events", publish, "--publish-replay", publish + ".replay"] if publish else []
    proc = subprocess.Popen([sys.executable, "-m", "shmcache.cli", "serve", name, "--capacity", str(capacity),
                             "--block-size", str(BS), "--on-disconnect", "keep", "--log-level", "warning",
                             "--spin-us", str(spin_us), *extra],
                            stdout=subprocess.PIPE, text=True)
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    if not select.select([proc.stdout], [], [], 120)[0]:
        proc.kill()
        raise SystemExit("shmcache serve did not get ready")
    proc.stdout.readline()
    return proc


def consume(endpoint: str, ready, stop, q, cpus: set[int] | None = None) -> None:
    """A KV-event subscriber: counts the batches and bytes it receives until ``stop``."""
    import zmq

    if cpus is not None:
        os.sched_setaffinity(0, cpus)

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    ready.set()
    batches = size = 0
    while not stop.is_set() or sub.poll(200):
        if sub.poll(50):
            frames = sub.recv_multipart()
            batches += 1
            size += len(frames[2])
    q.put((batches, size))


def run(n_producers: int, n: int, spin_us: int, publish: bool = False,
        subscriber: bool = False, daemon_cpu: int | None = None) -> tuple[float, list[int], tuple | None, float]:
    """``n_producers`` processes each inserting ``n`` prompts through a new
    daemon (on CPU ``daemon_cpu`` alone, if given, and they on the others);
    returns the blocks/s, the round trips (ns), what a subscriber received
    (batches, bytes) and the daemon's CPU seconds per insert."""
    name = f"benchd-{uuid.uuid4().hex[:8]}"
    endpoint = f"ipc:///tmp/{name}.pub" if publish else None
    others = None if daemon_cpu is None else os.sched_getaffinity(0) - {daemon_cpu}
    proc = serve(name, n_producers * n * 128 + 1024, spin_us, endpoint, daemon_cpu)
    ctx = mp.get_context("spawn")
    go, q = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=produce, args=(name, i, n, go, q, spin_us, others)) for i in range(n_producers)]
    sub = None
    if subscriber:
        ready, stop, sq = ctx.Event(), ctx.Event(), ctx.Queue()
        sub = ctx.Process(target=consume, args=(endpoint, ready, stop, sq, others))
        sub.start()
        ready.wait(120)
    daemon = psutil.Process(proc.pid)
    try:
        for p in procs:
            p.start()
        cpu = sum(daemon.cpu_times()[:2])
        go.set()
        results = [q.get(timeout=1800) for _ in procs]
        cpu = sum(daemon.cpu_times()[:2]) - cpu
        for p in procs:
            p.join()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
    received = None
    if sub is not None:
        stop.set()
        received = sq.get(timeout=120)
        sub.join()
    wall = max(t for t, _ in results)
    return n_producers * n * 128 / wall, [s for _, ss in results for s in ss], received, cpu / (n_producers * n)


def embedded(n: int, churn: bool = False, publish: bool = False) -> tuple[float, list[int]]:
    """Inserts into a Writer in this process; ``churn``: a capacity of 64
    prompts, so every insert past them evicts 128 blocks; ``publish``: with
    a Publisher (to an ipc endpoint nobody reads) flushed when due, as the
    daemon does, the rate counting until everything is sent."""
    from shmcache import Writer

    name = f"benche-{uuid.uuid4().hex[:8]}"
    with Writer.create(name, capacity=64 * 128 if churn else n * 128 + 1024, block_size=BS) as w:
        pub = None
        if publish:
            from shmcache.publish import Publisher

            pub = Publisher(w, f"ipc:///tmp/{name}.pub", replay=f"ipc:///tmp/{name}.replay")
        samples = []
        t_all = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter_ns()
            w.insert(prompt(0, i), np.arange(i * 128, (i + 1) * 128))
            if pub is not None and pub.due(time.monotonic()):
                pub.flush()
            samples.append(time.perf_counter_ns() - t0)
        if pub is not None:
            pub.flush()
        rate = n * 128 / (time.perf_counter() - t_all)
        if pub is not None:
            pub.close()
        w.close(unlink=True)
    return rate, samples


def paired(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Publishing's own cost, apart from the daemon and from this machine's
    drift: two Writers in this process, one watched by a Publisher (to an
    ipc endpoint nobody reads, flushed when due, as the daemon does),
    insert the same prompts (uint32 tokens, as a daemon decodes them) in
    turn, each first every other time. Returns the plain inserts' times and
    the publishing ones' (ns), pair by pair, but for the first tenth (warm-up)."""
    from shmcache import Writer
    from shmcache.publish import Publisher

    names = [f"benchp-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    ws = [Writer.create(name, capacity=n * 128 + 1024, block_size=BS) for name in names]
    pub = Publisher(ws[1], f"ipc:///tmp/{names[1]}.pub", replay=f"ipc:///tmp/{names[1]}.replay")
    times = np.zeros((2, n), dtype=np.int64)
    try:
        for i in range(n):
            toks, values = prompt(0, i).astype(np.uint32), np.arange(i * 128, (i + 1) * 128)
            for k in (0, 1) if i % 2 else (1, 0):
                t0 = time.perf_counter_ns()
                ws[k].insert(toks, values)
                if k and pub.due(time.monotonic()):
                    pub.flush()
                times[k, i] = time.perf_counter_ns() - t0
    finally:
        pub.close()
        for w in ws:
            w.close(unlink=True)
    return times[0, n // 10 :], times[1, n // 10 :]


_ECHO = """
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
while True:
    msg = s.recv(64)
    if not msg:
        break
    s.sendall(msg)
"""


def ping_pong_floor(n: int = 5000) -> list[int]:
    """Round trips of a 24-byte message to an echo process over a Unix socket."""
    import socket

    a, b = socket.socketpair()
    echo = subprocess.Popen([sys.executable, "-c", _ECHO, str(b.fileno())], pass_fds=(b.fileno(),))
    b.close()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        a.sendall(b"x" * 24)
        a.recv(64)
        samples.append(time.perf_counter_ns() - t0)
    a.close()
    echo.wait(60)
    return samples[n // 10 :]


def small_round_trips(spin_us: int, n: int = 3000) -> tuple[list[int], list[int]]:
    from shmcache import Client

    name = f"benchr-{uuid.uuid4().hex[:8]}"
    proc = serve(name, n + 1024, spin_us)
    try:
        c = Client.connect(name, spin_us=spin_us)
        one, empty = [], []
        for i in range(n):
            toks = np.arange(BS, dtype=np.int64) + BS * i
            t0 = time.perf_counter_ns()
            c.insert(toks, [i])
            one.append(time.perf_counter_ns() - t0)
            t0 = time.perf_counter_ns()
            c.remove([])
            empty.append(time.perf_counter_ns() - t0)
        c.close()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
    return one[n // 10 :], empty[n // 10 :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2000, help="128-block prompts per producer")
    ap.add_argument("--spin-us", type=int, default=200, help="daemon and client poll time before sleeping")
    ap.add_argument("--publish-events", action="store_true", help="also with KV events published (issue 13)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds of the daemon (and churn) cases, alternating; rates are medians over rounds")
    ap.add_argument("--control", action="store_true",
                    help="also a second plain daemon per round, compared with the first: this machine's own spread")
    ap.add_argument("--daemon-cpu", type=int, default=None,
                    help="run the daemon on this CPU alone, the producers and the subscriber on the others")
    args = ap.parse_args()
    if args.daemon_cpu is not None and (args.daemon_cpu not in os.sched_getaffinity(0)
                                        or len(os.sched_getaffinity(0)) < 2):
        ap.error(f"--daemon-cpu must be one of the CPUs this process may use, {sorted(os.sched_getaffinity(0))}, "
                 "and leave at least one for the producers")
    pinned = "" if args.daemon_cpu is None else f"; daemon on CPU {args.daemon_cpu} alone, producers on the others"
    print(f"machine: {machine()}; spin {args.spin_us} µs{pinned}")
    print(f"{'case':38s} {'blocks/s':>12s} {'p50 µs':>9s} {'p99 µs':>9s} {'daemon CPU µs/insert':>9s}")
    rate, samples = embedded(args.prompts)
    p50, p99 = percentiles(samples)
    print(f"{'embedded Writer (baseline, no socket)':38s} {rate:12,.0f} {p50:9.1f} {p99:9.1f}")
    # (label, publish, subscriber); the first is the plain run every other is compared with.
    cases = [("", False, False)] + ([("control: plain again", False, False)] if args.control else []) + (
        [("publishing", True, False), ("publishing", True, True)] if args.publish_events else [])
    for n in (1, 2):
        # The cases alternate, round after round, so that a burst of noise on
        # this machine lands in every case, and each round's publishing runs
        # are compared with its own plain run.
        rates = {case: [] for case in cases}
        samples = {case: [] for case in cases}
        received, cpu = {}, {case: [] for case in cases}
        for _ in range(args.rounds):
            for case in cases:
                rate, ss, got, per_insert = run(n, args.prompts, args.spin_us, case[1], case[2], args.daemon_cpu)
                cpu[case].append(per_insert * 1e6)
                rates[case].append(rate)
                samples[case] += ss
                received[case] = got
        plain = np.array(rates[cases[0]])
        for case in cases:
            what, publish, subscriber = case
            p50, p99 = percentiles(samples[case])
            label = f"daemon, {n} producer process(es)" + (f", {what}" if what else "")
            note = ""
            if case is not cases[0]:
                ratios = np.array(rates[case]) / plain
                q25, q75 = np.percentile(ratios, [25, 75])
                note = f"  {np.median(ratios):.2f}x plain (middle half {q25:.2f}-{q75:.2f}, all {ratios.min():.2f}-{ratios.max():.2f})"
                if publish:
                    got = received[case]
                    note += ("; " + (f"a subscriber process got {got[0]:,} batches, {got[1] / 1e6:,.1f} MB (last round)"
                                     if subscriber else "no subscriber (the daemon's own cost)"))
            rate = float(np.median(rates[case]))
            print(f"{label:38s} {rate:12,.0f} {p50:9.1f} {p99:9.1f} {np.median(cpu[case]):9.1f}{note}")
    if args.publish_events:
        print()
        plain, publishing = paired(args.prompts)
        cost = publishing - plain
        p50, p99 = percentiles(plain)
        c50, c99 = percentiles(cost)
        print(f"{'embedded insert, plain':38s} {'':>12s} {p50:9.1f} {p99:9.1f}")
        print(f"{'... what publishing adds, paired':38s} {'':>12s} {c50:9.1f} {c99:9.1f}  "
              f"{plain.sum() / publishing.sum():.2f}x plain in all ({plain.size:,} pairs, one process)")
        rates, samples = {False: [], True: []}, {False: [], True: []}
        for _ in range(args.rounds):
            for publish in (False, True):
                rate, ss = embedded(args.prompts, churn=True, publish=publish)
                rates[publish].append(rate)
                samples[publish] += ss
        for label, publish in (("embedded churn (evicts 128 per insert)", False), ("embedded churn, publishing", True)):
            rate = float(np.median(rates[publish]))
            p50, p99 = percentiles(samples[publish])
            ratios = np.array(rates[True]) / np.array(rates[False])
            print(f"{label:38s} {2 * rate:12,.0f} {p50:9.1f} {p99:9.1f}  ({2 * rate / 1e6:.2f}M blocks/s stored + removed)"
                  + (f"  {np.median(ratios):.2f}x plain ({ratios.min():.2f}-{ratios.max():.2f})" if publish else ""))
    print()
    print(f"{'round trip':38s} {'':>12s} {'p50 µs':>9s} {'p99 µs':>9s}")
    one, empty = small_round_trips(args.spin_us)
    for label, samples in (("bare Python Unix-socket ping-pong (floor)", ping_pong_floor()),
                           ("daemon: 1-block insert", one), ("daemon: empty remove", empty)):
        p50, p99 = percentiles(samples)
        print(f"{label:38s} {'':>12s} {p50:9.1f} {p99:9.1f}")


if __name__ == "__main__":
    main()
