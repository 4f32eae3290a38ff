"""Named owners (issue 12, part 2): which owners hold each block, the
per-owner overlap a router asks for (``Reader.match_owners``), and how
owners let go of blocks (``release``, ``clear_owner``, a named client
leaving), checked against a model of the same operations."""

from __future__ import annotations

import random

import numpy as np
import pytest

from shmcache import Client, InvalidInputError, OwnerLimitError, Reader, Writer
from shmcache.layout import MAX_OWNERS

from daemon_proc import Served

BS = 4


def toks(*blocks: int) -> np.ndarray:
    """A prompt whose block ``i`` is ``blocks[i]`` repeated."""
    return np.repeat(np.asarray(blocks, dtype=np.int64), BS)


@pytest.fixture
def wr(shm_name):
    with Writer.create(shm_name, capacity=256, block_size=BS) as w:
        r = Reader.attach(shm_name)
        try:
            yield w, r
        finally:
            r.close()


def test_two_owners_of_one_prefix_and_the_overlap_each_holds(wr):
    w, r = wr
    w.insert(toks(1, 2, 3, 4), [1, 2, 3, 4], owner="rank0")
    w.insert(toks(1, 2, 7), [5, 6, 7], owner="rank1", client=1)
    assert r.match_owners(toks(1, 2, 3, 4, 9)) == {"rank0": 16, "rank1": 8}
    assert r.match_owners(toks(1, 2, 7)) == {"rank0": 8, "rank1": 12}
    assert r.match_owners(toks(5)) == {"rank0": 0, "rank1": 0}
    assert r.owners() == w.owners() == {"rank0": 4, "rank1": 3}
    # The same prompt as a list, as int32 and in a namespace nobody used.
    assert r.match_owners([1] * 4 + [2] * 4) == {"rank0": 8, "rank1": 8}
    assert r.match_owners(toks(1, 2).astype(np.int32)) == {"rank0": 8, "rank1": 8}
    assert r.match_owners(toks(1, 2), namespace="lora-x") == {"rank0": 0, "rank1": 0}
    w.check()


def test_releasing_a_middle_block_takes_its_descendants_from_that_owner_only(wr):
    w, r = wr
    w.insert(toks(1, 2, 3, 4), [1, 2, 3, 4], owner="rank0")
    w.insert(toks(1, 2, 3), [5, 6, 7], owner="rank1", client=1)
    assert w.release(toks(1, 2), "rank0") == 3  # blocks 2, 3 and 4
    assert r.match_owners(toks(1, 2, 3, 4)) == {"rank0": 4, "rank1": 12}
    # Block 4 lost its only holder and left the cache; 2 and 3 stay (rank1).
    assert r.match_prefix(toks(1, 2, 3, 4)).values.tolist() == [1, 2, 3]
    assert w.release(toks(1, 2), "rank0") == 0
    assert w.release(toks(9), "rank0") == 0
    assert w.release(toks(1), "nobody") == 0
    w.check()


def test_last_owner_letting_go_drops_the_block_and_what_no_owner_ever_held_stays(wr):
    w, r = wr
    dropped = []
    w.on_evict = dropped.extend
    w.insert(toks(7, 8), [7, 8])  # held by no named owner, ever
    w.insert(toks(1, 2), [1, 2])
    w.insert(toks(1, 2, 3), [9, 9, 3], owner="rank0", client=1)  # now rank0 holds (1) and (1, 2) too
    w.insert(toks(1, 5), [9, 5], owner="rank0", client=1)
    assert w.clear_owner("rank0") == 4
    assert sorted(dropped) == [1, 2, 3, 5]
    assert r.match_prefix(toks(7, 8)).values.tolist() == [7, 8]
    assert r.owners() == {"rank0": 0}
    assert w.stats()["live_blocks"] == 2
    w.check()


def test_an_unnamed_clients_blocks_stay_while_a_named_owner_holds_them(wr):
    w, r = wr
    w.insert(toks(1, 2, 3), [1, 2, 3], client=7)
    w.insert(toks(1, 2), [0, 0], owner="rank0", client=8)
    values, clients = w.remove_client(7)
    assert values.tolist() == [3] and clients.tolist() == [7]
    assert r.match_owners(toks(1, 2, 3)) == {"rank0": 8}
    assert r.match_prefix(toks(1, 2, 3)).values.tolist() == [1, 2]
    w.check()


def test_extend_chains_from_a_block_and_refuses_one_its_owner_let_go(wr):
    w, r = wr
    rows = w.extend(None, toks(1, 2), [1, 2], owner="e0", client=3)
    more = w.extend(rows[1], toks(3), [3], owner="e0", client=3)
    assert more is not None and r.match_owners(toks(1, 2, 3)) == {"e0": 12}
    assert r.match_prefix(toks(1, 2, 3)).values.tolist() == [1, 2, 3]
    # Another owner may not extend below a block it does not hold.
    assert w.extend(rows[1], toks(4), [4], owner="e1", client=4) is None
    assert w.release_refs(rows[1:2], "e0") == 2
    assert w.extend(rows[1], toks(3), [3], owner="e0", client=3) is None  # dropped since
    assert w.release_refs(rows[1:2], "e0") == 0
    with pytest.raises(InvalidInputError, match="below must be a row"):
        w.extend(np.array([10**6, 0]), toks(3), [3], owner="e0")
    w.check()


@pytest.mark.parametrize("bad", ["", "x" * 65, "rank 0", "ränk", 7, "a\n"])
def test_bad_owner_names_are_refused_with_what_is_allowed(wr, bad):
    w, _ = wr
    with pytest.raises(InvalidInputError, match="owner names are 1-64 characters"):
        w.insert(toks(1), [1], owner=bad)
    assert w.owners() == {} and w.stats()["live_blocks"] == 0


def test_64_owners_then_a_clear_one_is_reused(wr):
    w, r = wr
    names = [f"node0/dp{i}:x@y.z-{i}" for i in range(MAX_OWNERS)]
    for i, name in enumerate(names):
        w.insert(toks(1, 2 + i), [2 * i, 2 * i + 1], owner=name, client=i)
    held = r.match_owners(toks(1, 5))
    assert len(held) == MAX_OWNERS and held[names[3]] == 8 and held[names[4]] == 4
    with pytest.raises(OwnerLimitError, match="all 64 owner entries"):
        w.insert(toks(9), [1000], owner="one-too-many")
    assert w.clear_owner(names[0]) == 2  # (1, 2) leaves the cache; (1) stays, held by the others
    w.insert(toks(9), [1000], owner="one-too-many", client=99)
    after = r.match_owners(toks(9))
    assert names[0] not in after and after["one-too-many"] == 4 and len(after) == MAX_OWNERS
    w.check()


def test_clients_named_as_one_owner_hold_its_blocks_until_the_last_leaves(shm_name):
    served = Served(shm_name, 64, block_size=BS)
    a = Client.connect(shm_name, owner="rank3")
    b = Client.connect(shm_name, owner="rank3")
    other = Client.connect(shm_name)
    try:
        a.insert(toks(1, 2), [1, 2])
        b.insert(toks(1, 3), [3, 4])
        other.insert(toks(1, 2, 5), [5, 6, 7])
        assert a.match_owners(toks(1, 2, 5)) == {"rank3": 8}
        assert a.owners() == {"rank3": 3}
        a.close()  # rank3 still has a client: it keeps its blocks
        assert other.match_owners(toks(1, 3)) == {"rank3": 8}
        b.close()  # the last one: rank3 lets go of everything
        assert _eventually(lambda: other.owners() == {"rank3": 0})
        # (1, 2) leaves with rank3; other's (5) went with it, as its subtree.
        assert other.match_prefix(toks(1, 2, 5)).length == 0
        assert sorted(_evicted(other)) == [7]
        with pytest.raises(InvalidInputError, match="owner names"):
            Client.connect(shm_name, owner="no spaces")
    finally:
        other.close()
        served.kill()


def _eventually(check, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


def _evicted(c: Client) -> list[int]:
    got: list[int] = []
    _eventually(lambda: bool(got.extend(c.poll_evicted().tolist()) or got))
    return got


def test_names_read_by_a_reader_follow_a_renamed_entry(wr):
    w, r = wr
    w.insert(toks(1), [1], owner="old")
    assert r.match_owners(toks(1)) == {"old": 4}
    w.clear_owner("old")
    for i in range(MAX_OWNERS - 1):
        w.insert(toks(50 + i), [100 + i], owner=f"fill{i}", client=1)
    w.insert(toks(1), [1], owner="new", client=2)  # the only idle entry: old's
    got = r.match_owners(toks(1))
    assert "old" not in got and got["new"] == 4


def test_owner_model(shm_name):
    """Random inserts, releases and clears by 4 owners (and an unnamed
    client) against a model: every owner's overlap and the longest cached
    prefix of every prompt agree after every operation."""
    rng = random.Random(12)
    owners_ = ["r0", "r1", "r2", "r3"]
    prompts = [tuple(rng.randrange(3) for _ in range(rng.randrange(1, 6))) for _ in range(40)]
    held: dict[str, set[tuple]] = {o: set() for o in owners_}
    unowned: set[tuple] = set()
    values: dict[tuple, int] = {}
    with Writer.create(shm_name, capacity=4096, block_size=BS) as w, Reader.attach(shm_name) as r:
        for step in range(400):
            op, p, o = rng.random(), rng.choice(prompts), rng.choice(owners_)
            prefixes = [p[: i + 1] for i in range(len(p))]
            if op < 0.45:
                vals = [values.setdefault(q, len(values)) for q in prefixes]
                w.insert(toks(*p), vals, owner=o, client=9)
                held[o].update(prefixes)
                unowned -= set(prefixes)
            elif op < 0.55:
                vals = [values.setdefault(q, len(values)) for q in prefixes]
                w.insert(toks(*p), vals, client=9)
                unowned.update(q for q in prefixes if not any(q in h for h in held.values()))
            elif op < 0.9:
                gone = {q for q in held[o] if q[: len(p)] == p}
                assert w.release(toks(*p), o) == (len(gone) if p in held[o] else 0)
                if p in held[o]:
                    held[o] -= gone
            else:
                assert w.clear_owner(o) == len(held[o])
                held[o] = set()
            # A block leaves the cache, with its subtree, when its last
            # owner lets go; one never held by an owner stays.
            cached = set().union(*held.values()) | unowned
            cached = {q for q in cached if all(q[: i + 1] in cached for i in range(len(q)))}
            unowned &= cached
            for q in prompts:
                want = {o: BS * next((i for i in range(len(q)) if q[: i + 1] not in held[o]), len(q)) for o in owners_}
                got = r.match_owners(toks(*q))
                assert {o: got.get(o, 0) for o in owners_} == want, (step, q)
                n = next((i for i in range(len(q)) if q[: i + 1] not in cached), len(q))
                assert r.match_prefix(toks(*q)).length == BS * n, (step, q)
        w.check()


def test_match_owners_never_credits_an_owner_beyond_what_it_held_under_churn(shm_name, spawn, tmp_path):
    """Guarantee 1 for owners, across real processes: readers asking
    ``match_owners`` while a writer churns four owners' holds are never
    credited with blocks an owner did not hold at an instant of the call."""
    import owner_churn
    from churn import Goal, run_churn

    # Per reader: 20,000 calls at least, 1,000 of them overlapping a write,
    # 300 of those crediting some owner.
    goal = Goal(rounds=20_000, counts=(1000, 300))
    seed = 20261202
    history, rows = run_churn(spawn, shm_name, seed, tmp_path, owner_churn.reader_main, 2, goal,
                              writer=lambda ready, stop, log: (owner_churn.writer_main,
                                                               (shm_name, seed, ready, stop, log, goal.seconds + 300)))
    assert len(history) > 1000, "the writer barely churned"
    bad = owner_churn.violations(history, rows)
    assert not bad, f"{len(bad)} answers credited an owner beyond what it held, first: {bad[:5]}"
    # The check is not vacuous: owners came and went on the prompts asked.
    moved = np.diff(np.stack([t for _, t in history]), axis=0)
    assert (moved < 0).sum() > 500 and (moved > 0).sum() > 500


def test_the_owner_checker_catches_an_answer_above_what_was_held():
    import owner_churn

    before, after = np.zeros((1, 4), dtype=np.int64), np.array([[8, 0, 0, 0]])
    history = [(0, before), (2, after), (4, before)]
    ok = np.array([[0, 1, 3, 8, 0, 0, 0]])  # overlapped the insert
    late = np.array([[0, 4, 4, 8, 0, 0, 0]])  # after the release: r0 held nothing
    assert owner_churn.violations(history, ok) == []
    assert len(owner_churn.violations(history, late)) == 1


def test_a_writer_that_died_renaming_an_owner_leaves_a_table_the_next_one_repairs(shm_name):
    from shmcache import SegmentCorruptError
    from shmcache.layout import G_STATES, H_OWNERS_EPOCH, R_VERSION, RECORD_WORDS
    from shmcache.owners import entry_words

    with Writer.create(shm_name, capacity=64, block_size=BS) as w:
        w.insert(toks(1, 2), [1, 2], owner="kept")
        w.insert(toks(3), [3], owner="idle")
        w.clear_owner("idle")
        data, geom = w._map.data, w._A.geom
        versions = [int(data[int(geom[G_STATES]) + s * RECORD_WORDS + R_VERSION]) for s in range(3)]
        # As a writer killed inside a rename leaves it: the epoch odd, an idle entry half-named.
        data[H_OWNERS_EPOCH] += 1
        entry_words(data, geom, 1)[1] = 0xFFFF
        with Reader.attach(shm_name) as r, pytest.raises(SegmentCorruptError, match="restart shmcache serve"):
            r.owners()
    with Writer.open(shm_name) as w, Reader.attach(shm_name) as r:
        assert r.owners() == {"kept": 2} and r.match_owners(toks(1, 2)) == {"kept": 8}
        # Every live record's version moved on (a presence store may have lost its version).
        data = w._map.data
        live = [int(data[int(w._A.geom[G_STATES]) + s * RECORD_WORDS + R_VERSION]) for s in range(2)]
        assert live == [v + 2 for v in versions[:2]]
        w.check()


def test_a_65th_owner_is_refused_to_its_client_and_the_daemon_serves_on(shm_name):
    from shmcache import OwnerLimitError

    served = Served(shm_name, 64, block_size=BS)
    clients = []
    try:
        for i in range(MAX_OWNERS):
            clients.append(Client.connect(shm_name, owner=f"rank{i}"))
        with pytest.raises(OwnerLimitError, match="all 64 owner entries"):
            Client.connect(shm_name, owner="one-too-many")
        clients[0].insert(toks(1), [1])
        assert clients[1].match_owners(toks(1))["rank0"] == 4
        assert served.proc.poll() is None
    finally:
        for c in clients:
            c.close()
        served.kill()
