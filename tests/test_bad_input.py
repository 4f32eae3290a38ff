"""Guarantee 5: bad input gets a typed error that says what to do, and the
segment is left exactly as it was. Each row is one entry point and one bad input."""

from __future__ import annotations

import numpy as np
import pytest

from shmcache import (
    CacheFullError,
    Client,
    InvalidInputError,
    InvalidNameError,
    Reader,
    SegmentNotFoundError,
    ShmCacheError,
    Writer,
    block_keys,
)

from helpers import live_states

GOOD = np.arange(16, dtype=np.int64)
#: Writer pin handles the cases misuse, made by the ``segment`` fixture.
HANDLES: dict = {}
# Compares equal to int64 (but hashes apart), yet Numba would see a record.
INT_WITH_FIELDS = np.dtype((np.int64, {"lo": (np.int32, 0), "hi": (np.int32, 4)}))

# (id, call(w, r, name), exception, message fragment)
CASES = [
    ("insert float tokens", lambda w, r, n: w.insert(GOOD.astype(float), [1, 2, 3, 4]), InvalidInputError, "integer dtype"),
    ("insert 2-D tokens", lambda w, r, n: w.insert(GOOD.reshape(4, 4), [1, 2, 3, 4]), InvalidInputError, "1-D"),
    ("insert negative id", lambda w, r, n: w.insert(np.r_[GOOD[:-1], -1], [1, 2, 3, 4]), InvalidInputError, "token 15 is -1"),
    ("insert id 2**32", lambda w, r, n: w.insert(np.r_[GOOD[:-1], 2**32], [1, 2, 3, 4]), InvalidInputError, "[0, 2**32)"),
    ("insert list with float", lambda w, r, n: w.insert([1, 2, 3.5, 4], [1]), InvalidInputError, "token 2 is 3.5"),
    ("insert list with negative", lambda w, r, n: w.insert([1, 2, -3, 4], [1]), InvalidInputError, "token 2 is -3"),
    ("insert string tokens", lambda w, r, n: w.insert("hello", [1]), InvalidInputError, "NumPy integer array"),
    ("insert too few values", lambda w, r, n: w.insert(GOOD, [1, 2, 3]), InvalidInputError, "3 values for 4 full blocks"),
    ("insert too many values", lambda w, r, n: w.insert(GOOD[:15], [1, 2, 3, 4]), InvalidInputError, "partial block"),
    ("insert float values", lambda w, r, n: w.insert(GOOD, np.ones(4)), InvalidInputError, "integer"),
    ("insert 2-D values", lambda w, r, n: w.insert(GOOD, np.ones((2, 2), dtype=np.int64)), InvalidInputError, "1-D"),
    ("insert value > int64", lambda w, r, n: w.insert(GOOD, np.array([1, 2, 3, 2**63], dtype=np.uint64)), InvalidInputError, "int64"),
    ("insert cached value", lambda w, r, n: w.insert(GOOD + 200, [5, 6, 7, 100]), InvalidInputError, "already cached"),
    ("insert repeated value", lambda w, r, n: w.insert(GOOD + 300, [7, 8, 7, 9]), InvalidInputError, "twice"),
    ("insert larger than capacity", lambda w, r, n: w.insert(np.arange(4 * 40) + 500, np.arange(40) + 500), CacheFullError, "larger segment"),
    ("insert float namespace", lambda w, r, n: w.insert(GOOD, [1, 2, 3, 4], namespace=1.5), InvalidInputError, "namespace"),
    ("insert negative namespace", lambda w, r, n: w.insert(GOOD, [1, 2, 3, 4], namespace=-1), InvalidInputError, "namespace"),
    ("writer match bad tokens", lambda w, r, n: w.match_prefix([[1, 2]]), InvalidInputError, "token 0"),
    ("reader match float tokens", lambda w, r, n: r.match_prefix(GOOD.astype(np.float32)), InvalidInputError, "integer dtype"),
    ("reader match negative id", lambda w, r, n: r.match_prefix(np.r_[-5, GOOD[1:]]), InvalidInputError, "token 0 is -5"),
    ("reader match huge uint64", lambda w, r, n: r.match_prefix(np.full(16, 2**63, dtype=np.uint64)), InvalidInputError, "[0, 2**32)"),
    ("reader match bool array", lambda w, r, n: r.match_prefix(np.ones(16, dtype=bool)), InvalidInputError, "integer dtype"),
    ("reader match str list", lambda w, r, n: r.match_prefix(["a"] * 16), InvalidInputError, "not an int"),
    ("reader match 2-D column", lambda w, r, n: r.match_prefix(GOOD.reshape(16, 1)), InvalidInputError, "1-D"),
    ("reader match 2-D row", lambda w, r, n: r.match_prefix(GOOD.reshape(1, 16)), InvalidInputError, "1-D"),
    ("reader match 0-d array", lambda w, r, n: r.match_prefix(GOOD[:1].reshape(())), InvalidInputError, "1-D"),
    ("reader match int with fields", lambda w, r, n: r.match_prefix(GOOD.view(INT_WITH_FIELDS)), InvalidInputError, "integer dtype"),
    ("match_keys int64", lambda w, r, n: r.match_keys(np.zeros((2, 2), dtype=np.int64)), InvalidInputError, "uint64"),
    ("match_keys 1-D", lambda w, r, n: r.match_keys(np.zeros(4, dtype=np.uint64)), InvalidInputError, "(n, 2)"),
    ("match_keys list", lambda w, r, n: r.match_keys([[1, 2]]), InvalidInputError, "(n, 2)"),
    ("match_and_pin float tokens", lambda w, r, n: r.match_and_pin(GOOD.astype(float)), InvalidInputError, "integer dtype"),
    ("reader unpin a plain match", lambda w, r, n: r.unpin(r.match_prefix(GOOD + 100)), InvalidInputError, "handle"),
    ("unpin not pinned", lambda w, r, n: w.unpin(GOOD + 100), InvalidInputError, "not pinned"),
    ("pin bad tokens", lambda w, r, n: w.pin(np.ones((2, 2), dtype=np.int32)), InvalidInputError, "1-D"),
    ("unpin a released handle", lambda w, r, n: w.unpin(HANDLES["released"]), InvalidInputError, "already released"),
    ("unpin another writer's handle", lambda w, r, n: w.unpin(HANDLES["other"]), InvalidInputError, "another Writer"),
    ("writer unpin a reader handle", lambda w, r, n: w.unpin(r.match_and_pin(GOOD)), InvalidInputError, "Reader's unpin"),
    ("find_pin bad tokens", lambda w, r, n: w.find_pin([1.5] * 4), InvalidInputError, "token 0 is 1.5"),
    ("remove strings", lambda w, r, n: w.remove(["a"]), InvalidInputError, "int64"),
    ("remove float array", lambda w, r, n: w.remove(np.ones(2)), InvalidInputError, "integer"),
    ("evict negative", lambda w, r, n: w.evict(-1), InvalidInputError, "non-negative"),
    ("evict float", lambda w, r, n: w.evict(2.0), InvalidInputError, "non-negative"),
    ("block_keys block size 0", lambda w, r, n: block_keys(GOOD, block_size=0), InvalidInputError, "block_size"),
    ("block_keys negative seed", lambda w, r, n: block_keys(GOOD, seed=-1), InvalidInputError, "seed"),
    ("create capacity 0", lambda w, r, n: Writer.create(n + "x", capacity=0), InvalidInputError, "capacity must be between"),
    ("create capacity float", lambda w, r, n: Writer.create(n + "x", capacity=10.0), InvalidInputError, "capacity must be an int"),
    ("create capacity bool", lambda w, r, n: Writer.create(n + "x", capacity=True), InvalidInputError, "capacity must be an int"),
    ("create huge capacity", lambda w, r, n: Writer.create(n + "x", capacity=2**40), InvalidInputError, "between 1 and"),
    ("create block size 0", lambda w, r, n: Writer.create(n + "x", capacity=8, block_size=0), InvalidInputError, "block_size"),
    ("create world-writable", lambda w, r, n: Writer.create(n + "x", capacity=8, mode=0o666), InvalidInputError, "mode"),
    ("create bad seed", lambda w, r, n: Writer.create(n + "x", capacity=8, seed=2**128), InvalidInputError, "seed"),
    ("create reader_pins 0", lambda w, r, n: Writer.create(n + "x", capacity=8, reader_pins=0), InvalidInputError, "reader_pins"),
    ("create invalid name", lambda w, r, n: Writer.create("../etc/passwd", capacity=8), InvalidNameError, "invalid segment name"),
    ("create empty name", lambda w, r, n: Writer.create("", capacity=8), InvalidNameError, "1-200 characters"),
    ("create non-str name", lambda w, r, n: Writer.create(42, capacity=8), InvalidNameError, "invalid segment name"),
    ("open unknown segment", lambda w, r, n: Writer.open(n + "-missing"), SegmentNotFoundError, "start its writer first"),
    ("attach unknown segment", lambda w, r, n: Reader.attach(n + "-missing"), SegmentNotFoundError, "no shmcache segment"),
    ("attach invalid name", lambda w, r, n: Reader.attach("a/b"), InvalidNameError, "invalid segment name"),
    ("client negative spin", lambda w, r, n: Client.connect(n, spin_us=-1), InvalidInputError, "spin_us"),
]


@pytest.fixture(scope="module")
def segment(request):
    import uuid

    import shmcache

    name = f"t-bad-{uuid.uuid4().hex[:12]}"
    w = Writer.create(name, capacity=32, block_size=4)
    w.insert(GOOD + 100, [100, 101, 102, 103])
    HANDLES["released"] = w.pin(GOOD + 100)
    w.unpin(GOOD + 100)
    other = Writer.create(name + "-other", capacity=8, block_size=4)
    other.insert(GOOD, [1, 2, 3, 4])
    HANDLES["other"] = other.pin(GOOD)
    r = Reader.attach(name)
    yield w, r, name
    r.close()
    w.close()
    other.close(unlink=True)
    shmcache.unlink(name)


@pytest.mark.parametrize("call, exc, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_segment_intact(segment, call, exc, fragment):
    w, r, name = segment
    before = live_states(w._map.data, w.geometry)
    ops = w.stats()["operations"]
    with pytest.raises(exc) as info:
        call(w, r, name)
    assert isinstance(info.value, ShmCacheError)
    assert fragment in str(info.value)
    assert live_states(w._map.data, w.geometry) == before
    assert w.stats()["operations"] == ops, "a refused call must not change the segment"
    w.check()
    assert r.match_prefix(GOOD + 100).values.tolist() == [100, 101, 102, 103]


def test_readme_table_lists_every_case():
    """The README's bad-input table is this file's case list, row for row."""
    import pathlib

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `") and " | `" in line]
    ids = [row.split(" | ")[1] for row in rows if row.split(" | ")[1] in {c[0] for c in CASES}]
    assert ids == [c[0] for c in CASES]


def test_a_match_checks_the_tokens_it_reads_and_no_further(segment):
    """A match hashes ``CHUNK`` blocks at a time and stops at the chunk of its
    first miss, so its cost follows the hit, not the prompt: a bad id in a
    chunk it walks raises, one past that chunk is not reported. The writer
    reads, and checks, every id."""
    from shmcache.matcher import CHUNK

    w, r, _ = segment
    before = live_states(w._map.data, w.geometry)
    chunk_tokens = CHUNK * r.block_size
    prompt = np.r_[GOOD + 100, np.arange(3 * chunk_tokens) + 7000]  # 4 cached blocks, then misses
    late, next_chunk, early = prompt.copy(), prompt.copy(), prompt.copy()
    late[-1] = -1
    next_chunk[chunk_tokens] = -1  # hashed ahead of the walk, which misses before it
    early[chunk_tokens - 1] = -1  # in the first chunk, after the miss at block 4
    for unread in (late, next_chunk):
        m = r.match_prefix(unread)
        assert (m.length, m.values.tolist()) == (16, [100, 101, 102, 103])
    for match in (r.match_prefix, r.match_owners, w.match_prefix):
        with pytest.raises(InvalidInputError, match=f"token {chunk_tokens - 1} is -1"):
            match(early)
    with pytest.raises(InvalidInputError, match=f"token {len(late) - 1} is -1"):
        w.insert(late, np.arange(len(late) // r.block_size) + 9000)
    assert live_states(w._map.data, w.geometry) == before
