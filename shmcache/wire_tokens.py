"""Token ids straight from msgpack: the ``token_ids`` array of a KV event,
parsed from its raw bytes by a Numba kernel.

Decoding 512 token ids into Python ints and then into a NumPy array costs
about 15 µs a block of events; parsing the msgpack array in place costs
well under one. Formats (msgpack spec): an array header (fixarray 0x90-0x9f,
array16 0xdc, array32 0xdd), then each element an unsigned or signed
integer in any width (positive fixint, 0xcc-0xcf, 0xd0-0xd3; negative
fixint). Anything else, or an id outside ``[0, 2**32)``, is refused.
"""

from __future__ import annotations

import numpy as np
from numba import njit

BAD = -1  # not an array of ids in [0, 2**32)


@njit(inline="always")
def _be(raw, at, width):
    v = np.uint64(0)
    for i in range(width):
        v = (v << np.uint64(8)) | np.uint64(raw[at + i])
    return v


@njit(cache=True)
def parse_tokens(raw, out):
    """Parse the msgpack array ``raw`` (uint8) of token ids into ``out``
    (int64, room for ``len(raw)`` ids at least: every id takes a byte or
    more). Returns how many ids, or ``BAD``."""
    n_raw = raw.shape[0]
    if n_raw == 0:
        return BAD
    b = raw[0]
    if 0x90 <= b <= 0x9F:
        n, at = np.int64(b & 0x0F), 1
    elif b == 0xDC and n_raw >= 3:
        n, at = np.int64(_be(raw, 1, 2)), 3
    elif b == 0xDD and n_raw >= 5:
        n, at = np.int64(_be(raw, 1, 4)), 5
    else:
        return BAD
    if n > out.shape[0]:
        return BAD
    for i in range(n):
        if at >= n_raw:
            return BAD
        b = raw[at]
        if b <= 0x7F:
            v, at = np.int64(b), at + 1
        elif 0xCC <= b <= 0xCF or 0xD0 <= b <= 0xD3:
            width = 1 << ((b - 0xCC) & 3)
            if at + 1 + width > n_raw:
                return BAD
            u = _be(raw, at + 1, width)
            if b >= 0xD0 and (u >> np.uint64(8 * width - 1)) & np.uint64(1):
                return BAD  # a negative signed int
            if u >= np.uint64(1 << 32):
                return BAD
            v, at = np.int64(u), at + 1 + width
        else:
            return BAD
        out[i] = v
    return n if at == n_raw else BAD
