"""Spawned-process workers for the concurrency tests, and the snapshot checker.

The writer logs every change it makes, one event per state added or dropped,
in the order it makes them, grouped by operation; the header's MUTATIONS
word equals 2 x operations completed. A reader records MUTATIONS before and
after each match. The checker then finds, for each result, an instant (a
point between two events) inside the call's window at which every returned
block was present with the returned value.

Nothing here leaves what a test checks to scheduling luck: every process
loads its kernels before the churn starts, and readers run until they have
seen what their test needs (``Goal``: answers that overlapped a write, ...),
bounded by time; a reader that runs out of time exits with ``SHORT``.
"""

from __future__ import annotations

import bisect
import os
import pickle
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

BS = 4
#: Exit code of a reader that ran out of time before reaching its goal.
SHORT = 3
#: ``pin_reader_main``'s column 14 when it could not tell.
UNKNOWN = 2


class Goal(NamedTuple):
    """What one reader must see before it stops: at least ``rounds`` calls,
    and ``counts`` of the rows its ``tally`` counts (``reader_main``: answers
    that overlapped a write, and those with two blocks or more;
    ``pin_reader_main``: non-empty pinned answers, and plain answers the
    writer dropped while they were held), within ``seconds``."""

    rounds: int
    counts: tuple[int, ...]
    seconds: float = 120.0


def _run_to_goal(goal: Goal, one_round, tally) -> np.ndarray:
    """Call ``one_round(t)`` (a row) in chunks until ``tally(rows)`` reaches
    ``goal.counts`` after ``goal.rounds`` rows; exits ``SHORT`` at the deadline."""
    chunks: list[np.ndarray] = []
    t = 0
    deadline = time.monotonic() + goal.seconds
    while True:
        chunk = np.stack([one_round(t + j) for j in range(1000)])
        chunks.append(chunk)
        t += len(chunk)
        rows = np.concatenate(chunks)
        if t >= goal.rounds and all(c >= want for c, want in zip(tally(rows), goal.counts)):
            return rows
        if time.monotonic() > deadline:
            print(f"reader {os.getpid()}: {t} rounds, tally {tally(rows)} short of {goal}", flush=True)
            os._exit(SHORT)


def prompt_pool(seed: int, n: int = 48, alphabet: int = 3, max_blocks: int = 8) -> list[np.ndarray]:
    """Prompts whose block ids come from a small alphabet, so prefixes are widely shared."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, alphabet, size=int(rng.integers(1, max_blocks + 1)))
        out.append(np.repeat(ids, BS).astype(np.int64))
    return out


def writer_main(name, capacity, seed, ready, stop, log_path, max_ops, max_seconds, crash_step=0, explicit_drops=True):
    """Create the segment and churn inserts, removes, evictions, pins and clears until told to stop.

    With ``explicit_drops=False`` blocks leave only by eviction (removes and
    clears become evictions), as reader pins promise nothing against those.
    """
    import shmcache
    from shmcache import CacheFullError, Writer
    from shmcache.layout import H_MUTATIONS

    from shmcache.warmup import warm_writer

    warm_writer(BS)  # every writer kernel loaded before the readers start
    evicted: list[int] = []
    w = Writer.create(name, capacity=capacity, block_size=BS, seed=seed, on_evict=lambda v: evicted.extend(v.tolist()))
    pool = prompt_pool(seed)
    keys = [[(int(a), int(b)) for a, b in w.block_keys(p)] for p in pool]
    key_of: dict[int, tuple[int, int]] = {}
    ops: list[tuple[int, list]] = []
    rng = np.random.default_rng(seed + 1)
    next_value = 1
    pinned: list = []  # WriterPin handles
    ready.set()
    deadline = time.monotonic() + max_seconds
    if crash_step:
        w._crash_at_step(crash_step)
    while not stop.is_set() and len(ops) < max_ops and time.monotonic() < deadline:
        r = rng.random()
        events: list = []
        try:
            if r < 0.6:
                i = int(rng.integers(len(pool)))
                n = len(keys[i])
                values = np.arange(next_value, next_value + n)
                next_value += n
                evicted.clear()
                try:
                    cached = w.insert(pool[i], values) // BS
                    end = n
                except CacheFullError as e:
                    if not e.inserted_blocks:
                        raise
                    cached = e.cached_tokens // BS  # readers pinned mid-insert: a prefix went in
                    end = cached + e.inserted_blocks
                events += [("del", key_of.pop(v)) for v in evicted]
                for j in range(cached, end):
                    key_of[int(values[j])] = keys[i][j]
                    events.append(("add", keys[i][j], int(values[j])))
            elif r < 0.7 and explicit_drops:
                live = list(key_of)
                pick = [live[int(rng.integers(len(live)))]] if live else [10**12]
                events += [("del", key_of.pop(v)) for v in w.remove(pick).tolist()]
            elif r < 0.8:
                events += [("del", key_of.pop(v)) for v in w.evict(int(rng.integers(1, 4))).tolist()]
            elif r < 0.9:
                if pinned and rng.random() < 0.5:
                    w.unpin(pinned.pop())
                else:
                    pinned.append(w.pin(pool[int(rng.integers(len(pool)))]))
            elif r < 0.905 and explicit_drops:
                events += [("del", key_of.pop(v)) for v in w.clear().tolist()]
            else:
                continue
        except (CacheFullError, shmcache.InvalidInputError):
            continue
        ops.append((int(w._map.data[H_MUTATIONS]) // 2, events))
    with open(log_path, "wb") as f:
        pickle.dump(ops, f)
    w.close()


def run_churn(spawn, name, seed, tmp_path, reader_target, n_readers, goal: Goal, explicit_drops=True, writer=None):
    """Run a writer process and ``n_readers`` spawned processes of
    ``reader_target(name, seed, ready, go, goal, out_path)`` until every
    reader has reached ``goal``. The writer is ``writer_main`` (capacity 40)
    unless ``writer(ready, stop, log_path)`` names another as ``(target,
    args)``; it sets ``ready`` once readers may attach, churns until
    ``stop``, then writes its log. Returns the log and the readers' rows,
    stacked."""
    ready, go, stop = spawn.Event(), spawn.Event(), spawn.Event()
    log = tmp_path / "writer.pkl"
    if writer is None:
        target, args = writer_main, (name, 40, seed, ready, stop, str(log), 10**8, goal.seconds + 300, 0, explicit_drops)
    else:
        target, args = writer(ready, stop, str(log))
    writer = spawn.Process(target=target, args=args)
    outs = [tmp_path / f"reader{i}.npy" for i in range(n_readers)]
    warm = [spawn.Event() for _ in outs]
    readers = [spawn.Process(target=reader_target, args=(name, seed, ready, (w, go), goal, str(o)))
               for o, w in zip(outs, warm)]
    writer.start()
    try:
        for p in readers:
            p.start()
        assert ready.wait(300), "writer did not start"
        for e in warm:
            assert e.wait(300), "a reader did not start"
        go.set()
        for p in readers:
            p.join(goal.seconds + 300)
            assert p.exitcode != SHORT, f"a reader did not reach {goal} in {goal.seconds} s"
            assert p.exitcode == 0, f"reader exited with {p.exitcode}"
        stop.set()
        writer.join(120)
        assert writer.exitcode == 0
    finally:
        for p in [writer, *readers]:
            if p.is_alive():
                p.kill()
            p.join()
    return pickle.loads(log.read_bytes()), np.concatenate([np.load(o) for o in outs])


def pool_keys_of(name: str, seed: int) -> list[list[tuple[int, int]]]:
    """The chained keys of every pool prompt, under segment ``name``'s seed."""
    from shmcache import Reader

    with Reader.attach(name) as r:
        return [[(int(a), int(b)) for a, b in r.block_keys(p)] for p in prompt_pool(seed)]


def _attach_reader(name, seed, ready, start):
    """A reader process's start: wait for the writer, attach, load every
    kernel a reader runs (matching as arrays and lists, pinning), report
    warm and wait for the go. Returns the Reader, its header words, the
    prompt pool and a per-process RNG."""
    from shmcache import Reader

    warm, go = start
    ready.wait()
    r = Reader.attach(name)
    pool = prompt_pool(seed)
    r.match_prefix(pool[0])
    r.match_prefix(pool[0].tolist())
    r.unpin(r.match_and_pin(pool[0]))
    warm.set()
    go.wait()
    return r, r._map.data, pool, np.random.default_rng(os.getpid())


def reader_main(name, seed, ready, start, goal: Goal, out_path):
    """Attach and match random pool prompts; record (prompt, MUTATIONS
    before/after, result) until ``goal``: rows that overlapped a write, and
    those that also matched two blocks or more."""
    from shmcache.layout import H_MUTATIONS

    r, data, pool, rng = _attach_reader(name, seed, ready, start)

    def one_round(t: int) -> np.ndarray:
        row = np.zeros(4 + 8, dtype=np.int64)
        i = int(rng.integers(len(pool)))
        toks = pool[i] if t % 2 else pool[i].tolist()
        c0 = int(data[H_MUTATIONS])
        m = r.match_prefix(toks)
        c1 = int(data[H_MUTATIONS])
        k = m.length // BS
        row[:4] = (i, c0, c1, k)
        row[4 : 4 + k] = m.values
        return row

    def tally(rows: np.ndarray) -> tuple[int, int]:
        overlapped = rows[:, 1] != rows[:, 2]
        return int(overlapped.sum()), int((overlapped & (rows[:, 3] >= 2)).sum())

    np.save(out_path, _run_to_goal(goal, one_round, tally))
    del data
    r.close()


@dataclass
class Timeline:
    """Presence intervals of every key, in event positions, and op boundaries."""

    intervals: dict  # key -> (starts, ends, values): present at instants [start, end)
    op_end: dict  # op number -> instant right after its last event

    @classmethod
    def from_log(cls, ops: list[tuple[int, list]]) -> "Timeline":
        open_: dict = {}
        closed: dict = {}
        op_end = {0: 0}
        t = 0
        for op, events in ops:
            for ev in events:
                t += 1
                if ev[0] == "add":
                    open_[ev[1]] = (t, ev[2])
                else:
                    start, value = open_.pop(ev[1])
                    closed.setdefault(ev[1], []).append((start, t, value))
            op_end[op] = t
        for key, (start, value) in open_.items():
            closed.setdefault(key, []).append((start, 10**18, value))
        intervals = {k: ([a for a, _, _ in v], [b for _, b, _ in v], [c for _, _, c in v]) for k, v in closed.items()}
        return cls(intervals, op_end)

    def boundary(self, op: int) -> int:
        """Instant after op ``op`` completed (ops that logged nothing share the previous one's)."""
        while op not in self.op_end:
            op -= 1
        return self.op_end[op]

    def present(self, key, value, lo: int, hi: int) -> list[tuple[int, int]]:
        """Ranges of instants in [lo, hi] at which ``key`` held ``value``."""
        if key not in self.intervals:
            return []
        starts, ends, values = self.intervals[key]
        out = []
        i = bisect.bisect_right(starts, hi) - 1
        while i >= 0 and ends[i] > lo:
            if values[i] == value:
                out.append((max(starts[i], lo), min(ends[i] - 1, hi)))
            i -= 1
        return out


def violations(timeline: Timeline, pool_keys: list, rows: np.ndarray) -> list[str]:
    """Every reader result that was not the cache's content at one instant of its call."""
    bad = []
    for i, c0, c1, k, *vals in rows.tolist():
        lo, hi = timeline.boundary(c0 // 2), timeline.boundary((c1 + 1) // 2)
        ranges = [(lo, hi)]
        for j in range(k):
            present = timeline.present(pool_keys[i][j], vals[j], lo, hi)
            ranges = [(max(a, c), min(b, d)) for a, b in ranges for c, d in present if max(a, c) <= min(b, d)]
            if not ranges:
                bad.append(f"prompt {i} window ops {c0 // 2}..{(c1 + 1) // 2}: blocks 0..{j} {vals[: j + 1]} never all present at once")
                break
    return bad


def pin_reader_main(name, seed, ready, start, goal: Goal, out_path, hold=16):
    """Alternate pinned and plain matches of pool prompts, holding each answer
    for ``hold`` further matches, the last of them the same prompt again;
    record MUTATIONS before the call, after it and after the hold, so the
    checker can see what the writer did while the answer was held, and
    whether the answer's blocks were all still there at the end of the hold
    (column 14: 1 or 0, from a match again that no write overlapped, so
    that a shorter answer means a block is gone; ``UNKNOWN`` if every such
    match overlapped one). Runs until ``goal``: non-empty pinned answers, and plain
    answers with a block dropped while held (the control: pins matter)."""
    from shmcache.layout import H_MUTATIONS

    r, data, pool, rng = _attach_reader(name, seed, ready, start)

    def one_round(t: int) -> np.ndarray:
        row = np.zeros(4 + 8 + 3, dtype=np.int64)
        i = int(rng.integers(len(pool)))
        pin = t % 2 == 0
        c0 = int(data[H_MUTATIONS])
        m = r.match_and_pin(pool[i]) if pin else r.match_prefix(pool[i])
        c1 = int(data[H_MUTATIONS])
        for _ in range(hold - 1):
            r.match_prefix(pool[int(rng.integers(len(pool)))])
        k = m.length // BS
        still = UNKNOWN
        for _ in range(1000):  # a match that overlapped a write may be shorter: only a clean one tells
            before = int(data[H_MUTATIONS])
            again = r.match_prefix(pool[i]).values
            if before % 2 == 0 and int(data[H_MUTATIONS]) == before:
                still = int(len(again) >= k and bool((again[:k] == m.values).all()))
                break
        c2 = int(data[H_MUTATIONS])
        if pin:
            r.unpin(m)
        row[:4] = (i, c0, c1, k)
        row[4 : 4 + k] = m.values
        row[12:] = (pin, c2, still)
        return row

    def tally(rows: np.ndarray) -> tuple[int, int]:
        pinned = rows[:, 12] == 1
        return int((pinned & (rows[:, 3] > 0)).sum()), int((~pinned & (rows[:, 3] > 0) & (rows[:, 14] == 0)).sum())

    np.save(out_path, _run_to_goal(goal, one_round, tally))
    del data
    r.close()


def dropped_by_op(ops: list[tuple[int, list]]) -> dict[int, set[int]]:
    """Values each logged op dropped (a "del" names a key; its value is the
    one the key held then)."""
    value_of: dict = {}
    out: dict[int, set[int]] = {}
    for op, events in ops:
        for ev in events:
            if ev[0] == "add":
                value_of[ev[1]] = ev[2]
            else:
                out.setdefault(op, set()).add(value_of.pop(ev[1]))
    return out


def dropped_while_held(dropped: dict[int, set[int]], rows: np.ndarray) -> list[int]:
    """Rows (``pin_reader_main`` format) some of whose values an op dropped
    after the match returned and before the answer was released: ops
    numbered ``c1 // 2 + 1 .. c2 // 2`` (op m ends when MUTATIONS reaches
    2m; one in flight at ``c1`` counts, as it could still evict)."""
    bad = []
    for t, row in enumerate(rows.tolist()):
        c1, k, c2 = row[2], row[3], row[13]
        values = set(row[4 : 4 + k])
        if values and any(values & dropped.get(op, set()) for op in range(c1 // 2 + 1, c2 // 2 + 1)):
            bad.append(t)
    return bad


def pin_and_hold(name, prompts, ready, release, out):
    """Attach, pin each prompt with ``match_and_pin``, report what was pinned,
    then hold the pins until ``release`` (or 120 s) or until killed."""
    from shmcache import Reader

    r = Reader.attach(name)
    handles = [r.match_and_pin(p) for p in prompts]
    out.put([h.values.tolist() for h in handles])
    ready.set()
    release.wait(120)
    r.close()
