"""User input to validated arrays, and token arrays to chained block keys.

This module owns every check on tokens, values and namespaces, so the
Reader and the Writer reject bad input with the same typed error and the
same message, before anything touches the segment. The key chain itself is
specified in ``shmcache.hashing``.
"""

from __future__ import annotations

import array
from typing import NamedTuple, Union

import numpy as np

from .errors import InvalidInputError
from .hashing import MAX_TOKEN, NS_BYTES, NS_INT, NS_NONE, NS_STR, chain_for, narrow_tokens, xxh3_128_py

Namespace = Union[None, str, bytes, int]

_MASK64 = (1 << 64) - 1
_EMPTY = np.zeros(0, dtype=np.uint32)


class PrefixMatch(NamedTuple):
    """How much of a prompt is cached.

    ``length`` is in tokens (a multiple of the block size); ``values`` holds
    one int64 per matched block, root first. The array is the caller's,
    except when no block matched: then it is ``NO_VALUES``, shared and
    read-only (copy it before writing to it).
    """

    length: int
    values: np.ndarray


#: The values of a match that found no block: one shared read-only empty
#: array instead of an empty view of the array the kernel filled. A miss is
#: a new prompt's usual answer, and on a reader woken for a request (caches
#: cold) the view cost about 0.8 of 8.4 µs. Made over immutable bytes, so it
#: owns no memory: no caller can make it writable or resize it.
NO_VALUES = np.frombuffer(b"", dtype=np.int64)


def _first_bad_token(seq) -> str:
    for i, t in enumerate(seq):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            return f"token {i} is {t!r} ({type(t).__name__}), not an int"
        if not 0 <= int(t) <= MAX_TOKEN:
            return f"token {i} is {int(t)}, outside [0, 2**32)"
    return "a token is not an int in [0, 2**32)"


def as_tokens(tokens: object) -> np.ndarray:
    """A 1-D C-contiguous integer array of the token ids in native byte order,
    copying an array only when it is not one.

    Accepts a NumPy integer array or a list/tuple/range of ints. The range
    ``[0, 2**32)`` of an array's ids is checked by the hashing kernel (it
    reads every id anyway); a list is range-checked as it is converted.
    """
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1:
            raise InvalidInputError(
                f"tokens must be a 1-D array of token ids, got shape {tokens.shape}: pass one prompt per call"
            )
        if tokens.dtype.kind not in "iu" or tokens.dtype.fields is not None:
            raise InvalidInputError(
                f"tokens must have an integer dtype, got {tokens.dtype}: convert with tokens.astype(np.int64)"
            )
        if not tokens.dtype.isnative:  # Numba reads native byte order only
            return tokens.astype(tokens.dtype.newbyteorder("="))
        return tokens if tokens.flags.c_contiguous else np.ascontiguousarray(tokens)
    if isinstance(tokens, (list, tuple, range)):
        try:
            return np.frombuffer(array.array("I", tokens), dtype=np.uint32) if len(tokens) else _EMPTY
        except (TypeError, OverflowError):
            raise InvalidInputError(f"bad tokens: {_first_bad_token(tokens)}; token ids must be ints in [0, 2**32)") from None
    raise InvalidInputError(
        f"tokens must be a 1-D NumPy integer array or a list of ints, got {type(tokens).__name__}"
    )


def bad_token_error(tokens: np.ndarray, index: int) -> InvalidInputError:
    """The error for ``tokens[index]`` being outside ``[0, 2**32)``."""
    return InvalidInputError(f"token {index} is {int(tokens[index])}: token ids must be in [0, 2**32)")


def as_int64_array(values: object, what: str) -> np.ndarray:
    """A 1-D C-contiguous int64 array of ``values`` (an array, a list of ints, or one int)."""
    if isinstance(values, (int, np.integer)) and not isinstance(values, bool):
        values = [int(values)]
    if isinstance(values, np.ndarray):
        arr = values
    elif isinstance(values, (list, tuple, range)):
        try:
            arr = np.frombuffer(array.array("q", values), dtype=np.int64) if len(values) else np.zeros(0, np.int64)
        except (TypeError, OverflowError):
            raise InvalidInputError(f"{what} must be ints that fit in int64") from None
    else:
        raise InvalidInputError(f"{what} must be a 1-D int64 array or a list of ints, got {type(values).__name__}")
    if arr.ndim != 1 or (arr.dtype.kind not in "iu" and arr.size):
        raise InvalidInputError(f"{what} must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise InvalidInputError(f"{what} must fit in int64")
    return np.ascontiguousarray(arr, dtype=np.int64)


def as_values(values: object, n_blocks: int, n_tokens: int, block_size: int) -> np.ndarray:
    """One int64 per full block, as a 1-D C-contiguous array, or InvalidInputError."""
    arr = as_int64_array(values, "values")
    if arr.shape[0] != n_blocks:
        raise InvalidInputError(
            f"got {arr.shape[0]} values for {n_blocks} full blocks ({n_tokens} tokens, block size {block_size}): "
            "pass exactly one value per full block; a trailing partial block is never cached"
        )
    return arr


def namespace_bytes(namespace: Namespace) -> tuple[int, bytes]:
    """The tag and payload that seed a namespace's key chain."""
    if namespace is None:
        return NS_NONE, b""
    if isinstance(namespace, str):
        return NS_STR, namespace.encode("utf-8")
    if isinstance(namespace, (bytes, bytearray, memoryview)):
        return NS_BYTES, bytes(namespace)
    if isinstance(namespace, (int, np.integer)) and not isinstance(namespace, bool) and 0 <= int(namespace) <= _MASK64:
        return NS_INT, int(namespace).to_bytes(8, "little")
    raise InvalidInputError(
        f"namespace must be None, a str, bytes or an int in [0, 2**64), got {namespace!r}"
    )


def namespace_from_wire(tag: int, payload: bytes) -> Namespace:
    """Inverse of ``namespace_bytes``; ValueError on a malformed pair."""
    if tag == NS_NONE and not payload:
        return None
    if tag == NS_STR:
        return payload.decode("utf-8")
    if tag == NS_BYTES:
        return bytes(payload)
    if tag == NS_INT and len(payload) == 8:
        return int.from_bytes(payload, "little")
    raise ValueError(f"malformed namespace (tag {tag}, {len(payload)} bytes)")


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 1 << 128:
        raise InvalidInputError(f"seed must be an int in [0, 2**128), got {seed!r}")
    return int(seed)


def namespace_root(namespace: Namespace, seed: int) -> tuple[int, int]:
    """``k_{-1}`` of a namespace under a seed, as ``(low64, high64)``."""
    tag, payload = namespace_bytes(namespace)
    seed = check_seed(seed)
    raw = (seed & _MASK64).to_bytes(8, "little") + (seed >> 64).to_bytes(8, "little") + bytes([tag]) + payload
    return xxh3_128_py(raw)


class KeyChain:
    """Computes chained keys for one segment (block size and seed), caching namespace roots."""

    def __init__(self, block_size: int, seed: int) -> None:
        self.block_size = block_size
        self.seed = seed
        self._chain_kernel = chain_for(block_size)
        self._roots: dict[object, tuple[np.uint64, np.uint64]] = {}
        self.root(None)

    def root(self, namespace: Namespace) -> tuple[np.uint64, np.uint64]:
        """``k_{-1}`` for ``namespace``, as two uint64."""
        cache_key = (type(namespace), namespace) if namespace is not None else None
        try:
            return self._roots[cache_key]
        except (KeyError, TypeError):
            pass
        lo, hi = namespace_root(namespace, self.seed)
        root = (np.uint64(lo), np.uint64(hi))
        if len(self._roots) < 4096:
            self._roots[cache_key] = root
        return root

    def keys(self, tokens: np.ndarray, namespace: Namespace, root: tuple[np.uint64, np.uint64] | None = None) -> np.ndarray:
        """``(n_full_blocks, 2)`` uint64 keys of a validated token array,
        chained from ``namespace``'s root, or from ``root`` (the key of the
        block they follow) when given."""
        n = tokens.shape[0] // self.block_size
        out = np.empty((n, 2), dtype=np.uint64)
        root_lo, root_hi = self.root(namespace) if root is None else root
        if tokens.dtype == np.uint32:
            t32 = tokens
        else:
            t32 = np.empty(n * self.block_size, dtype=np.uint32)
            bad = narrow_tokens(tokens, t32)
            if bad >= 0:
                raise bad_token_error(tokens, bad)
        self._chain_kernel(t32, n, self.block_size, root_lo, root_hi, out)
        return out


def block_keys(tokens: object, block_size: int = 16, namespace: Namespace = None, seed: int = 0) -> np.ndarray:
    """Chained 128-bit keys of the full blocks of ``tokens``: ``(n_blocks, 2)`` uint64.

    Column 0 is the low 64 bits, column 1 the high. A segment created with a
    seed (``Writer.create`` draws a random one unless told otherwise) needs
    the same seed here; ``Reader.block_keys`` uses the segment's own.
    """
    from .layout import check_geometry_args

    check_geometry_args(1, block_size)
    return KeyChain(int(block_size), check_seed(seed)).keys(as_tokens(tokens), namespace)


def as_keys(keys: object) -> np.ndarray:
    """Validate precomputed keys: an ``(n, 2)`` uint64 array."""
    if not isinstance(keys, np.ndarray) or keys.ndim != 2 or keys.shape[1] != 2 or keys.dtype != np.uint64:
        got = f"shape {keys.shape} dtype {keys.dtype}" if isinstance(keys, np.ndarray) else type(keys).__name__
        raise InvalidInputError(f"keys must be an (n, 2) uint64 array from block_keys(), got {got}")
    return keys if keys.flags.c_contiguous else np.ascontiguousarray(keys)
