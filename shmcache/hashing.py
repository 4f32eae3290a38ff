"""Chained 128-bit block keys: the key chain over tokens in Numba, and XXH3-128
in Python for the namespace roots it starts from.

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
both implementations bit-exact against the ``xxhash`` package.

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
_MASK32 = np.uint64(0xFFFFFFFF)
MAX_TOKEN = 0xFFFFFFFF

NS_NONE, NS_BYTES, NS_STR, NS_INT = 0, 1, 2, 3


# An input is a "source": ``(k0, k1, plen, arr, base, secret)`` is the
# ``plen``-byte prefix k0||k1 (plen 16: the previous key) followed by the
# bytes of ``arr`` from byte ``base``, to be hashed with ``secret``. The key
# chain thus reads the previous key from registers and the tokens in place,
# with no copy. Reads inside the prefix happen only at offsets that are
# multiples of 4 (chained inputs are 16 + 4*B bytes).


@njit(inline="always")
def _sec(src, off):
    return load_u64_unaligned(src[5], off)


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
def _xorshift(h, s):
    return h ^ (h >> np.uint64(s))


@njit(inline="always")
def _avalanche3(h):
    h = _xorshift(h, 37) * _PMX_1
    return _xorshift(h, 32)


@njit(inline="always")
def _fold64(a, b):
    lo, hi = mul128(a, b)
    return lo ^ hi


@njit(inline="always")
def _mix32w(lo, hi, a0, a1, b0, b1, s0, s1, s2, s3):
    """XXH3's 32-byte mixing step on input words: ``a0, a1`` the 16 bytes at
    the first offset, ``b0, b1`` those at the second, ``s0..s3`` the four
    secret words from the step's secret offset."""
    lo += _fold64(a0 ^ s0, a1 ^ s1)
    lo ^= b0 + b1
    hi += _fold64(b0 ^ s2, b1 ^ s3)
    hi ^= a0 + a1
    return lo, hi


@njit(inline="always")
def _mix32(lo, hi, src, off1, off2, soff):
    return _mix32w(lo, hi, _rd(src, off1), _rd(src, off1 + 8), _rd(src, off2), _rd(src, off2 + 8),
                   _sec(src, soff), _sec(src, soff + 8), _sec(src, soff + 16), _sec(src, soff + 24))


@njit(inline="always")
def _finish_mid(lo, hi, length):
    n = np.uint64(length)
    h_lo = _avalanche3(lo + hi)
    h_hi = _U64_0 - _avalanche3(lo * _P64_1 + hi * _P64_4 + n * _P64_2)
    return h_lo, h_hi


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


@njit(cache=True)
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


@njit(cache=True)
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
def _xxh3_128_over16(src, length):
    """XXH3-128 (seed 0, default secret) of the first ``length`` bytes of a
    source, for ``length > 16``: a chained block is 16 + 4B >= 20 bytes, so
    XXH3's paths for 16 bytes and less are never taken, and never compiled.

    Returns ``(low64, high64)`` as uint64.
    """
    if length <= 128:
        return _len_17to128(src, length)
    if length <= 240:
        return _len_129to240(src, length)
    return _hash_long(src, length)


@njit(cache=True)
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
    # Each returns a weakest_view, so that a chain kernel compiles once for all.
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


@njit(cache=True, nogil=True, _nrt=False)
def chain16(t32, n_blocks, block_size, lo, hi, out):
    """Write the chained keys of the first ``n_blocks`` 16-token blocks of
    the uint32 tokens ``t32`` from root ``(lo, hi)`` into ``out``.
    ``block_size`` must be 16: it is there to share ``chain_any``'s
    signature, so that callers take either kernel as a parameter.

    vLLM's default block size gets its own kernel: a chained block is then
    80 bytes (the previous key, then 16 tokens), which XXH3 hashes with its
    17-128-byte path, written here over the ten input words. So written it
    compiles in about a second; the same path reached through
    ``_xxh3_128_over16``'s byte-offset reads took 15 s. The secret is read
    through ``hide_data`` into locals before the loop: folded into
    immediates, its twelve words would cost a ``movabs`` each per block, in
    a loop bound by instruction throughput as much as by its multiplies.
    """
    sec = hide_data(_SECRET)
    s0, s1, s2, s3 = (load_u64_unaligned(sec, 0), load_u64_unaligned(sec, 8),
                      load_u64_unaligned(sec, 16), load_u64_unaligned(sec, 24))
    s4, s5, s6, s7 = (load_u64_unaligned(sec, 32), load_u64_unaligned(sec, 40),
                      load_u64_unaligned(sec, 48), load_u64_unaligned(sec, 56))
    s8, s9, s10, s11 = (load_u64_unaligned(sec, 64), load_u64_unaligned(sec, 72),
                        load_u64_unaligned(sec, 80), load_u64_unaligned(sec, 88))
    start = np.uint64(80) * _P64_1
    for b in range(n_blocks):
        at = 64 * b
        t0, t1, t2, t3 = (load_u64_unaligned(t32, at), load_u64_unaligned(t32, at + 8),
                          load_u64_unaligned(t32, at + 16), load_u64_unaligned(t32, at + 24))
        t4, t5, t6, t7 = (load_u64_unaligned(t32, at + 32), load_u64_unaligned(t32, at + 40),
                          load_u64_unaligned(t32, at + 48), load_u64_unaligned(t32, at + 56))
        # _len_17to128 at length 80: input words 4-5 (offsets 32 and 32), then
        # 2-3 with 6-7 (16 and 48), then 0-1 (the key) with 8-9 (0 and 64).
        a, c = _mix32w(start, _U64_0, t2, t3, t2, t3, s8, s9, s10, s11)
        a, c = _mix32w(a, c, t0, t1, t4, t5, s4, s5, s6, s7)
        a, c = _mix32w(a, c, lo, hi, t6, t7, s0, s1, s2, s3)
        lo, hi = _finish_mid(a, c, 80)
        out[b, 0] = lo
        out[b, 1] = hi


@njit(cache=True, nogil=True, _nrt=False)
def chain_any(t32, n_blocks, block_size, lo, hi, out):
    """``chain16`` for any block size, through the general XXH3: slower to
    compile (about 40 s on a fresh machine) and about 20% slower per byte.
    ``chain_for`` picks the kernel, so a process whose segment has 16-token
    blocks never compiles this one."""
    length = 16 + 4 * block_size
    for b in range(n_blocks):
        lo, hi = _xxh3_128_over16((lo, hi, 16, t32, 4 * b * block_size, _SECRET), length)
        out[b, 0] = lo
        out[b, 1] = hi


def chain_for(block_size: int):
    """The key-chain kernel for a block size: ``chain16`` or ``chain_any``.
    Both take ``(t32, n_blocks, block_size, lo, hi, out)``."""
    return chain16 if block_size == 16 else chain_any


# --- XXH3-128 in Python, for namespace roots ---------------------------------
#
# A namespace's root is hashed once per namespace and process (``KeyChain``
# caches it), from at least 17 bytes of any length. Compiling the general
# XXH3 for it cost a reader 23 s on a fresh machine; in Python it costs
# microseconds a namespace. The tests prove both this and the kernels
# bit-exact against the xxhash package.

_M64 = (1 << 64) - 1
_SEC_BYTES = _SECRET.tobytes()
_PY = {k: int(v) for k, v in dict(P32_1=_P32_1, P32_2=_P32_2, P32_3=_P32_3, P64_1=_P64_1, P64_2=_P64_2,
                                    P64_3=_P64_3, P64_4=_P64_4, P64_5=_P64_5, PMX_1=_PMX_1).items()}


def _w(data: bytes, off: int) -> int:
    return int.from_bytes(data[off : off + 8], "little")


def _avalanche3_py(h: int) -> int:
    h = ((h ^ (h >> 37)) * _PY["PMX_1"]) & _M64
    return h ^ (h >> 32)


def _fold64_py(a: int, b: int) -> int:
    p = a * b
    return (p ^ (p >> 64)) & _M64


def _mix32_py(lo: int, hi: int, data: bytes, off1: int, off2: int, soff: int) -> tuple[int, int]:
    a0, a1, b0, b1 = _w(data, off1), _w(data, off1 + 8), _w(data, off2), _w(data, off2 + 8)
    s = _SEC_BYTES
    lo = ((lo + _fold64_py(a0 ^ _w(s, soff), a1 ^ _w(s, soff + 8))) & _M64) ^ ((b0 + b1) & _M64)
    hi = ((hi + _fold64_py(b0 ^ _w(s, soff + 16), b1 ^ _w(s, soff + 24))) & _M64) ^ ((a0 + a1) & _M64)
    return lo, hi


def _finish_mid_py(lo: int, hi: int, n: int) -> tuple[int, int]:
    h_hi = _avalanche3_py((lo * _PY["P64_1"] + hi * _PY["P64_4"] + n * _PY["P64_2"]) & _M64)
    return _avalanche3_py((lo + hi) & _M64), (-h_hi) & _M64


def _hash_long_py(data: bytes) -> tuple[int, int]:
    n = len(data)
    acc = [_PY["P32_3"], _PY["P64_1"], _PY["P64_2"], _PY["P64_3"], _PY["P64_4"], _PY["P32_2"], _PY["P64_5"],
           _PY["P32_1"]]
    s = _SEC_BYTES

    def stripe(off: int, soff: int) -> None:
        for j in range(8):
            v = _w(data, off + 8 * j)
            k = v ^ _w(s, soff + 8 * j)
            acc[j ^ 1] = (acc[j ^ 1] + v) & _M64
            acc[j] = (acc[j] + (k & 0xFFFFFFFF) * (k >> 32)) & _M64

    n_blocks = (n - 1) // _BLOCK_LEN
    for b in range(n_blocks):
        for st in range(_STRIPES_PER_BLOCK):
            stripe(b * _BLOCK_LEN + st * _STRIPE, st * 8)
        for j in range(8):
            acc[j] = ((acc[j] ^ (acc[j] >> 47) ^ _w(s, _SECRET_SIZE - _STRIPE + 8 * j)) * _PY["P32_1"]) & _M64
    for st in range(((n - 1) - _BLOCK_LEN * n_blocks) // _STRIPE):
        stripe(n_blocks * _BLOCK_LEN + st * _STRIPE, st * 8)
    stripe(n - _STRIPE, _SECRET_SIZE - _STRIPE - 7)
    lo, hi = (n * _PY["P64_1"]) & _M64, ~(n * _PY["P64_2"]) & _M64
    for i in range(4):
        lo += _fold64_py(acc[2 * i] ^ _w(s, 11 + 16 * i), acc[2 * i + 1] ^ _w(s, 19 + 16 * i))
        hi += _fold64_py(acc[2 * i] ^ _w(s, _SECRET_SIZE - _STRIPE - 11 + 16 * i),
                         acc[2 * i + 1] ^ _w(s, _SECRET_SIZE - _STRIPE - 3 + 16 * i))
    return _avalanche3_py(lo & _M64), _avalanche3_py(hi & _M64)


def xxh3_128_py(data: bytes) -> tuple[int, int]:
    """XXH3-128 (seed 0, default secret) of ``data``, at least 17 bytes long
    (a namespace root's input is), as ``(low64, high64)``."""
    n = len(data)
    if n <= 16:
        raise ValueError(f"xxh3_128_py hashes inputs of more than 16 bytes, got {n}")
    if n > 240:
        return _hash_long_py(data)
    lo, hi = (n * _PY["P64_1"]) & _M64, 0
    if n <= 128:
        for off1, soff in ((48, 96), (32, 64), (16, 32), (0, 0)):
            if n > 2 * off1:
                lo, hi = _mix32_py(lo, hi, data, off1, n - 16 - off1, soff)
        return _finish_mid_py(lo, hi, n)
    for i in range(4):
        lo, hi = _mix32_py(lo, hi, data, 32 * i, 32 * i + 16, 32 * i)
    lo, hi = _avalanche3_py(lo), _avalanche3_py(hi)
    for i in range(4, n // 32):
        lo, hi = _mix32_py(lo, hi, data, 32 * i, 32 * i + 16, 3 + 32 * (i - 4))
    lo, hi = _mix32_py(lo, hi, data, n - 16, n - 32, _SECRET_SIZE_MIN - 17 - 16)
    return _finish_mid_py(lo, hi, n)
