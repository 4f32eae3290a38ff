"""Malformed, truncated, oversized and wrong-version frames from a raw socket."""

from __future__ import annotations

import socket
import struct
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmcache
from shmcache import Client, Reader
from shmcache import protocol as P

from daemon_proc import Served


@pytest.fixture(scope="module")
def daemon():
    name = f"t-proto-{uuid.uuid4().hex[:12]}"
    d = Served(name, 512)
    with Client.connect(name) as c:
        c.insert(np.arange(16), [1, 2, 3, 4])
        yield d, c
    d.kill()
    shmcache.unlink(name)
    try:
        import os

        os.unlink(f"/dev/shm/shmcache.{name}.sock")
    except FileNotFoundError:
        pass


def exchange(name: str, data: bytes) -> list[tuple[int, int, bytes]]:
    """Send ``data``, half-close, read every frame until the daemon closes."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(f"/dev/shm/shmcache.{name}.sock")
    try:
        s.sendall(data)
    except OSError:
        pass  # the daemon may close first, on a bad header
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    buf = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    s.close()
    frames = []
    while buf:
        kind, request, length = P.parse_header(buf[: P.HEADER.size])  # every reply is well-formed
        frames.append((kind, request, buf[P.HEADER.size : P.HEADER.size + length]))
        buf = buf[P.HEADER.size + length :]
    return frames


headers = st.builds(
    lambda magic, version, kind, request, length, payload: P.HEADER.pack(magic, version, kind, request, length) + payload,
    st.sampled_from([b"SC", b"XX", b"\0\0"]),
    st.sampled_from([P.PROTOCOL_VERSION, 0, 2, 255]),
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.one_of(st.integers(0, 64), st.just(P.MAX_PAYLOAD + 1), st.just(2**32 - 1)),
    st.binary(max_size=80),
)
prompt_payloads = st.builds(
    lambda kind, fixed, rest: P.frame(kind, 7, fixed + rest),
    st.sampled_from([P.K_INSERT, P.K_PIN, P.K_UNPIN, P.K_REMOVE]),
    st.builds(lambda a, b, c, d, e, f: struct.pack("<IIBBHI", a, b, c, d, e, f),
              st.integers(0, 40), st.integers(0, 12), st.integers(0, 5), st.integers(0, 1), st.integers(0, 20), st.integers(0, 1)),
    st.binary(max_size=200),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=64), headers, prompt_payloads))
def test_hostile_frames_are_refused_and_the_daemon_serves_on(daemon, data):
    d, good = daemon
    frames = exchange(d.name, data)
    for kind, request, payload in frames:
        assert kind in (P.K_OK, P.K_ERROR, P.K_EVICTED)
        if kind == P.K_ERROR:
            code, message = P.decode_error(payload)
            assert code in (P.E_PROTOCOL, P.E_INVALID, P.E_FULL) and message
    if len(data) >= P.HEADER.size:
        magic, version = data[:2], data[2]
        if magic != P.MAGIC or version != P.PROTOCOL_VERSION:
            assert frames and frames[-1][0] == P.K_ERROR and P.decode_error(frames[-1][2])[0] == P.E_PROTOCOL
    assert good.match_prefix(np.arange(16)).values.tolist() == [1, 2, 3, 4]


def test_segment_intact_after_hostile_clients(daemon):
    d, good = daemon
    for data in (b"SC\x01\x02" + b"\xff" * 8, P.frame(200, 1), P.frame(P.K_INSERT, 1, b"\0" * 5), b"garbage" * 10):
        exchange(d.name, data)
    assert good.insert(np.arange(100, 108), [50, 51]) == 0
    good.remove([])
    with Reader.attach(d.name) as r:
        r.check()
        assert r.match_prefix(np.arange(16)).values.tolist() == [1, 2, 3, 4]
