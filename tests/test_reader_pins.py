"""Reader pins: match_and_pin / unpin, the handshake with eviction, and the
reclamation of pins held by readers that died."""

from __future__ import annotations

import time

import numpy as np
import pytest

from shmcache import CacheFullError, InvalidInputError, PinLimitError, Reader, Writer

from churn import (
    Goal,
    Timeline,
    dropped_by_op,
    dropped_while_held,
    pin_and_hold,
    pin_reader_main,
    pool_keys_of,
    run_churn,
    violations,
)

BS = 4


def prompt(first: int, n_blocks: int) -> np.ndarray:
    return np.arange(first, first + n_blocks * BS, dtype=np.int64)


def test_pinned_path_survives_eviction_until_unpinned(shm_name):
    with Writer.create(shm_name, capacity=64, block_size=BS) as w, Reader.attach(shm_name) as r:
        a, b = prompt(0, 6), prompt(1000, 5)
        w.insert(a, np.arange(6))
        w.insert(b, np.arange(100, 105))
        h = r.match_and_pin(a)
        length, values = h
        assert (length, values.tolist()) == (24, list(range(6))) and h.pinned
        assert sorted(w.evict(64).tolist()) == list(range(100, 105))
        assert w.stats()["reader_pinned_blocks"] == 6
        assert r.match_prefix(a).values.tolist() == list(range(6))
        w.check()
        r.unpin(h)
        assert not h.pinned and r.stats()["pinned_entries"] == 0
        assert w.evict(64).tolist() == [5, 4, 3, 2, 1, 0]
        w.check()


def test_handles_nest_and_the_with_block_releases(shm_name):
    with Writer.create(shm_name, capacity=64, block_size=BS) as w, Reader.attach(shm_name) as r:
        w.insert(prompt(0, 4), np.arange(4))
        with r.match_and_pin(prompt(0, 4)) as outer:
            inner = r.match_and_pin(prompt(0, 2))
            assert (outer.length, inner.length) == (16, 8)
            r.unpin(inner)
            assert len(w.evict(64)) == 0  # the outer handle still holds all four
        assert not outer.pinned
        assert len(w.evict(64)) == 4
        w.check()


def test_full_of_reader_pins_refuses_inserts_until_unpinned(shm_name):
    with Writer.create(shm_name, capacity=8, block_size=BS) as w, Reader.attach(shm_name) as r:
        w.insert(prompt(0, 8), np.arange(8))
        h = r.match_and_pin(prompt(0, 8))
        with pytest.raises(CacheFullError, match="pinned") as e:
            w.insert(prompt(500, 2), [50, 51])
        assert e.value.inserted_blocks == 0
        assert r.match_prefix(prompt(0, 8)).length == 32
        w.check()
        r.unpin(h)
        assert w.insert(prompt(500, 2), [50, 51]) == 0
        assert r.match_prefix(prompt(0, 8)).length == 24  # the two LRU leaves made room
        w.check()


def test_pin_limit_and_handle_misuse_are_typed_errors(shm_name):
    with Writer.create(shm_name, capacity=64, block_size=BS, reader_pins=16) as w, \
            Reader.attach(shm_name) as r, Reader.attach(shm_name) as other:
        w.insert(prompt(0, 10), np.arange(10))
        h = r.match_and_pin(prompt(0, 10))
        with pytest.raises(PinLimitError, match="reader_pins"):
            r.match_and_pin(prompt(0, 7))
        assert r.stats()["pinned_entries"] == 10  # the refused call pinned nothing
        with pytest.raises(InvalidInputError, match="this Reader"):
            other.unpin(h)
        r.unpin(h)
        with pytest.raises(InvalidInputError, match="already unpinned"):
            r.unpin(h)
        with pytest.raises(InvalidInputError, match="handle"):
            r.unpin(r.match_prefix(prompt(0, 10)))
        assert r.match_and_pin(prompt(0, 7)).length == 28
        w.check()


def test_closing_a_reader_releases_its_pins(shm_name):
    with Writer.create(shm_name, capacity=64, block_size=BS) as w:
        w.insert(prompt(0, 5), np.arange(5))
        r = Reader.attach(shm_name)
        h = r.match_and_pin(prompt(0, 5))
        r.close()
        assert not h.pinned
        assert len(w.evict(64)) == 5
        w.check()


def test_pins_of_killed_readers_are_reclaimed_and_live_ones_never(shm_name, spawn):
    """Three reader processes pin 3,000 blocks each; two are SIGKILLed. Their
    pins go as soon as the writer needs the room (or reaps); the survivor's
    never do."""
    n_blocks, per_reader = 500, 6
    capacity = 3 * n_blocks * per_reader
    with Writer.create(shm_name, capacity=capacity, block_size=BS) as w:
        prompts = [[prompt(10**6 * (k * per_reader + j), n_blocks) for j in range(per_reader)] for k in range(3)]
        for k in range(3):
            for j, p in enumerate(prompts[k]):
                w.insert(p, np.arange(n_blocks) + (k * per_reader + j) * n_blocks)
        out = spawn.Queue()
        # One release event each: setting an event a SIGKILLed process was
        # waiting on would wait forever for that waiter to wake.
        readies, releases = [spawn.Event() for _ in range(3)], [spawn.Event() for _ in range(3)]
        procs = [spawn.Process(target=pin_and_hold, args=(shm_name, prompts[k], readies[k], releases[k], out))
                 for k in range(3)]
        try:
            for p in procs:
                p.start()
            for e in readies:
                assert e.wait(120), "a pinning reader did not start"
            assert all(len(v) == n_blocks for vals in (out.get(timeout=10) for _ in range(3)) for v in vals)
            assert w.stats()["reader_pinned_blocks"] == capacity
            assert w.reap_readers() == 0  # all alive: nothing is reclaimed
            assert len(w.evict(capacity)) == 0
            with pytest.raises(CacheFullError):
                w.insert(prompt(2**31, 2), [-1, -2])
            for p in procs[:2]:
                p.kill()
                p.join(30)
            t0 = time.perf_counter()
            # The insert that needs room reaps on its own: no explicit call.
            assert w.insert(prompt(2**31, 2), [-1, -2]) == 0
            reclaim_ms = (time.perf_counter() - t0) * 1e3
            assert w.stats()["reader_pinned_blocks"] == n_blocks * per_reader
            evicted = w.evict(capacity)
            assert len(evicted) == 2 * n_blocks * per_reader  # exactly the dead readers' blocks, and ours
            survivor_values = set(np.arange(n_blocks * per_reader * 2, n_blocks * per_reader * 3).tolist())
            assert not survivor_values & set(evicted.tolist())
            w.check()
            releases[2].set()
            procs[2].join(60)
            assert procs[2].exitcode == 0
            assert len(w.evict(capacity)) == n_blocks * per_reader  # closed cleanly: its pins went with it
            w.check()
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
    print(f"reclaimed 2 dead readers' 6,000 pins inside one insert in {reclaim_ms:.1f} ms")


def test_pinned_answers_are_never_evicted_while_held(shm_name, spawn, tmp_path):
    """Under a writer process that evicts continuously (no explicit removes),
    readers alternate pinned and plain matches and hold each answer for a
    while. No op may drop a pinned block while it is held; plain answers
    (the control) do get dropped, so the check has teeth."""
    seed = 4242
    goal = Goal(rounds=20_000, counts=(2600, 10))  # per reader: pinned answers held, plain ones dropped while held
    ops, rows = run_churn(spawn, shm_name, seed, tmp_path, pin_reader_main, 2, goal, explicit_drops=False)
    pool_keys = pool_keys_of(shm_name, seed)
    assert violations(Timeline.from_log(ops), pool_keys, rows[:, :12]) == []
    pinned, plain = rows[(rows[:, 12] == 1) & (rows[:, 3] > 0)], rows[(rows[:, 12] == 0) & (rows[:, 3] > 0)]
    assert len(pinned) > 5000
    assert dropped_while_held(dropped_by_op(ops), pinned) == []
    assert (pinned[:, 14] != 0).all(), "a pinned answer's block was gone when its reader looked again"
    control = int((plain[:, 14] == 0).sum())
    assert control >= 20, f"only {control} plain answers lost a block while held: the churn does not test pins"
    print(f"{len(pinned)} pinned answers held, none dropped; {control} plain answers lost a block while held")


def _stray_entry(r, slot, value):
    """Write pin entry 0 of reader ``slot`` and announce it, as a reader does
    (single-threaded here, so plain stores suffice)."""
    from shmcache.layout import G_PINS, G_READER_PINS, RD_PIN_SEQ, W_PIN_SEQ, reader_word

    r._pins[int(r._geom[G_PINS]) + slot * int(r._geom[G_READER_PINS])] = value
    r._wdata[reader_word(slot, RD_PIN_SEQ)] += 1
    r._wdata[W_PIN_SEQ] += 1


def test_a_withdrawn_entry_on_a_free_record_never_frees_it_twice(shm_name):
    """A reader stores an entry, fails validation (its block was just
    evicted) and withdraws it; a writer catching up in between must not put
    the record on the free stack a second time when the entry goes."""
    with Writer.create(shm_name, capacity=4, block_size=BS) as w, Reader.attach(shm_name) as r:
        w.insert(prompt(0, 2), [1, 2])
        assert len(w.evict(2)) == 2
        _stray_entry(r, r._slot, 1)  # names record 0, now free
        assert w.stats()["reader_pinned_blocks"] == 1
        _stray_entry(r, r._slot, 0)
        assert w.stats()["reader_pinned_blocks"] == 0
        w.check()
        assert w.insert(prompt(100, 4), [10, 11, 12, 13]) == 0  # all four records, each once
        w.check()
        assert r.match_prefix(prompt(100, 4)).values.tolist() == [10, 11, 12, 13]


def test_a_slot_left_with_pins_by_a_dead_holder_is_cleared_by_whoever_claims_it(shm_name):
    """A slot whose lock nobody holds but whose pid word and entries say
    otherwise (its reader died): the next reader to claim it clears it; so
    does the writer's reap, and neither touches a live reader's slot."""
    from shmcache.layout import RD_PID, reader_word

    with Writer.create(shm_name, capacity=8, block_size=BS) as w, Reader.attach(shm_name) as r:
        w.insert(prompt(0, 2), [1, 2])
        live = r.match_and_pin(prompt(0, 2))
        for slot in (r._slot + 1, r._slot + 2):
            r._wdata[reader_word(slot, RD_PID)] = 1  # pid 1 is alive: a pid says nothing
            _stray_entry(r, slot, 1)
        assert w.stats()["reader_pinned_blocks"] == 2
        with Reader.attach(shm_name) as other:
            assert other._slot == r._slot + 1 and other.stats()["pinned_entries"] == 0
        assert w.reap_readers() == 1  # the other dead one; the closed one left nothing
        assert int(r._wdata[reader_word(r._slot + 2, RD_PID)]) == 0
        assert w.stats()["reader_pinned_blocks"] == 2 and live.pinned and r.stats()["pinned_entries"] == 2
        w.check()


def test_a_reader_collected_without_close_releases_its_slot_and_pins(shm_name):
    import gc

    with Writer.create(shm_name, capacity=8, block_size=BS) as w:
        w.insert(prompt(0, 4), [1, 2, 3, 4])
        r = Reader.attach(shm_name)
        slot = r._slot
        h = r.match_and_pin(prompt(0, 4))
        assert w.stats()["reader_pinned_blocks"] == 4
        del r, h
        gc.collect()
        assert w.stats()["reader_pinned_blocks"] == 0
        with Reader.attach(shm_name) as again:
            assert again._slot == slot
        assert len(w.evict(8)) == 4
        w.check()


@pytest.mark.parametrize("where", ["handle", "kernel"])
def test_an_interrupted_match_and_pin_leaves_nothing_behind(shm_name, monkeypatch, where):
    """A KeyboardInterrupt between the pin kernel and the handle (or raised
    out of the kernel call itself) leaves no entry in the slot."""
    import shmcache.reader

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with Writer.create(shm_name, capacity=8, block_size=BS) as w, Reader.attach(shm_name) as r:
        w.insert(prompt(0, 4), [1, 2, 3, 4])
        kernel = shmcache.reader.pin_path_kernel

        def pin_then_interrupt(*args):
            kernel(*args)
            raise KeyboardInterrupt

        monkeypatch.setattr(shmcache.reader, "PinnedMatch" if where == "handle" else "pin_path_kernel",
                            interrupted if where == "handle" else pin_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            r.match_and_pin(prompt(0, 4))
        monkeypatch.undo()
        assert r.stats()["pinned_entries"] == 0 and w.stats()["reader_pinned_blocks"] == 0
        h = r.match_and_pin(prompt(0, 4))
        assert h.length == 16 and r.stats()["pinned_entries"] == 4
        r.unpin(h)
        assert len(w.evict(8)) == 4
        w.check()


def test_entries_of_a_call_stopped_before_it_could_clean_up_go_with_the_next(shm_name):
    """Had the interrupt struck inside the clean-up itself, the entries are
    still recorded as unreturned, and the next match_and_pin releases them."""
    from shmcache.matcher import workspace_path
    from shmcache.pins import pin_path_kernel

    with Writer.create(shm_name, capacity=8, block_size=BS) as w, Reader.attach(shm_name) as r:
        w.insert(prompt(0, 4), [1, 2, 3, 4])
        r.match_prefix(prompt(0, 4))
        path, versions = workspace_path(r._ws, 4)
        r._unreturned = np.full(4, -1, dtype=np.int64)
        assert pin_path_kernel(r._data, r._wdata, r._pins, r._geom, path, versions, 4, r._unreturned) == 4
        assert r.stats()["pinned_entries"] == 4
        assert r.match_and_pin(prompt(0, 2)).length == 8
        assert r.stats()["pinned_entries"] == 2 and w.stats()["reader_pinned_blocks"] == 2
        w.check()
