"""Issue 4, crash at every step: for every numbered step of every writer path
(insert with eviction, remove, evict, pin, unpin, clear, an owner's release,
and the repair itself), a writer process is SIGKILLed exactly there while
reader processes match (and ask which owners hold what). Each time the segment must recover, pass ``check()``, keep every block
the operation did not touch, drop at most the one record that was in flight,
and no reader may ever return a wrong value or hang.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal


from shmcache import Writer

from crash_children import (
    BASE,
    CAPACITY,
    EVICT,
    NEW,
    REMOVED,
    SHARED,
    checking_reader,
    prefixes,
    run_op,
    tokens,
    value,
    values,
)
from helpers import live_states

PATHS = ["insert", "remove", "evict", "pin", "unpin", "clear", "release", "recovery"]


def prepare(name: str) -> set[int]:
    """Reset the segment to the full BASE tree; its values."""
    with Writer.open(name) as w:
        w.clear()
        for p in BASE:
            w.insert(tokens(p), values(p), owner="a")
        w.insert(tokens(SHARED), values(SHARED), owner="b")
        got = {v for v, _, _ in live_states(w._map.data, w.geometry).values()}
    assert got == {value(p) for p in prefixes(BASE)}
    return got


def allowed(path: str, before: set[int], after: set[int]) -> str | None:
    """Why ``after`` is not a state the interrupted operation could leave, or None."""
    gone, new = before - after, after - before
    if path == "insert":
        chain = [value(NEW[: i + 1]) for i in range(len(NEW)) if value(NEW[: i + 1]) not in before]
        if len(gone) > len(chain) or new != set(chain[: len(new)]):
            return f"insert left gone={gone} new={new}: new blocks must be a leading run of {chain}"
    elif path == "remove":
        subtree = {value(p) for p in prefixes(BASE) if p[: len(REMOVED)] == REMOVED}
        if new or not gone <= subtree:
            return f"remove touched gone={gone - subtree} new={new}"
    elif path == "evict":
        if new or len(gone) > EVICT:
            return f"evict left gone={gone} new={new}"
    elif path == "clear":
        if new:
            return f"clear added {new}"
    elif path == "release":
        only_a = {value(p) for p in prefixes(BASE) if p[: len(REMOVED)] == REMOVED} - {value(p) for p in prefixes([SHARED])}
        if new or not gone <= only_a:
            return f"release touched gone={gone - only_a} new={new}"
    elif gone or new:
        return f"{path} changed the content: gone={gone} new={new}"
    return None


def test_crash_at_every_step_of_every_writer_path(shm_name, spawn, monkeypatch):
    # Crash children fork from a server that preloaded (and warmed) shmcache:
    # fresh processes that start in milliseconds. Python 3.11's forkserver
    # imports its preloads before it applies sys.path, hence PYTHONPATH.
    here = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    forks = mp.get_context("forkserver")
    forks.set_forkserver_preload(["warm_forkserver", "crash_children"])
    Writer.create(shm_name, capacity=CAPACITY, block_size=4).close()
    stop, results = spawn.Event(), spawn.Queue()
    readers = [spawn.Process(target=checking_reader, args=(shm_name, stop, results)) for _ in range(2)]
    steps: dict[str, int] = {}
    try:
        for r in readers:
            r.start()
        for path in PATHS:
            for step in itertools.count(1):
                assert step < 2000, f"{path} never completed"
                before = prepare(shm_name)
                child = forks.Process(target=run_op, args=(shm_name, path, step))
                child.start()
                child.join(120)
                if child.exitcode == 0:
                    steps[path] = step - 1
                    break
                assert child.exitcode == -signal.SIGKILL, f"{path} step {step}: exit {child.exitcode}"
                with Writer.open(shm_name) as w:
                    assert w.recovered <= 1, f"{path} step {step}: recovery dropped {w.recovered} states"
                    w.check()
                    after = {v for v, _, _ in live_states(w._map.data, w.geometry).values()}
                    for p in BASE + [NEW]:
                        got = w.match_prefix(tokens(p)).values.tolist()
                        assert got == values(p)[: len(got)], f"{path} step {step}: {p} -> {got}"
                why = allowed(path, before, after)
                assert why is None, f"step {step}: {why}"
        stop.set()
        outcomes = [results.get(timeout=120) for _ in readers]
        for r in readers:
            r.join(120)
            assert r.exitcode == 0, "a reader died or hung"
    finally:
        stop.set()
        for r in readers:
            if r.is_alive():
                r.kill()
                r.join()
    print(f"crash steps enumerated per path: {steps}")
    # Every step of every path was enumerated (each loop ran until the
    # operation completed before its crash step).
    assert set(steps) == set(PATHS) and all(n >= 2 for n in steps.values()), steps
    assert all(wrong == 0 for _, wrong in outcomes), outcomes
    assert all(matches > 1000 for matches, _ in outcomes), outcomes
