"""Guarantees 2 and 4: a writer killed mid-update never hangs a reader, and
the next writer repairs the segment, dropping exactly the half-written state.

One segment lives through several writer processes. Each one (after the
first) takes the segment over, checks what survived its predecessor's
death, commits a few prompts, then arms the crash hook and inserts a fresh
4-block prompt; the hook SIGKILLs it at the chosen step. The steps of such
an insert are: 1 opening the operation; then per block 3k+2 record odd,
3k+3 fields written, 3k+4 index slot; 14 closing it. Two reader processes
match throughout, and must keep answering while no writer is alive.
"""

from __future__ import annotations

import signal

import numpy as np

from shmcache import Reader, Writer

BS = 4
# (crash step, blocks of the crashing insert that survive, states recovery drops)
STEPS = [(1, 0, 0), (2, 0, 1), (3, 0, 1), (4, 1, 0), (6, 1, 1), (13, 4, 0), (14, 4, 0)]


def prompts(gen: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Committed prompts and the crashing prompt of writer generation ``gen``."""
    base = 1000 * (gen + 1)
    committed = [np.repeat(np.array([base, base + i, base + 10 + i]), BS) for i in range(3)]
    crashing = np.repeat(np.arange(base + 100, base + 104), BS)
    return committed, crashing


def writer_generation(name, gen, step, report):
    if gen == 0:
        w = Writer.create(name, capacity=512, block_size=BS)
        report.put(("opened", 0, [], True, 0))
    else:
        w = Writer.open(name)
        violations = []
        try:
            w.check()
        except Exception as e:  # report, do not die: the test asserts on it
            violations = getattr(e, "violations", [repr(e)])
        committed, crashing = prompts(gen - 1)
        intact = all(w.match_prefix(p).length == len(p) for p in committed)
        kept = w.match_prefix(crashing).length // BS
        report.put(("opened", w.recovered, violations, intact, kept))
    committed, crashing = prompts(gen)
    value = 10**6 * (gen + 1)
    for p in committed:
        n = len(p) // BS
        w.insert(p, np.arange(value, value + n))
        value += n
    w._crash_at_step(step)
    w.insert(crashing, np.arange(value, value + 4))
    report.put(("not killed", 0, [], True, 0))


def reader_loop(name, ready, dead, ack, stop, result):
    ready.wait(120)
    r = Reader.attach(name)
    rng = np.random.default_rng()
    pool = [p for g in range(len(STEPS)) for p in (*prompts(g)[0], prompts(g)[1])]
    matches = mixed = 0
    while not stop.is_set():
        burst = 1000 if dead.is_set() and not ack.is_set() else 1
        for _ in range(burst):
            m = r.match_prefix(pool[int(rng.integers(len(pool)))])
            matches += 1
            # Values grow along every path (children are inserted after their
            # parents, values increase across generations): a mixed answer breaks this.
            mixed += bool(np.any(np.diff(m.values) <= 0))
        if burst > 1:
            ack.set()
    r.close()
    result.put((matches, mixed))


def test_killed_writers_never_hang_readers_and_are_recovered(shm_name, spawn):
    ready, stop = spawn.Event(), spawn.Event()
    dead = spawn.Event()
    acks = [spawn.Event(), spawn.Event()]
    report, results = spawn.Queue(), spawn.Queue()
    readers = [spawn.Process(target=reader_loop, args=(shm_name, ready, dead, a, stop, results)) for a in acks]
    writers = []
    try:
        for p in readers:
            p.start()
        for gen, (step, _, _) in enumerate(STEPS):
            w = spawn.Process(target=writer_generation, args=(shm_name, gen, step, report))
            writers.append(w)
            w.start()
            what, recovered, violations, intact, got_kept = report.get(timeout=120)
            assert what == "opened"
            assert violations == [], violations
            assert intact, "a prompt committed before the crash was lost"
            if gen > 0:
                assert (got_kept, recovered) == (STEPS[gen - 1][1], STEPS[gen - 1][2])
            ready.set()
            w.join(120)
            assert w.exitcode == -signal.SIGKILL, f"writer {gen} was not killed at step {step}"
            for a in acks:
                a.clear()
            dead.set()
            for a in acks:
                assert a.wait(60), "a reader stopped answering while no writer was alive"
            dead.clear()
        stop.set()
        outcomes = [results.get(timeout=60) for _ in readers]
        for p in readers:
            p.join(60)
            assert p.exitcode == 0
    finally:
        for p in [*readers, *writers]:
            if p.is_alive():
                p.kill()
                p.join()
    assert all(matches > len(STEPS) * 1000 for matches, _ in outcomes)
    assert all(mixed == 0 for _, mixed in outcomes)
    with Writer.open(shm_name) as w:
        committed, crashing = prompts(len(STEPS) - 1)
        assert all(w.match_prefix(p).length == len(p) for p in committed)
        assert w.match_prefix(crashing).length // BS == STEPS[-1][1]
        assert w.recovered == STEPS[-1][2]
        w.check()
        assert w.stats()["live_blocks"] == sum(7 + kept for _, kept, _ in STEPS)  # 7 distinct committed blocks a generation


def test_a_created_segment_is_what_a_rebuild_makes_of_it(shm_name):
    """``Writer.create`` sets up its private arrays in NumPy
    (``wstate.init_empty``), so that a process that only creates segments
    never compiles ``recovery.rebuild``: the arrays and the segment are what
    a rebuild makes of a new segment, but for the mutation count and the
    clock, which a rebuild moves on as any operation does."""
    from shmcache.layout import H_CLOCK, H_MUTATIONS
    from shmcache.recovery import rebuild
    from shmcache.wstate import new_arrays

    with Writer.create(shm_name, capacity=40, block_size=4) as w:
        a = w._A
        data, wdata = a.data.copy(), a.wdata.copy()
        b = new_arrays(a.data, a.wdata, a.geom.copy())
        assert rebuild(b) == 0
        for field in a._fields:
            if field not in ("data", "wdata", "pins", "geom"):
                assert np.array_equal(getattr(a, field), getattr(b, field)), field
        assert np.flatnonzero(a.data != data).tolist() == sorted([H_MUTATIONS, H_CLOCK])
        assert np.array_equal(a.wdata, wdata)
        w.insert(np.arange(16), [1, 2, 3, 4])
        w.check()
