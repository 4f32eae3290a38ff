"""Soak: a writer churning at a fixed rate, reader processes checking every answer.

    python tools/soak.py --minutes 30 --out soak-results

The writer process inserts, removes, evicts, pins and unpins at ``--rate``
operations/s on a small segment, so blocks come and go all the time. Block
values are a function of their prefix, so each reader process checks every
answer it gets without a log (any other value is a violation). Once a second
the main process samples, for every process, its USS (psutil's
``memory_full_info``: RSS would count the shared segment's touched pages and
hide a leak) and open file descriptors, plus the segment's occupancy and the
``/dev/shm`` entries, and writes them to ``soak.csv``; with matplotlib
installed (``pip install 'shmcache[plot]'``) also ``soak.png``.

Exits 1 on any violation or when a reader's USS grows by more than
``--uss-limit-mib`` between the first sample after warm-up and the last.
Everything it starts stops by itself when the time is up.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import sys
import time
import uuid

import numpy as np

BS = 4
ALPHABET = 6
DEPTH = 6
FIELDS = ["t_s", "ops", "matches", "violations", "live_blocks", "occupancy", "shm_entries"]


def value(prefix) -> int:
    """Distinct for every prefix of the universe (base ALPHABET+1, no zero digit)."""
    return sum((x + 1) * (ALPHABET + 1) ** i for i, x in enumerate(prefix))


def random_prompt(rng) -> tuple:
    return tuple(int(x) for x in rng.integers(0, ALPHABET, int(rng.integers(1, DEPTH + 1))))


def tokens(prompt: tuple) -> np.ndarray:
    return np.repeat(np.asarray(prompt, dtype=np.int64), BS)


def expected(prompt: tuple) -> list[int]:
    return [value(prompt[: i + 1]) for i in range(len(prompt))]


def writer_loop(name: str, rate: float, stop, counters) -> None:
    from shmcache import CacheFullError, InvalidInputError, Writer

    w = Writer.open(name)
    rng = np.random.default_rng(1)
    pinned: list[tuple] = []
    start = time.perf_counter()
    ops = 0
    while not stop.is_set():
        if ops >= rate * (time.perf_counter() - start):
            time.sleep(0.0005)  # pacing to the fixed rate
            continue
        r = rng.random()
        p = random_prompt(rng)
        try:
            if r < 0.6:
                w.insert(tokens(p), expected(p))
            elif r < 0.7:
                w.remove([value(p)])
            elif r < 0.8:
                w.evict(int(rng.integers(1, 8)))
            elif r < 0.9:
                if pinned and (len(pinned) > 32 or rng.random() < 0.5):
                    w.unpin(tokens(pinned.pop(int(rng.integers(len(pinned))))))
                else:
                    w.pin(tokens(p))
                    pinned.append(p)
            else:
                w.match_prefix(tokens(p))
        except (CacheFullError, InvalidInputError):
            pass
        ops += 1
        counters[0] = ops
    w.close()


def reader_loop(name: str, index: int, stop, counters) -> None:
    from shmcache import Reader

    r = Reader.attach(name)
    rng = np.random.default_rng(100 + index)
    matches = violations = 0
    while not stop.is_set():
        p = random_prompt(rng)
        got = r.match_prefix(tokens(p)).values.tolist()
        violations += got != expected(p)[: len(got)]
        matches += 1
        if matches % 256 == 0:
            counters[1 + 2 * index] = matches
            counters[2 + 2 * index] = violations
    counters[1 + 2 * index] = matches
    counters[2 + 2 * index] = violations
    r.close()


def soak(minutes: float, readers: int, rate: float, capacity: int, out_dir: str, warmup_s: float = 10.0) -> dict:
    """Run the soak; returns the summary (also written beside the CSV)."""
    import psutil

    from shmcache import Reader, Writer

    os.makedirs(out_dir, exist_ok=True)
    name = f"soak-{uuid.uuid4().hex[:8]}"
    Writer.create(name, capacity=capacity, block_size=BS).close()
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    counters = ctx.Array("q", 1 + 2 * readers, lock=False)
    procs = {"writer": ctx.Process(target=writer_loop, args=(name, rate, stop, counters))}
    for i in range(readers):
        procs[f"reader{i}"] = ctx.Process(target=reader_loop, args=(name, i, stop, counters))
    rows, uss, fds = [], {k: [] for k in procs}, {k: [] for k in procs}
    t0 = time.perf_counter()
    try:
        for p in procs.values():
            p.start()
        probe = Reader.attach(name)
        handles = {k: psutil.Process(p.pid) for k, p in procs.items()}
        while time.perf_counter() - t0 < minutes * 60:
            time.sleep(1.0)  # the sampling period
            t = time.perf_counter() - t0
            stats = probe.stats()
            row = {
                "t_s": round(t, 1),
                "ops": counters[0],
                "matches": sum(counters[1 + 2 * i] for i in range(readers)),
                "violations": sum(counters[2 + 2 * i] for i in range(readers)),
                "live_blocks": stats["live_blocks"],
                "occupancy": round(stats["occupancy"], 4),
                "shm_entries": len(os.listdir("/dev/shm")),
            }
            for k, h in handles.items():
                row[f"uss_mib_{k}"] = round(h.memory_full_info().uss / 2**20, 2)
                row[f"fds_{k}"] = h.num_fds()
                uss[k].append((t, row[f"uss_mib_{k}"]))
                fds[k].append(row[f"fds_{k}"])
            rows.append(row)
        final = probe.stats()
        probe.close()
    finally:
        stop.set()
        for p in procs.values():
            p.join(60)
            if p.is_alive():
                p.kill()
                p.join()
        from shmcache import unlink

        unlink(name)
    with open(os.path.join(out_dir, "soak.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    def after_warmup(series: list) -> list:
        """Samples from ``warmup_s`` on (processes start, attach and compile first)."""
        return [x for r, x in zip(rows, series) if r["t_s"] >= warmup_s] or series

    def growth(series: list[tuple[float, float]]) -> float:
        after = [u for _, u in after_warmup(series)]
        return after[-1] - after[0]

    summary = {
        "seconds": round(time.perf_counter() - t0, 1),
        "ops": counters[0],
        "matches": sum(counters[1 + 2 * i] for i in range(readers)),
        "violations": sum(counters[2 + 2 * i] for i in range(readers)),
        "uss_start_end_mib": {k: (v[0][1], v[-1][1]) for k, v in uss.items()},
        "uss_growth_after_warmup_mib": {k: round(growth(v), 2) for k, v in uss.items()},
        "fds_start_end": {k: (after_warmup(v)[0], v[-1]) for k, v in fds.items()},
        "shm_entries_start_end": (rows[0]["shm_entries"], rows[-1]["shm_entries"]),
        "occupancy_min_max": (min(r["occupancy"] for r in rows), max(r["occupancy"] for r in rows)),
        "evicted_blocks": final["evicted_blocks"],
        "removed_blocks": final["removed_blocks"],
    }
    _plot(rows, list(procs), os.path.join(out_dir, "soak.png"))
    return summary


def _plot(rows: list[dict], names: list[str], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    t = [r["t_s"] for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for k in names:
        a.plot(t, [r[f"uss_mib_{k}"] for r in rows], label=k)
    a.set_ylabel("USS (MiB)")
    a.legend()
    b.plot(t, [r["occupancy"] for r in rows], label="occupancy")
    b.set_ylabel("occupancy")
    b.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=2000, help="writer operations per second")
    ap.add_argument("--capacity", type=int, default=300, help="blocks (small, so eviction never stops)")
    ap.add_argument("--out", default="soak-results")
    ap.add_argument("--uss-limit-mib", type=float, default=8.0)
    args = ap.parse_args()
    s = soak(args.minutes, args.readers, args.rate, args.capacity, args.out)
    for k, v in s.items():
        print(f"{k}: {v}")
    bad = s["violations"] or any(g > args.uss_limit_mib for k, g in s["uss_growth_after_warmup_mib"].items() if k.startswith("reader"))
    print("FAIL" if bad else "OK")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
