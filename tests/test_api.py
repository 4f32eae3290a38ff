"""Writer and Reader behaviour through the public API, in one process."""

from __future__ import annotations

import numpy as np
import pytest

import shmcache
from shmcache import CacheFullError, ClosedError, InvalidInputError, PrefixMatch, Reader, Writer, block_keys


def prompt(*blocks: int, bs: int = 4) -> np.ndarray:
    """Tokens whose block i is filled with ``blocks[i]``: equal leading ids mean a shared prefix."""
    return np.repeat(np.asarray(blocks, dtype=np.int64), bs)


@pytest.fixture
def w(shm_name):
    with Writer.create(shm_name, capacity=32, block_size=4) as writer:
        yield writer


def test_insert_returns_cached_prefix_and_keeps_old_values(w):
    assert w.insert(prompt(1, 2, 3), [10, 11, 12]) == 0
    assert w.insert(prompt(1, 2, 4, 5), [90, 91, 13, 14]) == 8
    m = w.match_prefix(prompt(1, 2, 4, 5, 6))
    assert isinstance(m, PrefixMatch)
    assert m.length == 16 and m.values.tolist() == [10, 11, 13, 14]
    assert w.match_prefix(prompt(1, 2, 3)).values.tolist() == [10, 11, 12]
    w.check()


def test_trailing_partial_block_is_never_cached(w):
    toks = np.arange(10)
    assert w.insert(toks, [1, 2]) == 0
    assert w.match_prefix(toks).length == 8
    assert w.stats()["live_blocks"] == 2


def test_reader_sees_writer_content_and_match_keys_agrees(shm_name, w):
    w.insert(prompt(1, 2, 3), [10, 11, 12])
    with Reader.attach(shm_name) as r:
        for toks in (prompt(1, 2, 3, 9), prompt(1, 2, 3, 9).astype(np.int32), prompt(1, 2, 3, 9).tolist()):
            m = r.match_prefix(toks)
            assert (m.length, m.values.tolist()) == (12, [10, 11, 12])
        keys = r.block_keys(prompt(1, 2, 3, 9))
        assert r.match_keys(keys).values.tolist() == [10, 11, 12]
        same = block_keys(prompt(1, 2, 3, 9), block_size=4, seed=r.seed)
        assert np.array_equal(same, keys)
        assert r.match_prefix(prompt(2, 2)).length == 0
        s = r.stats()
        assert s["queries"] == 5 and s["hit_blocks"] == 12 and s["live_blocks"] == 3


def test_matched_values_are_the_callers_and_a_miss_shares_one_read_only_empty_array(shm_name, w):
    w.insert(prompt(1, 2, 3), [10, 11, 12])
    with Reader.attach(shm_name) as r:
        full, part = r.match_prefix(prompt(1, 2, 3)), r.match_prefix(prompt(1, 2, 9))
        full.values[0] = part.values[0] = -1  # the caller's: writing them changes nothing else
        assert r.match_prefix(prompt(1, 2, 3)).values.tolist() == [10, 11, 12]
        assert r.match_keys(r.block_keys(prompt(1, 9))).values.tolist() == [10]
        misses = [r.match_prefix(prompt(9, 9)), r.match_keys(r.block_keys(prompt(9))), r.match_prefix(prompt()),
                  w.match_prefix(prompt(9))]
        for m in misses:
            assert m.length == 0 and m.values.shape == (0,) and m.values.dtype == np.int64
            assert not m.values.flags.writeable
            with pytest.raises(ValueError):
                m.values.setflags(write=True)  # it owns no memory: nobody can make it writable
            with pytest.raises(ValueError):
                m.values.resize(4, refcheck=False)
        assert all(m.values is misses[0].values for m in misses)
        m = misses[0]
        m.values.shape = (5, 0)  # a caller reshaping the shared array in place ...
        try:
            with r.match_and_pin(prompt(9, 9)) as h:  # ... changes no later answer: pins follow the length
                assert h.length == 0 and len(h.values) == 0
        finally:
            m.values.shape = (0,)


def token_forms(toks: np.ndarray) -> dict[str, object]:
    """The same ids in every form a caller may hold them: each dtype and byte
    order, strided, reversed, read-only, misaligned, an ndarray subclass, a
    list."""
    forms: dict[str, object] = {str(np.dtype(t)): toks.astype(t) for t in
                                (np.int64, np.int32, np.uint32, np.uint64, np.int16, np.uint16, np.uint8)}
    forms["big-endian"] = toks.astype(">i8")
    forms["strided"] = np.repeat(toks, 2)[::2]
    forms["reversed view"] = toks[::-1].copy()[::-1]
    readonly = toks.copy()
    readonly.flags.writeable = False
    forms["read-only"] = readonly
    misaligned = np.zeros(toks.size * 8 + 4, np.uint8)[4:].view(np.int64)
    misaligned[:] = toks
    forms["misaligned"] = misaligned
    forms["subclass"] = toks.view(np.memmap)
    forms["list"] = toks.tolist()
    return forms


#: Forms the Reader's hot path takes straight to the kernel (1-D C-contiguous
#: ndarrays) once their dtype has been met; the dtype forms come first.
DTYPE_FORMS = {"int64", "int32", "uint32", "uint64", "int16", "uint16", "uint8"}
DIRECT_FORMS = DTYPE_FORMS | {"read-only", "misaligned"}


def test_every_token_form_gets_the_same_answer(shm_name, w, monkeypatch):
    from shmcache import reader

    w.insert(prompt(1, 2, 3), [10, 11, 12])
    assert not token_forms(prompt(1))["misaligned"].flags.aligned
    monkeypatch.setattr(reader, "_KERNELS", {key: {} for key in reader._KERNELS})  # every dtype's first match: checked
    checked, real = [], reader.checked_tokens

    def spy(tokens, block_size):
        checked.append(tokens)
        return real(tokens, block_size)

    monkeypatch.setattr(reader, "checked_tokens", spy)
    with Reader.attach(shm_name) as r:
        for rnd in range(2):
            checked.clear()
            for form, toks in token_forms(prompt(1, 2, 3, 9)).items():
                for m in (r.match_prefix(toks), w.match_prefix(toks)):
                    assert (m.length, m.values.tolist()) == (12, [10, 11, 12]), form
                first_of_dtype = rnd == 0 and form in DTYPE_FORMS
                assert any(t is toks for t in checked) == (first_of_dtype or form not in DIRECT_FORMS), form
            for form, toks in token_forms(prompt(1, 7, 3, 9)).items():
                assert r.match_prefix(toks).values.tolist() == [10], form
        for toks in (np.zeros(0, np.int64), prompt(1)[:1], np.repeat(prompt(1), 3)[::12]):  # empty; 1 element, odd strides
            assert r.match_prefix(toks).length == 0
    for form, toks in token_forms(prompt(5, 6)).items():
        assert w.insert(toks, [50, 51]) == (0 if form == "int64" else 8), form
    assert w.match_prefix(prompt(5, 6)).values.tolist() == [50, 51]


def test_namespaces_never_share_blocks(w):
    w.insert(prompt(1, 2), [1, 2], namespace="model-a")
    assert w.match_prefix(prompt(1, 2), namespace="model-b").length == 0
    assert w.match_prefix(prompt(1, 2)).length == 0
    assert w.match_prefix(prompt(1, 2), namespace="model-a").length == 8


def test_full_cache_evicts_lru_leaves_and_reports_them(shm_name):
    got = []
    with Writer.create(shm_name, capacity=4, block_size=4, on_evict=lambda v: got.extend(v.tolist())) as w:
        w.insert(prompt(1, 2), [10, 11])
        w.insert(prompt(3, 4), [30, 31])
        w.match_prefix(prompt(1, 2))  # (1,2) is now more recent than (3,4)
        w.insert(prompt(5), [50])
        assert got == [31]
        w.insert(prompt(6), [60])
        assert got == [31, 30]  # cascade: 3 became a leaf once 4 was evicted
        assert w.match_prefix(prompt(1, 2)).length == 8
        w.check()


def test_reader_hits_count_as_uses(shm_name):
    with Writer.create(shm_name, capacity=4, block_size=4) as w, Reader.attach(shm_name) as r:
        w.insert(prompt(1, 2), [10, 11])
        w.insert(prompt(3, 4), [30, 31])
        r.match_prefix(prompt(1, 2))
        assert w.evict(2).tolist() == [31, 30]


def test_insert_never_evicts_its_own_path(shm_name):
    with Writer.create(shm_name, capacity=3, block_size=4) as w:
        w.insert(prompt(1), [10])
        w.insert(prompt(2, 3), [20, 21])
        assert w.insert(prompt(1, 5), [99, 15]) == 4
        assert w.match_prefix(prompt(1, 5)).values.tolist() == [10, 15]
        w.check()


def test_remove_drops_subtrees_children_first(w):
    w.insert(prompt(1, 2, 3), [10, 11, 12])
    w.insert(prompt(1, 2, 4), [10, 11, 14])
    w.insert(prompt(1, 5), [10, 15])
    removed = w.remove([11, 999])
    assert sorted(removed.tolist()) == [11, 12, 14] and removed[-1] == 11
    assert w.match_prefix(prompt(1, 2, 3)).values.tolist() == [10]
    assert w.match_prefix(prompt(1, 5)).values.tolist() == [10, 15]
    w.check()


def test_pins_protect_blocks_and_their_ancestors(shm_name):
    with Writer.create(shm_name, capacity=3, block_size=4) as w:
        w.insert(prompt(1, 2), [10, 11])
        assert w.pin(prompt(1, 2, 7)).length == 8
        w.insert(prompt(3), [30])
        with pytest.raises(CacheFullError, match="pinned"):
            w.insert(prompt(4, 5), [40, 41])
        assert w.evict(5).tolist() == [30]
        assert w.unpin(prompt(1, 2, 7)) == 8
        with pytest.raises(InvalidInputError, match="not pinned"):
            w.unpin(prompt(1, 2, 7))
        assert w.evict(5).tolist() == [11, 10]
        w.check()


def test_clear_returns_everything_and_frees_all(w):
    w.insert(prompt(1, 2, 3), [10, 11, 12])
    w.insert(prompt(4), [40])
    assert sorted(w.clear().tolist()) == [10, 11, 12, 40]
    assert w.stats()["live_blocks"] == 0
    assert w.insert(prompt(1, 2, 3), [10, 11, 12]) == 0
    w.check()


def test_duplicate_values_are_refused_so_remove_stays_well_defined(w):
    w.insert(prompt(1), [10])
    with pytest.raises(InvalidInputError, match="already cached"):
        w.insert(prompt(2), [10])
    with pytest.raises(InvalidInputError, match="twice"):
        w.insert(prompt(3, 4), [5, 5])
    assert w.stats()["live_blocks"] == 1


def test_closed_handles_raise(shm_name):
    w = Writer.create(shm_name, capacity=8, block_size=4)
    r = Reader.attach(shm_name)
    r.close()
    r.close()
    with pytest.raises(ClosedError):
        r.match_prefix(prompt(1))
    w.close(unlink=True)
    with pytest.raises(ClosedError):
        w.insert(prompt(1), [1])
    assert not shmcache.exists(shm_name)


def test_writer_reopens_with_content_and_lru_and_without_its_pins(shm_name):
    """A writer's pins go with it: nobody is left to release them."""
    with Writer.create(shm_name, capacity=8, block_size=4) as w:
        w.insert(prompt(1, 2), [10, 11])
        pin = w.pin(prompt(1))
        assert w.stats()["pinned_blocks"] == 1
    assert not pin.pinned
    with Writer.open(shm_name) as w:
        assert w.recovered == 0
        assert w.match_prefix(prompt(1, 2)).values.tolist() == [10, 11]
        assert w.stats()["pinned_blocks"] == 0 and w.stats()["writer_epoch"] == 2
        with pytest.raises(InvalidInputError, match="another Writer"):
            w.unpin(pin)
        w.check()
        assert w.evict(8).tolist() == [11, 10]


def test_segment_bytes_per_block_within_budget(shm_name):
    with Writer.create(shm_name, capacity=1_000_000, block_size=16) as w:
        assert w.stats()["bytes_per_block"] <= 96


def test_unpin_by_tokens_releases_one_pin_of_exactly_those_tokens(shm_name):
    """Pins are per-block reference counts held through handles: unpin(A)
    after pin(AB) is no pin of A and changes nothing; unpin(AB) releases one
    of two pins of AB (the latest), the handle of the other still holds."""
    with Writer.create(shm_name, capacity=3, block_size=4) as w:
        w.insert(prompt(1, 2), [10, 11])
        first, second = w.pin(prompt(1, 2)), w.pin(np.r_[prompt(1, 2), 9])  # a partial block does not count
        with pytest.raises(InvalidInputError, match="not pinned"):
            w.unpin(prompt(1))
        assert w.find_pin(prompt(1, 2)) is second
        assert w.unpin(prompt(1, 2)) == 8 and not second.pinned and first.pinned
        assert w.stats()["pinned_blocks"] == 2
        w.insert(prompt(3), [30])
        with pytest.raises(CacheFullError):
            w.insert(prompt(4, 5), [40, 41])
        assert w.evict(3).tolist() == [30]
        assert w.unpin(first) == 8 and w.stats()["pinned_blocks"] == 0
        with pytest.raises(InvalidInputError, match="already released"):
            w.unpin(first)
        w.check()


def test_a_pin_is_released_exactly_whatever_happened_to_its_blocks(shm_name):
    """pin(ABC); remove C; insert C again (maybe in the same record); pin it
    anew; release the first pin: A and B are unpinned, the new C keeps the
    second pin only, and nothing stays pinned once both are released."""
    with Writer.create(shm_name, capacity=4, block_size=4) as w:
        w.insert(prompt(1, 2, 3), [10, 11, 12])
        old = w.pin(prompt(1, 2, 3))
        assert w.remove([12]).tolist() == [12]
        w.insert(prompt(1, 2, 3), [10, 11, 13])
        new = w.pin(prompt(1, 2, 3))
        assert w.unpin(old) == 8  # A and B: C went with the remove
        w.check()
        assert w.stats()["pinned_blocks"] == 3  # the new pin holds A, B, C
        assert w.unpin(new) == 12
        assert w.stats()["pinned_blocks"] == 0
        assert w.evict(4).tolist() == [13, 11, 10]
        w.check()


def test_prompts_longer_than_the_reader_workspace(shm_name):
    """A 16,384-token prompt (1,024 blocks) grows the reader's workspace."""
    toks = np.arange(16_384, dtype=np.int64)
    with Writer.create(shm_name, capacity=2048, block_size=16) as w, Reader.attach(shm_name) as r:
        w.insert(toks, np.arange(1024))
        assert r.match_prefix(toks).values.tolist() == list(range(1024))
        assert r.match_prefix(toks[:100]).length == 96
        assert r.match_keys(r.block_keys(toks)).length == 16_384
