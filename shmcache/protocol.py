"""The daemon's wire protocol: length-prefixed binary frames over a Unix socket.

The daemon and ``Client`` import nothing from each other: what they agree
on is here (the frames, the socket's default path ``socket_path``, and
``SPIN_US``, how long each end polls before it sleeps).

No pickle: every frame is a fixed header and a payload of little-endian
integers and NumPy buffers, so a malformed frame can only be refused, never
executed.

Frame header (``HEADER``, 12 bytes)::

    magic    2 bytes  b"SC"
    version  u8       PROTOCOL_VERSION; any other closes the connection
    kind     u8       K_* below
    request  u32      chosen by the client, echoed in the reply
    length   u32      payload bytes that follow, at most MAX_PAYLOAD

Requests (client -> daemon) and their payloads:

* ``K_HELLO``: ``u32 pid``, then optionally the client's owner name
  (UTF-8, the rest of the payload): the blocks it inserts are then held
  by that named owner. The reply's ``result`` is the client's id (the id
  its blocks record).
* ``K_INSERT``: ``u32 n_tokens, u32 n_values, u8 namespace tag, u8 0,
  u16 namespace length, u32 0``, the namespace bytes padded to 8, then
  ``n_values`` int64 values and ``n_tokens`` uint32 tokens. Reply: tokens
  already cached.
* ``K_REMOVE``: int64 values. Reply: number of blocks removed.
* ``K_PIN`` / ``K_UNPIN``: as INSERT with ``n_values`` 0. Reply: tokens pinned.

Replies and pushes (daemon -> client):

* ``K_OK``: ``i64 result``, for the request it echoes.
* ``K_ERROR``: ``u16 code, utf-8 message``. Codes E_* below. After
  E_PROTOCOL the daemon closes the connection.
* ``K_EVICTED``: int64 values of this client's blocks the cache dropped
  (eviction, or a subtree removed under another client's block). Each value
  is delivered exactly once, in the order the cache dropped it; request 0.
"""

from __future__ import annotations

import struct

import numpy as np

from . import segment
from .errors import ShmCacheError

MAGIC = b"SC"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<2sBBII")
MAX_PAYLOAD = 64 << 20

K_HELLO, K_INSERT, K_REMOVE, K_PIN, K_UNPIN = 1, 2, 3, 4, 5
K_OK, K_ERROR, K_EVICTED = 64, 65, 66
REQUESTS = {K_HELLO, K_INSERT, K_REMOVE, K_PIN, K_UNPIN}

E_PROTOCOL, E_INVALID, E_FULL, E_INTERNAL, E_OWNERS = 1, 2, 3, 4, 5

#: Default microseconds the daemon polls for work, and a Client for its
#: reply, before sleeping.
SPIN_US = 200

_PROMPT = struct.Struct("<IIBBHI")
_RESULT = struct.Struct("<q")
_PID = struct.Struct("<I")
_ERROR = struct.Struct("<H")


class ProtocolError(ShmCacheError):
    """A frame that does not follow this protocol."""


def socket_path(name: str) -> str:
    """Default socket path of segment ``name``."""
    return f"/dev/shm/{segment.PREFIX}{name}.sock"


def frame(kind: int, request: int, payload: bytes = b"") -> bytearray:
    return seal(bytearray(HEADER.size) + payload, kind, request)


def parse_header(buf: bytes | bytearray) -> tuple[int, int, int]:
    """``(kind, request, length)`` of the frame header at the start of ``buf``, or ProtocolError."""
    magic, version, kind, request, length = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise ProtocolError("bad magic: not a shmcache client")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} unsupported; this daemon speaks {PROTOCOL_VERSION}")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return kind, request, length


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def prompt_frame(n_tokens: int, values: np.ndarray | None, ns_tag: int, ns_bytes: bytes) -> tuple[bytearray, np.ndarray]:
    """An INSERT/PIN/UNPIN frame, built in place: ``(frame, tokens)``.

    The frame holds everything but its header (``seal`` writes it) and its
    tokens: ``tokens`` is the frame's uint32 view where the caller writes
    them. One buffer and no concatenation: a 128-block prompt is 9 KB.
    """
    n_values = 0 if values is None else len(values)
    at = HEADER.size + _PROMPT.size
    ns_at, at = at, at + _pad8(len(ns_bytes))
    values_at, at = at, at + 8 * n_values
    buf = bytearray(at + 4 * n_tokens)
    _PROMPT.pack_into(buf, HEADER.size, n_tokens, n_values, ns_tag, 0, len(ns_bytes), 0)
    buf[ns_at : ns_at + len(ns_bytes)] = ns_bytes
    if n_values:
        np.frombuffer(buf, dtype="<i8", count=n_values, offset=values_at)[:] = values
    return buf, np.frombuffer(buf, dtype="<u4", count=n_tokens, offset=at)


def seal(buf: bytearray, kind: int, request: int) -> bytearray:
    """Write the header of a frame built with ``HEADER.size`` bytes reserved at its start."""
    HEADER.pack_into(buf, 0, MAGIC, PROTOCOL_VERSION, kind, request, len(buf) - HEADER.size)
    return buf


def decode_prompt(payload: bytearray) -> tuple[np.ndarray, np.ndarray, int, bytes]:
    """``(tokens uint32, values int64, namespace tag, namespace bytes)``; ProtocolError if malformed.

    The arrays are views of ``payload`` (no copy): pass a buffer nobody
    else reuses.
    """
    if len(payload) < _PROMPT.size:
        raise ProtocolError("prompt payload shorter than its fixed part")
    n_tokens, n_values, tag, zero, ns_len, zero2 = _PROMPT.unpack_from(payload)
    if zero or zero2:
        raise ProtocolError("reserved prompt fields must be zero")
    at = _PROMPT.size
    ns = payload[at : at + ns_len]
    at += _pad8(ns_len)
    if len(payload) != at + 8 * n_values + 4 * n_tokens:
        raise ProtocolError("prompt payload length does not match its counts")
    values = np.frombuffer(payload, dtype="<i8", count=n_values, offset=at)
    tokens = np.frombuffer(payload, dtype="<u4", count=n_tokens, offset=at + 8 * n_values)
    return tokens, values, tag, bytes(ns)


def encode_hello(pid: int, owner: str | None) -> bytes:
    return _PID.pack(pid) + (owner.encode() if owner is not None else b"")


def decode_hello(payload: bytes) -> tuple[int, str | None]:
    """``(pid, owner name or None)``; the name is checked by the daemon."""
    if len(payload) < _PID.size:
        raise ProtocolError("HELLO payload is shorter than its pid")
    try:
        owner = bytes(payload[_PID.size :]).decode() or None
    except UnicodeDecodeError:
        raise ProtocolError("HELLO owner name is not UTF-8") from None
    return _PID.unpack_from(payload)[0], owner


def encode_values(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype="<i8").tobytes()


def decode_values(payload: bytes) -> np.ndarray:
    if len(payload) % 8:
        raise ProtocolError("values payload is not a whole number of int64")
    return np.frombuffer(payload, dtype="<i8").copy()


def encode_result(value: int) -> bytes:
    return _RESULT.pack(value)


def decode_result(payload: bytes) -> int:
    return _RESULT.unpack(payload)[0]


def encode_error(code: int, message: str) -> bytes:
    return _ERROR.pack(code) + message.encode("utf-8", "replace")


def decode_error(payload: bytes) -> tuple[int, str]:
    return _ERROR.unpack_from(payload)[0], payload[_ERROR.size :].decode("utf-8", "replace")
