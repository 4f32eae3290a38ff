"""``Client``: what a GPU worker or engine process uses next to a writer daemon.

Matching is local and lock-free: ``Client.match_prefix`` *is* the attached
Reader's ``match_prefix``, with no extra layer (and ``match_and_pin`` the
Reader's, pins included). Changes (insert, remove, pin,
unpin) travel to the daemon over its Unix socket (``shmcache.protocol``)
and wait for its reply. Values of this client's blocks that the cache drops
arrive as pushes: they go to ``on_evict`` if set, else queue for
``poll_evicted``. They are read whenever the client talks to the daemon and
by ``poll_evicted``.

Waiting for a reply, a Client first polls its socket for ``spin_us``
microseconds before it sleeps in the kernel: a wake-up costs tens of
microseconds on a virtualised host, more than the daemon takes to answer.

A Client is not thread-safe; give each thread its own.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections import deque
from typing import Callable

import numpy as np

from . import protocol as P
from .errors import CacheFullError, ClosedError, DaemonUnavailableError, InvalidInputError, OwnerLimitError
from .hashing import narrow_tokens
from .keys import Namespace, as_int64_array, as_tokens, as_values, bad_token_error, namespace_bytes
from .owners import check_owner_name
from .pins import PinnedMatch
from .reader import Reader

__all__ = ["Client"]

_ERRORS = {P.E_INVALID: InvalidInputError, P.E_FULL: CacheFullError, P.E_PROTOCOL: P.ProtocolError,
           P.E_OWNERS: OwnerLimitError}


class Client:
    """A worker's handle: lock-free matches, changes through the daemon."""

    def __init__(self, reader: Reader, sock: socket.socket, timeout: float, spin_us: float = P.SPIN_US,
                 owner: str | None = None) -> None:
        self.reader = reader
        self.name = reader.name
        self.block_size = reader.block_size
        self.owner = owner
        self.match_prefix = reader.match_prefix
        self.match_owners = reader.match_owners
        self.owners = reader.owners
        self.match_keys = reader.match_keys
        self.match_and_pin = reader.match_and_pin
        self.block_keys = reader.block_keys
        self.on_evict: Callable[[np.ndarray], None] | None = None
        self._sock: socket.socket | None = sock
        self._timeout = timeout
        self._spin_s = spin_us / 1e6
        self._inbuf = bytearray()
        self._rbuf = bytearray(1 << 16)
        self._rview = memoryview(self._rbuf)
        self._evicted: deque[np.ndarray] = deque()
        self._request = 0
        self.client_id = self._call(P.K_HELLO, P.encode_hello(os.getpid(), owner))

    @classmethod
    def connect(
        cls, name: str, *, owner: str | None = None, sock_path: str | None = None, timeout: float = 10.0,
        spin_us: float = P.SPIN_US,
    ) -> "Client":
        """Attach to segment ``name`` (read-only) and connect to its daemon.

        ``owner`` names who holds the blocks this client inserts (a
        data-parallel rank, say: ``"rank3"``), for ``match_owners``; they
        stay held by it until it removes them or its last client with that
        owner name disconnects. Without one, a client's blocks are held by
        no named owner and are removed when it disconnects.

        ``timeout``: seconds a request may wait for its reply. ``spin_us``:
        microseconds to poll for a reply before sleeping (0: sleep at once,
        the least CPU; the default trades up to that much CPU per request
        for a faster round trip). Raises SegmentNotFoundError if there is no
        segment, and DaemonUnavailableError if no daemon answers.
        """
        if isinstance(spin_us, bool) or not isinstance(spin_us, (int, float)) or not 0 <= spin_us <= 1e6:
            raise InvalidInputError(f"spin_us must be a number of microseconds in [0, 1e6], got {spin_us!r}")
        if owner is not None:
            check_owner_name(owner)
        reader = Reader.attach(name)
        path = sock_path or P.socket_path(name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            # Blocking mode with kernel-side timeouts: one syscall per send or
            # receive (Python's own timeout mode adds a poll to each), and a
            # daemon that stops answering still fails the call in bounded time.
            sock.settimeout(None)
            tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        except OSError as e:
            sock.close()
            reader.close()
            raise DaemonUnavailableError(f"no shmcache daemon on {path} ({e.strerror}): start `shmcache serve {name}`") from None
        try:
            return cls(reader, sock, timeout, spin_us, owner)
        except BaseException:
            sock.close()
            reader.close()
            raise

    # --- the socket ------------------------------------------------------------

    def _unavailable(self, why: str) -> DaemonUnavailableError:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        return DaemonUnavailableError(f"the shmcache daemon for {self.name!r} is gone ({why}); matching still works")

    def _recv_frame(self, block: bool) -> tuple[int, int, bytes] | None:
        spin_until = time.perf_counter() + self._spin_s if block else 0.0
        while True:
            if len(self._inbuf) >= P.HEADER.size:
                kind, request, length = P.parse_header(self._inbuf)
                if len(self._inbuf) >= P.HEADER.size + length:
                    payload = bytes(self._inbuf[P.HEADER.size : P.HEADER.size + length])
                    del self._inbuf[: P.HEADER.size + length]
                    return kind, request, payload
            try:
                wait = block and time.perf_counter() >= spin_until
                n = self._sock.recv_into(self._rbuf, 0, 0 if wait else socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not block:
                    return None
                if not wait:
                    os.sched_yield()  # spinning, but never at the expense of the daemon
                    continue
                raise self._unavailable(f"no reply in {self._timeout} s") from None
            except OSError as e:
                raise self._unavailable(e.strerror or str(e)) from None
            if not n:
                raise self._unavailable("connection closed")
            self._inbuf += self._rview[:n]

    def _push(self, payload: bytes) -> None:
        values = P.decode_values(payload)
        if self.on_evict is not None:
            self.on_evict(values)
        else:
            self._evicted.append(values)

    def _call(self, kind: int, payload: bytes) -> int:
        return self._call_frame(kind, bytearray(P.HEADER.size) + payload)

    def _call_frame(self, kind: int, frame: bytearray) -> int:
        """Send ``frame`` (header space reserved, ``protocol.seal`` fills it)
        and wait for its reply; returns the reply's result."""
        if self._sock is None:
            if self.reader._data is None:
                raise ClosedError(f"Client for {self.name!r} is closed")
            raise DaemonUnavailableError(f"the shmcache daemon for {self.name!r} is gone; reconnect with Client.connect")
        self._request = (self._request + 1) & 0xFFFFFFFF or 1
        try:
            self._sock.sendall(P.seal(frame, kind, self._request))
        except OSError as e:
            raise self._unavailable(e.strerror or str(e)) from None
        while True:
            kind_in, request, body = self._recv_frame(block=True)
            if kind_in == P.K_EVICTED:
                self._push(body)
            elif request == self._request and kind_in == P.K_OK:
                return P.decode_result(body)
            elif request in (self._request, 0) and kind_in == P.K_ERROR:
                code, message = P.decode_error(body)
                raise _ERRORS.get(code, DaemonUnavailableError)(message)

    def _prompt(self, tokens: object, values: object, namespace: Namespace) -> bytearray:
        """The frame of an INSERT/PIN/UNPIN of ``tokens``, checked here so the
        daemon never sees a bad id: ids travel as uint32."""
        toks = as_tokens(tokens)
        n = toks.shape[0] // self.block_size
        if values is not None:
            values = as_values(values, n, toks.shape[0], self.block_size)
        tag, ns = namespace_bytes(namespace)
        frame, wire_tokens = P.prompt_frame(n * self.block_size, values, tag, ns)
        bad = narrow_tokens(toks, wire_tokens)
        if bad >= 0:
            raise bad_token_error(toks, bad)
        return frame

    # --- operations ------------------------------------------------------------------

    def insert(self, tokens: object, values: object, namespace: Namespace = None) -> int:
        """Cache ``tokens`` with one value per full block, through the daemon.

        Returns how many leading tokens were already cached. The blocks are
        owned by this client: dropped ones come back through ``on_evict`` /
        ``poll_evicted``, and all are removed when this client disconnects.
        """
        return self._call_frame(P.K_INSERT, self._prompt(tokens, values, namespace))

    def remove(self, values: object) -> int:
        """Drop this client's blocks holding ``values`` and their subtrees; returns blocks removed."""
        return self._call(P.K_REMOVE, P.encode_values(as_int64_array(values, "values")))

    def pin(self, tokens: object, namespace: Namespace = None) -> int:
        """Pin the cached blocks of ``tokens`` through the daemon; returns the
        tokens pinned. Released by ``unpin(tokens)`` or when this client
        disconnects."""
        return self._call_frame(P.K_PIN, self._prompt(tokens, None, namespace))

    def unpin(self, tokens: object, namespace: Namespace = None) -> int:
        """Undo this client's latest ``pin`` of exactly these tokens through
        the daemon; returns the tokens released (its blocks still cached).
        Given a ``match_and_pin`` handle instead, releases it locally (no
        round trip) and returns its length in tokens."""
        if isinstance(tokens, PinnedMatch):
            self.reader.unpin(tokens)
            return tokens.length
        return self._call_frame(P.K_UNPIN, self._prompt(tokens, None, namespace))

    def poll_evicted(self) -> np.ndarray:
        """Values of this client's blocks the cache dropped since the last poll (int64)."""
        if self._sock is not None:
            while True:
                got = self._recv_frame(block=False)
                if got is None:
                    break
                if got[0] == P.K_EVICTED:
                    self._push(got[2])
        out = list(self._evicted)
        self._evicted.clear()
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def close(self) -> None:
        """Disconnect (the daemon then removes this client's blocks) and detach. Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.reader.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
