"""Issue 4: a hostile or corrupted segment cannot crash a reader."""

from __future__ import annotations

import queue

import numpy as np

from shmcache import Writer
from shmcache.cli import main
from shmcache.layout import R_LINK, RECORD_WORDS

import fuzz_child


def test_readers_and_repair_survive_10k_damaged_segments(spawn):
    out = spawn.Queue()
    child = spawn.Process(target=fuzz_child.run, args=(10_000, 20261128, out))
    child.start()
    try:
        tally = None
        while tally is None and child.is_alive():
            try:
                tally = out.get(timeout=1)
            except queue.Empty:
                pass
        if tally is None:
            tally = out.get(timeout=5)  # it may have reported just before exiting
        child.join(120)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0, f"the fuzzing process died with {child.exitcode} (a crash)"
    assert tally["cases"] >= 10_000
    answered_or_refused = tally["matches"] + sum(v for k, v in tally.items() if k.endswith("Error"))
    assert answered_or_refused == tally["cases"] * len(fuzz_child.PROMPTS), tally
    assert tally["check found damage"] > 1000 and tally["repairs"] > 1000, tally


def test_dump_check_names_a_broken_parent_link(shm_name, capsys):
    with Writer.create(shm_name, capacity=32, block_size=4) as w:
        w.insert(np.arange(16), [1, 2, 3, 4])
        rec = w.geometry.states_offset // 8 + 2 * RECORD_WORDS + R_LINK
        w._map.data[rec] = (w._map.data[rec] & ~np.uint64(0xFFFFFFFF)) | np.uint64(31 + 2)
        assert main(["dump", shm_name, "--check"]) == 1
        out = capsys.readouterr().out
        assert "state 2 links to parent 31, which is not a live state" in out
        assert "state 3 does not reach the root" in out
