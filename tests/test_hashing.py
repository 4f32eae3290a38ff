"""The Python XXH3-128 (namespace roots) and the Numba key chains are bit-exact
against the xxhash package."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from shmcache import InvalidInputError, block_keys
from shmcache.hashing import chain16, chain_any, chain_for, xxh3_128_py
from shmcache.keys import namespace_root


def ref_xxh3(data: bytes) -> int:
    return xxhash.xxh3_128_intdigest(data)


def ref_chain(tokens: np.ndarray, block_size: int, root: int) -> list[int]:
    keys, prev = [], root
    for b in range(len(tokens) // block_size):
        block = np.asarray(tokens[b * block_size:(b + 1) * block_size], dtype="<u4").tobytes()
        prev = ref_xxh3(prev.to_bytes(16, "little") + block)
        keys.append(prev)
    return keys


def as_ints(keys: np.ndarray) -> list[int]:
    return [int(hi) << 64 | int(lo) for lo, hi in keys]


@pytest.mark.parametrize("length", list(range(17, 300)) + [511, 512, 1023, 1024, 1025, 2048, 2049, 4113, 9000])
def test_python_xxh3_128_matches_reference_at_every_length_class(length):
    rng = np.random.default_rng(length)
    data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    lo, hi = xxh3_128_py(data)
    assert hi << 64 | lo == ref_xxh3(data)


def test_python_xxh3_128_refuses_what_no_root_needs():
    """A root's input is at least 17 bytes (seed and tag), so the short paths
    are left out rather than left untested."""
    with pytest.raises(ValueError, match="more than 16 bytes"):
        xxh3_128_py(bytes(16))


def test_block_size_16_has_its_own_kernel_equal_to_the_general_one():
    """Block size 16 never compiles the general XXH3 (``chain_for``), and
    its kernel gives the general kernel's keys."""
    assert chain_for(16) is chain16 and chain_for(32) is chain_any
    rng = np.random.default_rng(16)
    t32 = rng.integers(0, 2**32, 16 * 50, dtype=np.uint64).astype(np.uint32)
    fast, general = np.empty((50, 2), np.uint64), np.empty((50, 2), np.uint64)
    chain16(t32, 50, 16, np.uint64(3), np.uint64(5), fast)
    chain_any(t32, 50, 16, np.uint64(3), np.uint64(5), general)
    assert np.array_equal(fast, general)
    assert as_ints(fast) == ref_chain(t32, 16, 5 << 64 | 3)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_chain_keys_bit_exact_for_every_block_size_1_to_512(dtype):
    """Every block size crosses XXH3's length classes (17-128, 129-240, long)
    at a different point; all of them must match the reference."""
    rng = np.random.default_rng(512)
    for block_size in range(1, 513):
        tokens = rng.integers(0, 2**31 - 1, 2 * block_size + block_size // 2, dtype=np.int64).astype(dtype)
        seed = int(rng.integers(0, 2**63)) << 64 | int(rng.integers(0, 2**63))
        root_lo, root_hi = namespace_root("llama-3-8b", seed)
        expect_root = ref_xxh3(seed.to_bytes(16, "little") + bytes([2]) + b"llama-3-8b")
        assert root_hi << 64 | root_lo == expect_root
        got = as_ints(block_keys(tokens, block_size=block_size, namespace="llama-3-8b", seed=seed))
        assert got == ref_chain(tokens, block_size, expect_root), f"block size {block_size}"


def test_full_token_range_uint32_and_uint64():
    tokens = np.array([0, 1, 2**31, 2**32 - 1] * 4, dtype=np.uint64)
    root_lo, root_hi = namespace_root(None, 0)
    want = ref_chain(tokens, 4, root_hi << 64 | root_lo)
    assert as_ints(block_keys(tokens, 4)) == want
    assert as_ints(block_keys(tokens.astype(np.uint32), 4)) == want
    assert as_ints(block_keys(tokens.tolist(), 4)) == want


def test_namespaces_and_seeds_separate_chains():
    tokens = np.arange(32)
    variants = [block_keys(tokens, 16, ns, seed) for ns in (None, "7", b"7", 7) for seed in (0, 1)]
    firsts = {(int(k[0, 0]), int(k[0, 1])) for k in variants}
    assert len(firsts) == len(variants)


def test_partial_block_is_not_keyed():
    assert block_keys(np.arange(31), 16).shape == (1, 2)
    assert block_keys(np.arange(15), 16).shape == (0, 2)


@pytest.mark.parametrize("bad", [[-1, 2, 3, 4], [1, 2, 3, 2**32], np.array([0, 0, 0, -5]), np.array([0, 0, 2**40, 0])])
def test_out_of_range_tokens_are_refused(bad):
    with pytest.raises(InvalidInputError, match=r"\[0, 2\*\*32\)"):
        block_keys(bad, 4)


def test_100k_distinct_blocks_have_distinct_keys():
    """Predecessor bug 2: 64-bit symbols with the upper half discarded. Here
    100,000 distinct blocks get 100,000 distinct 128-bit keys, and neither
    half alone collides either."""
    tokens = np.arange(100_000 * 4, dtype=np.int64)
    keys = block_keys(tokens, 4)
    assert keys.shape == (100_000, 2)
    assert len({(int(a), int(b)) for a, b in keys}) == 100_000
    assert len(np.unique(keys[:, 0])) == 100_000
    assert len(np.unique(keys[:, 1])) == 100_000
