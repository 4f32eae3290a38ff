"""Chained 128-bit block keys: XXH3-128 in Numba, and the key chain over tokens.

A prompt of ``n`` full blocks has keys ``k_0 .. k_{n-1}``::

    root  = XXH3_128(seed_lo || seed_hi || tag || namespace bytes)
    k_i   = XXH3_128(k_{i-1} || token[i*B] || ... || token[i*B + B - 1])     (k_{-1} = root)

Every integer is serialised little-endian: a 128-bit key as its low 64 bits
then its high 64 bits (16 bytes), each token as 4 bytes (token ids are in
``[0, 2**32)``), the seed as two 64-bit words. ``tag`` is one byte saying
what the namespace was (0 none, 1 bytes, 2 str as UTF-8, 3 int as 8 bytes),
so ``"7"``, ``b"7"`` and ``7`` name different namespaces. XXH3_128 is the
published XXH3 128-bit hash with seed 0 and the default secret, so any
language with an xxHash binding computes the same keys; the tests prove
this implementation bit-exact against the ``xxhash`` package.

Keys are returned as ``(n, 2)`` uint64 arrays: column 0 the low word,
column 1 the high word.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .atomics import hide_data, load_u64_unaligned, mul128, weakest_view

# --- XXH3 constants (xxhash.h, XXH3 specification) -------------------------
_P32_1 = np.uint64(0x9E3779B1)
_P32_2 = np.uint64(0x85EBCA77)
_P32_3 = np.uint64(0xC2B2AE3D)
_P64_1 = np.uint64(0x9E3779B185EBCA87)
_P64_2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P64_3 = np.uint64(0x165667B19E3779F9)
_P64_4 = np.uint64(0x85EBCA77C2B2AE63)
_P64_5 = np.uint64(0x27D4EB2F165667C5)
_PMX_1 = np.uint64(0x165667919E3779F9)
_PMX_2 = np.uint64(0x9FB21C651E98DF25)

_SECRET = np.frombuffer(
    bytes.fromhex(
        "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
        "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
        "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
        "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
        "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
        "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
    ),
    dtype=np.uint8,
).copy()
_SECRET_SIZE = 192
_SECRET_SIZE_MIN = 136
_STRIPE = 64
_STRIPES_PER_BLOCK = (_SECRET_SIZE - _STRIPE) // 8
_BLOCK_LEN = _STRIPE * _STRIPES_PER_BLOCK

_U64_0 = np.uint64(0)
_U64_1 = np.uint64(1)
_MASK32 = np.uint64(0xFFFFFFFF)
MAX_TOKEN = 0xFFFFFFFF

NS_NONE, NS_BYTES, NS_STR, NS_INT = 0, 1, 2, 3


# An input is a "source": ``(k0, k1, plen, arr, base, secret)`` is the
# ``plen``-byte prefix k0||k1 (plen is 0 or 16) followed by the bytes of
# ``arr`` from byte ``base``, to be hashed with ``secret`` (``_SECRET``, or
# the same array through ``hide_data``: see ``chain_into``). Chain hashing
# reads the previous key from registers and the tokens in place, with no
# copy; plain hashing uses plen 0. Reads inside the prefix happen only at
# offsets that are multiples of 4 (chained inputs are 16 + 4*B bytes), and
# only for inputs over 16 bytes.


@njit(inline="always")
def _sec(src, off):
    return load_u64_unaligned(src[5], off)


@njit(inline="always")
def _sec32(src, off):
    return _sec(src, off) & _MASK32


@njit(inline="always")
def _rd(src, off):
    k0, k1, plen, arr, base, _ = src
    if off >= plen:
        return load_u64_unaligned(arr, base + off - plen)
    if off == 0:
        return k0
    if off == 8:
        return k1
    if off == 4:
        return (k0 >> np.uint64(32)) | (k1 << np.uint64(32))
    return (k1 >> np.uint64(32)) | (np.uint64(arr[base // 4]) << np.uint64(32))


@njit(inline="always")
def _rd32(src, off):
    return _rd(src, off) & _MASK32


@njit(inline="always")
def _rd8(src, off):
    return _rd(src, off) & np.uint64(0xFF)


@njit(inline="always")
def _xorshift(h, s):
    return h ^ (h >> np.uint64(s))


@njit(inline="always")
def _avalanche3(h):
    h = _xorshift(h, 37) * _PMX_1
    return _xorshift(h, 32)


@njit(inline="always")
def _avalanche64(h):
    h = _xorshift(h, 33) * _P64_2
    h = _xorshift(h, 29) * _P64_3
    return _xorshift(h, 32)


@njit(inline="always")
def _fold64(a, b):
    lo, hi = mul128(a, b)
    return lo ^ hi


@njit(inline="always")
def _swap32(x):
    return (
        ((x << np.uint64(24)) & np.uint64(0xFF000000))
        | ((x << np.uint64(8)) & np.uint64(0x00FF0000))
        | ((x >> np.uint64(8)) & np.uint64(0x0000FF00))
        | ((x >> np.uint64(24)) & np.uint64(0x000000FF))
    )


@njit(inline="always")
def _swap64(x):
    return (_swap32(x & _MASK32) << np.uint64(32)) | _swap32(x >> np.uint64(32))


@njit(inline="always")
def _rotl32(x, r):
    return ((x << np.uint64(r)) | (x >> np.uint64(32 - r))) & _MASK32


@njit(inline="always")
def _mix16(src, off, soff):
    return _fold64(_rd(src, off) ^ _sec(src, soff), _rd(src, off + 8) ^ _sec(src, soff + 8))


@njit(inline="always")
def _mix32(lo, hi, src, off1, off2, soff):
    lo += _mix16(src, off1, soff)
    lo ^= _rd(src, off2) + _rd(src, off2 + 8)
    hi += _mix16(src, off2, soff + 16)
    hi ^= _rd(src, off1) + _rd(src, off1 + 8)
    return lo, hi


@njit(inline="always")
def _finish_mid(lo, hi, length):
    n = np.uint64(length)
    h_lo = _avalanche3(lo + hi)
    h_hi = _U64_0 - _avalanche3(lo * _P64_1 + hi * _P64_4 + n * _P64_2)
    return h_lo, h_hi


@njit
def _len_0to16(src, length):
    n = np.uint64(length)
    if length > 8:
        flip_lo = _sec(src, 32) ^ _sec(src, 40)
        flip_hi = _sec(src, 48) ^ _sec(src, 56)
        in_lo = _rd(src, 0)
        in_hi = _rd(src, length - 8)
        m_lo, m_hi = mul128(in_lo ^ in_hi ^ flip_lo, _P64_1)
        m_lo += (n - _U64_1) << np.uint64(54)
        in_hi ^= flip_hi
        m_hi += in_hi + (in_hi & _MASK32) * (_P32_2 - _U64_1)
        m_lo ^= _swap64(m_hi)
        h_lo, h_hi = mul128(m_lo, _P64_2)
        h_hi += m_hi * _P64_2
        return _avalanche3(h_lo), _avalanche3(h_hi)
    if length >= 4:
        in_lo = _rd32(src, 0)
        in_hi = _rd32(src, length - 4)
        in64 = in_lo + (in_hi << np.uint64(32))
        keyed = in64 ^ (_sec(src, 16) ^ _sec(src, 24))
        m_lo, m_hi = mul128(keyed, _P64_1 + (n << np.uint64(2)))
        m_hi += m_lo << _U64_1
        m_lo ^= m_hi >> np.uint64(3)
        m_lo = _xorshift(m_lo, 35) * _PMX_2
        m_lo = _xorshift(m_lo, 28)
        return m_lo, _avalanche3(m_hi)
    if length > 0:
        c1 = _rd8(src, 0)
        c2 = _rd8(src, length >> 1)
        c3 = _rd8(src, length - 1)
        comb_lo = (c1 << np.uint64(16)) | (c2 << np.uint64(24)) | c3 | (n << np.uint64(8))
        comb_hi = _rotl32(_swap32(comb_lo), 13)
        flip_lo = _sec32(src, 0) ^ _sec32(src, 4)
        flip_hi = _sec32(src, 8) ^ _sec32(src, 12)
        return _avalanche64(comb_lo ^ flip_lo), _avalanche64(comb_hi ^ flip_hi)
    return _avalanche64(_sec(src, 64) ^ _sec(src, 72)), _avalanche64(_sec(src, 80) ^ _sec(src, 88))


@njit(inline="always")
def _len_17to128(src, length):
    lo = np.uint64(length) * _P64_1
    hi = _U64_0
    if length > 32:
        if length > 64:
            if length > 96:
                lo, hi = _mix32(lo, hi, src, 48, length - 64, 96)
            lo, hi = _mix32(lo, hi, src, 32, length - 48, 64)
        lo, hi = _mix32(lo, hi, src, 16, length - 32, 32)
    lo, hi = _mix32(lo, hi, src, 0, length - 16, 0)
    return _finish_mid(lo, hi, length)


@njit
def _len_129to240(src, length):
    lo = np.uint64(length) * _P64_1
    hi = _U64_0
    for i in range(4):
        lo, hi = _mix32(lo, hi, src, 32 * i, 32 * i + 16, 32 * i)
    lo = _avalanche3(lo)
    hi = _avalanche3(hi)
    for i in range(4, length // 32):
        lo, hi = _mix32(lo, hi, src, 32 * i, 32 * i + 16, 3 + 32 * (i - 4))
    lo, hi = _mix32(lo, hi, src, length - 16, length - 32, _SECRET_SIZE_MIN - 17 - 16)
    return _finish_mid(lo, hi, length)


@njit(inline="always")
def _mul32(k):
    return (k & _MASK32) * (k >> np.uint64(32))


@njit(inline="always")
def _accumulate_pair(a_even, a_odd, src, off, soff):
    """Lanes 2j and 2j+1 of one stripe: each lane adds its neighbour's input
    and the 32x32 product of its own keyed input."""
    v_even = _rd(src, off)
    v_odd = _rd(src, off + 8)
    return (
        a_even + v_odd + _mul32(v_even ^ _sec(src, soff)),
        a_odd + v_even + _mul32(v_odd ^ _sec(src, soff + 8)),
    )


@njit(inline="always")
def _accumulate_512(acc, src, off, soff):
    """One 64-byte stripe into the 8 accumulators (a tuple: the kernels that
    hash allocate nothing, so they run without Numba's reference counting)."""
    a0, a1 = _accumulate_pair(acc[0], acc[1], src, off, soff)
    a2, a3 = _accumulate_pair(acc[2], acc[3], src, off + 16, soff + 16)
    a4, a5 = _accumulate_pair(acc[4], acc[5], src, off + 32, soff + 32)
    a6, a7 = _accumulate_pair(acc[6], acc[7], src, off + 48, soff + 48)
    return (a0, a1, a2, a3, a4, a5, a6, a7)


@njit(inline="always")
def _scramble(src, a, soff):
    return (_xorshift(a, 47) ^ _sec(src, soff)) * _P32_1


@njit
def _hash_long(src, length):
    acc = (_P32_3, _P64_1, _P64_2, _P64_3, _P64_4, _P32_2, _P64_5, _P32_1)
    n_blocks = (length - 1) // _BLOCK_LEN
    last = _SECRET_SIZE - _STRIPE
    for b in range(n_blocks):
        for s in range(_STRIPES_PER_BLOCK):
            acc = _accumulate_512(acc, src, b * _BLOCK_LEN + s * _STRIPE, s * 8)
        acc = (
            _scramble(src, acc[0], last), _scramble(src, acc[1], last + 8),
            _scramble(src, acc[2], last + 16), _scramble(src, acc[3], last + 24),
            _scramble(src, acc[4], last + 32), _scramble(src, acc[5], last + 40),
            _scramble(src, acc[6], last + 48), _scramble(src, acc[7], last + 56),
        )
    n_stripes = ((length - 1) - _BLOCK_LEN * n_blocks) // _STRIPE
    for s in range(n_stripes):
        acc = _accumulate_512(acc, src, n_blocks * _BLOCK_LEN + s * _STRIPE, s * 8)
    acc = _accumulate_512(acc, src, length - _STRIPE, _SECRET_SIZE - _STRIPE - 7)
    n = np.uint64(length)
    lo = n * _P64_1
    hi = ~(n * _P64_2)
    for i in range(4):
        lo += _fold64(acc[2 * i] ^ _sec(src, 11 + 16 * i), acc[2 * i + 1] ^ _sec(src, 19 + 16 * i))
        hi += _fold64(
            acc[2 * i] ^ _sec(src, _SECRET_SIZE - _STRIPE - 11 + 16 * i),
            acc[2 * i + 1] ^ _sec(src, _SECRET_SIZE - _STRIPE - 3 + 16 * i),
        )
    return _avalanche3(lo), _avalanche3(hi)


@njit(inline="always")
def xxh3_128(src, length):
    """XXH3-128 (seed 0, default secret) of the first ``length`` bytes of a source.

    Returns ``(low64, high64)`` as uint64.
    """
    if length <= 16:
        return _len_0to16(src, length)
    if length <= 128:
        return _len_17to128(src, length)
    if length <= 240:
        return _len_129to240(src, length)
    return _hash_long(src, length)


@njit
def first_bad(tokens):
    """Index of the first token outside ``[0, 2**32)``, or -1."""
    for i in range(tokens.shape[0]):
        t = np.int64(tokens[i])
        if t < 0 or t > MAX_TOKEN:
            return i
    return -1


@njit(cache=True, nogil=True, _nrt=False)
def narrow_tokens(tokens, out):
    """Write ``tokens[:len(out)]`` into the uint32 array ``out``; returns the
    index of the first token of ``tokens`` (all of them) outside
    ``[0, 2**32)``, or -1. One pass: the check rides along the copy."""
    n = out.shape[0]
    acc = np.int64(0)
    for i in range(n):
        t = np.int64(tokens[i])
        acc |= t
        out[i] = np.uint32(t & 0xFFFFFFFF)
    for i in range(n, tokens.shape[0]):
        acc |= np.int64(tokens[i])
    return first_bad(tokens) if acc >> 32 != 0 else -1


def tokens_u32(tokens, scratch):
    """The tokens as a uint32 array and the index of the first one outside
    ``[0, 2**32)`` (-1 if none). Compiled per dtype: uint32 is used as it is,
    int32 is reinterpreted after a sign check, anything else is narrowed
    into ``scratch``. Each is one branch-free, vectorisable pass."""
    raise NotImplementedError("only callable from Numba kernels")


@overload(tokens_u32, jit_options={"nogil": True})
def _tokens_u32(tokens, scratch):
    # Each returns a weakest_view, so that chain_into compiles once for all.
    if tokens.dtype == types.uint32:
        return lambda tokens, scratch: (weakest_view(tokens), -1)

    if tokens.dtype == types.int32:

        def impl(tokens, scratch):
            acc = np.int32(0)
            for i in range(tokens.shape[0]):
                acc |= tokens[i]
            return weakest_view(tokens.view(np.uint32)), (first_bad(tokens) if acc < 0 else -1)

        return impl

    def impl(tokens, scratch):
        out = scratch[: tokens.shape[0]]
        return weakest_view(out), narrow_tokens(weakest_view(tokens), out)

    return impl


@njit(inline="always")
def _chain(hash_fn, secret, t32, n_blocks, block_size, lo, hi, out):
    length = 16 + 4 * block_size
    for b in range(n_blocks):
        lo, hi = hash_fn((lo, hi, 16, t32, 4 * b * block_size, secret), length)
        out[b, 0] = lo
        out[b, 1] = hi


@njit(cache=True, nogil=True, _nrt=False)
def chain_into(t32, n_blocks, block_size, lo, hi, out):
    """Write the chained keys of the first ``n_blocks`` blocks of the uint32
    tokens ``t32`` from root ``(lo, hi)`` into ``out``.

    Block size 16 (vLLM's default) gets its own loop, for little extra
    compile time: it calls XXH3's 17-128-byte path directly with a constant
    length (80 bytes), and reads the secret through ``hide_data``. Folded
    into immediates, the secret's twelve words cost a ``movabs`` each per
    block, in a loop bound by instruction throughput as much as by its chain
    of multiplies. Measured per block: 7.7 ns generic, 7.2 ns with the
    constant length, 6.4 ns with the hidden secret. The generic loop keeps
    the plain secret: hiding it gained nothing there, and lost 7% at block
    size 32.

    A kernel of its own, not inlined into its callers: Numba inlines the
    hash helpers at its IR level (LLVM alone inlined too little: 2x slower
    chains), which costs about a minute per compiled copy. Every caller and
    token dtype shares this one copy (per ``out`` layout), for about 0.05 us
    of call per prompt.
    """
    if block_size == 16:
        _chain(_len_17to128, hide_data(_SECRET), t32, n_blocks, 16, lo, hi, out)
    else:
        _chain(xxh3_128, _SECRET, t32, n_blocks, block_size, lo, hi, out)


@njit(cache=True, nogil=True, _nrt=False)
def chain_keys(tokens, n_blocks, block_size, root_lo, root_hi, scratch, out):
    """Write the chained keys of the first ``n_blocks`` blocks into ``out``.

    ``scratch`` is uint32 workspace of at least ``n_blocks * block_size``
    words. Returns -1 on success, else the index of the first token outside
    ``[0, 2**32)`` (``out`` is then not written).
    """
    t32, bad = tokens_u32(tokens[: n_blocks * block_size], scratch)
    if bad >= 0:
        return bad
    chain_into(t32, n_blocks, block_size, root_lo, root_hi, out)
    return -1


@njit(cache=True, nogil=True)
def xxh3_128_bytes(data):
    """XXH3-128 of a whole uint8 array; ``(low64, high64)``."""
    return xxh3_128((_U64_0, _U64_0, 0, data, 0, _SECRET), data.shape[0])
