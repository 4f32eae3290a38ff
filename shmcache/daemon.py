"""The writer daemon behind ``shmcache serve``: one process, one Writer, many clients.

Producers (engine schedulers, workers after prefill) connect over a Unix
socket next to the segment (``/dev/shm/shmcache.<name>.sock``, mode 0600,
peers checked with SO_PEERCRED) and speak ``shmcache.protocol``. Matching
never goes through the daemon: clients read the segment lock-free.

One thread runs a selector loop. Each wake-up drains every readable
connection, applies all complete requests in arrival order in one pass of
the Writer, then queues replies and pushes each client the values of its
blocks the cache dropped (exactly once, in drop order), and flushes. Before
it sleeps in the kernel it polls for ``spin_us`` microseconds, so a client
that sends its next request soon does not pay for waking it (tens of
microseconds on a virtualised host); an idle daemon uses no CPU.

Clients: every block records the id of the client that inserted
it. When a client disconnects or dies, its blocks are removed with their
subtrees (its KV died with it) and its pins released (a client's pins are
``WriterPin`` handles the daemon keeps per connection, so one client can
never release another's); ``keep_on_disconnect`` opts out of the removal.
A daemon that takes a segment over starts with no writer pins: those of
the clients of the daemon before it went with that daemon. Client ids embed the writer epoch, so ids from an earlier daemon of
the same segment are never reused; a block whose client is not connected is
dropped silently (nobody holds its KV).
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import protocol as P
from . import segment
from .errors import (
    CacheFullError,
    IncompatibleSegmentError,
    InvalidInputError,
    OwnerLimitError,
    SegmentRetiredError,
    ShmCacheError,
    WriterLostError,
)
from .keys import namespace_from_wire
from .warmup import warm_events, warm_publish, warm_writer
from .writer import Writer

if TYPE_CHECKING:
    from . import ingest

#: KV-event operations kept before the daemon encodes them while no request
#: waits (else before it sleeps, or at the flush): encoding is one kernel
#: call for all of them, and one call per operation cost a busy daemon
#: 1.4-1.9x the CPU.
IDLE_OPS = 8

log = logging.getLogger("shmcache.daemon")

_CRED = struct.Struct("3i")
_RECV = 1 << 20


@dataclass
class _Conn:
    sock: socket.socket
    pid: int
    uid: int
    client: int = 0
    owner: str | None = None  # the named owner its blocks are held by (HELLO), if any
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    pins: list = field(default_factory=list)  # WriterPin handles of this client's unreleased pins
    closing: bool = False  # protocol error: read no more, close once outbuf is flushed
    eof: bool = False  # the peer finished sending: answer what it sent, then close
    dead: bool = False


class Daemon:
    """Serve one segment. ``run()`` blocks until ``stop()`` or SIGTERM/SIGINT.

    Before it is ready it loads (or, on an empty Numba cache, compiles) the
    kernels common requests use; ``compile_helper`` lets a child process
    compile part of them meanwhile (``warmup.warm_writer``). Turn it off
    where something else compiles at the same time (the demo compiles the
    readers' kernels while its daemon starts): there the helper only
    competes for the same CPUs."""

    def __init__(
        self,
        name: str,
        capacity: int,
        block_size: int = 16,
        *,
        sock_path: str | None = None,
        allow_uids: tuple[int, ...] = (),
        keep_on_disconnect: bool = False,
        unlink_on_exit: bool = True,
        spin_us: int = P.SPIN_US,
        kv_events: "list[ingest.Source] | tuple" = (),
        kv_events_topic: str = "",
        publish: dict | None = None,
        metrics_port: int | None = None,
        metrics_addr: str = "0.0.0.0",
        compile_helper: bool = True,
    ) -> None:
        segment.validate_name(name)
        if isinstance(spin_us, bool) or not isinstance(spin_us, int) or not 0 <= spin_us <= 1_000_000:
            raise InvalidInputError(f"spin_us must be an int of microseconds in [0, 1000000], got {spin_us!r}")
        self.spin_s = spin_us / 1e6
        self.name = name
        # Before ready: no common request waits on the compiler.
        warm_writer(block_size, events=bool(kv_events), helper=compile_helper)
        if kv_events:
            warm_events()
        if publish is not None:
            warm_publish(block_size)
        created = not segment.exists(name)
        if not created:
            self.writer = Writer.open(name)
            if (self.writer.capacity, self.writer.block_size) != (capacity, block_size):
                cap, bs = self.writer.capacity, self.writer.block_size
                self.writer.close()
                raise IncompatibleSegmentError(
                    f"segment {name!r} exists with capacity {cap} and block size {bs}: serve it with "
                    f"--capacity {cap} --block-size {bs}, or remove it first"
                )
            log.info("took over segment %s (dropped %d half-written states)", name, self.writer.recovered)
        else:
            self.writer = Writer.create(name, capacity, block_size)
        self.writer.on_evict_clients = self._collect_dropped
        self.sock_path = sock_path or P.socket_path(name)
        self.allow_uids = {os.geteuid(), *allow_uids}
        self.keep_on_disconnect = keep_on_disconnect
        self.unlink_on_exit = unlink_on_exit
        self._conns: dict[int, _Conn] = {}  # client -> connection
        self._dropped: list[tuple[np.ndarray, np.ndarray]] = []
        self._next_client = 0
        # Client ids stay below 2**31 (ingest.EVENTS_CLIENT and up are event sources').
        self._epoch = self.writer.stats()["writer_epoch"] & 0x7FF
        self._stopping = False
        # One receive buffer for every connection: a fresh large bytes object
        # per recv costs an mmap and page faults each time.
        self._rbuf = bytearray(_RECV)
        self._rview = memoryview(self._rbuf)
        try:
            self._listener = self._listen()
        except BaseException:
            self.writer.close(unlink=created)
            raise
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._ingest = self.publisher = self.metrics = None
        try:
            if kv_events:
                from .ingest import Ingest

                self._ingest = Ingest(self.writer, list(kv_events), kv_events_topic, segment.state_path(name))
                for fd in self._ingest.fds():
                    self._sel.register(fd, selectors.EVENT_READ, "events")
            if publish is not None:
                from .publish import Publisher

                self.publisher = Publisher(self.writer, **publish)
                for fd in self.publisher.fds():
                    self._sel.register(fd, selectors.EVENT_READ, "replay")
            if metrics_port is not None:
                from .metrics import Metrics

                self.metrics = Metrics(name, metrics_port, metrics_addr, daemon=self)
        except BaseException:
            self._close_parts()
            self.writer.close(unlink=created)
            raise

    # --- setup ----------------------------------------------------------------

    def _listen(self) -> socket.socket:
        if len(self.sock_path.encode()) > 107:
            raise InvalidInputError(f"socket path {self.sock_path!r} is too long for a Unix socket: pass a shorter one")
        self._clear_stale_socket()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(self.sock_path)
        finally:
            os.umask(old)
        self._sock_ino = os.lstat(self.sock_path).st_ino  # removed at exit only while still this one
        s.listen(128)
        s.setblocking(False)
        return s

    def _clear_stale_socket(self) -> None:
        """Remove a socket left by a dead daemon; refuse anything else."""
        try:
            st = os.lstat(self.sock_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise ShmCacheError(f"{self.sock_path} exists and is not a socket of yours: remove it or pass another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.sock_path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.sock_path)  # nobody listens: left by a dead daemon
            return
        finally:
            probe.close()
        raise ShmCacheError(f"another daemon is listening on {self.sock_path}")

    def stop(self) -> None:
        """Ask ``run`` to return; safe from a signal handler or another thread."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # --- the loop ---------------------------------------------------------------

    def run(self, ready=None) -> None:
        """Serve until stopped; ``ready(line)`` is called once clients can connect."""
        previous = {sig: signal.signal(sig, lambda *_: self.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            if ready is not None:
                line = (f"ready name={self.name} socket={self.sock_path} capacity={self.writer.capacity} "
                        f"block_size={self.writer.block_size} pid={os.getpid()}")
                if self.publisher is not None:
                    pub, replay = self.publisher.endpoints()
                    line += f" publish={pub}" + (f" replay={replay}" if replay else "")
                if self.metrics is not None:
                    line += f" metrics_port={self.metrics.port}"
                ready(line)
            # Everything alive now (Numba, llvmlite, the kernels) lives as long
            # as the daemon: out of the cyclic GC's generations, a collection
            # no longer walks it (tens of milliseconds, in the middle of a request).
            gc.freeze()
            try:
                next_reap = time.monotonic()
                while not self._stopping:
                    if time.monotonic() >= next_reap:
                        # Also while idle: a dead reader's pins are freed within
                        # one interval, not at the next request.
                        reaped = self.writer.reap_readers()
                        if reaped:
                            log.info("reclaimed the reader-table slots and pins of %d dead reader(s)", reaped)
                        next_reap = time.monotonic() + self.writer.reap_interval
                    batch: list[tuple[_Conn, int, int, bytes]] = []
                    replay_asked = False
                    for key, mask in self._wait(next_reap):
                        if key.data == "listen":
                            self._accept()
                        elif key.data == "wake":
                            os.read(self._wake_r, 4096)
                        elif key.data == "events":
                            pass  # drained below, every pass
                        elif key.data == "replay":
                            replay_asked = True
                        else:
                            conn = key.data
                            if mask & selectors.EVENT_READ:
                                self._read(conn, batch)
                            if mask & selectors.EVENT_WRITE:
                                self._flush(conn)
                    for conn, kind, request, payload in batch:
                        if not conn.dead:
                            started = time.perf_counter()
                            self._apply(conn, kind, request, payload)
                            if self.metrics is not None:
                                self.metrics.request_seconds.observe(time.perf_counter() - started)
                    for conn in [c for c in self._conns.values() if c.dead]:
                        self._disconnect(conn)
                    if self._ingest is not None:
                        self._ingest.drain()
                    self._deliver_dropped()
                    for conn in list(self._conns.values()):
                        self._flush(conn)
                    if self.publisher is not None:
                        if self.publisher.due(time.monotonic()):
                            self.publisher.flush()
                        if replay_asked:
                            self.publisher.serve_replay()
            except (WriterLostError, SegmentRetiredError) as e:
                log.error("stopping: %s", e)  # the name is another writer's now: leave it alone
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._shutdown()

    def _wait(self, next_reap: float) -> list:
        """Ready connections: polled for ``spin_s``, then slept for until the
        next reap or the publisher's next batch (not at all while KV events
        are queued)."""
        spin_until = time.perf_counter() + self.spin_s
        ready = self._sel.select(timeout=0)
        if not ready and self.publisher is not None:
            # Nothing to serve: the events of the requests just answered are
            # encoded now, while the clients work on the replies, once a
            # few have gathered (one call for each costs more).
            self.publisher.encode(IDLE_OPS)
        while not ready and time.perf_counter() < spin_until:
            os.sched_yield()  # a spinning loop must not starve the clients it waits for
            ready = self._sel.select(timeout=0)
        if ready or (self._ingest is not None and self._ingest.pending()):
            return ready
        if self.publisher is not None:
            self.publisher.encode()  # about to sleep: nobody waits for this
        wake = next_reap if self.publisher is None else min(next_reap, self.publisher.deadline())
        return self._sel.select(timeout=max(0.0, wake - time.monotonic()))

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            pid, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
            if uid not in self.allow_uids:
                log.warning("refused connection from pid %d: uid %d is not allowed", pid, uid)
                sock.close()
                continue
            sock.setblocking(False)
            self._next_client += 1
            conn = _Conn(sock, pid, uid, client=(self._epoch << 20) | (self._next_client & 0xFFFFF))
            self._conns[conn.client] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
            log.info("client pid %d connected as client id %d", pid, conn.client)

    def _read(self, conn: _Conn, batch: list) -> None:
        while True:
            try:
                n = conn.sock.recv_into(self._rbuf)
            except BlockingIOError:
                break
            except OSError:
                conn.dead = True
                return
            if not n:
                conn.eof = True
                break
            conn.inbuf += self._rview[:n]
            if n < len(self._rbuf):
                break  # drained: asking again costs a syscall and an exception; epoll reports more
        while not conn.closing and len(conn.inbuf) >= P.HEADER.size:
            try:
                kind, request, length = P.parse_header(conn.inbuf)
                if kind not in P.REQUESTS:
                    raise P.ProtocolError(f"unknown request kind {kind}")
            except P.ProtocolError as e:
                self._protocol_error(conn, 0, str(e))
                return
            if len(conn.inbuf) < P.HEADER.size + length:
                break
            payload = conn.inbuf[P.HEADER.size : P.HEADER.size + length]  # a private copy: decoding keeps views of it
            del conn.inbuf[: P.HEADER.size + length]
            batch.append((conn, kind, request, payload))

    def _protocol_error(self, conn: _Conn, request: int, message: str) -> None:
        log.warning("closing client pid %d (id %d): %s", conn.pid, conn.client, message)
        conn.outbuf += P.frame(P.K_ERROR, request, P.encode_error(P.E_PROTOCOL, message))
        conn.closing = True
        conn.inbuf.clear()

    # --- requests ---------------------------------------------------------------------

    def _apply(self, conn: _Conn, kind: int, request: int, payload: bytes) -> None:
        try:
            result = self._execute(conn, kind, payload)
        except P.ProtocolError as e:
            self._protocol_error(conn, request, str(e))
            return
        except InvalidInputError as e:
            conn.outbuf += P.frame(P.K_ERROR, request, P.encode_error(P.E_INVALID, str(e)))
            return
        except CacheFullError as e:
            conn.outbuf += P.frame(P.K_ERROR, request, P.encode_error(P.E_FULL, str(e)))
            return
        except OwnerLimitError as e:
            conn.outbuf += P.frame(P.K_ERROR, request, P.encode_error(P.E_OWNERS, str(e)))
            return
        conn.outbuf += P.frame(P.K_OK, request, P.encode_result(result))

    def _execute(self, conn: _Conn, kind: int, payload: bytes) -> int:
        w = self.writer
        if kind == P.K_HELLO:
            _, owner = P.decode_hello(payload)
            if owner is not None and conn.owner is None:
                w.attach_owner(owner)
                conn.owner = owner
            return conn.client
        if kind == P.K_REMOVE:
            values = P.decode_values(payload)
            removed, clients = w.remove(values, client=conn.client, with_clients=True)
            named = set(values.tolist())
            extra = np.array([v not in named or o != conn.client for v, o in zip(removed.tolist(), clients.tolist())], dtype=bool)
            if extra.any():
                self._dropped.append((removed[extra], clients[extra]))
            return len(removed)
        tokens, values, tag, ns_bytes = P.decode_prompt(payload)
        try:
            namespace = namespace_from_wire(tag, ns_bytes)
        except ValueError as e:
            raise P.ProtocolError(str(e)) from None
        if kind == P.K_INSERT:
            return w.insert(tokens, values, namespace, client=conn.client, owner=conn.owner)
        if kind == P.K_PIN:
            handle = w.pin(tokens, namespace)
            conn.pins.append(handle)
            return handle.length
        handle = w.find_pin(tokens, namespace, among=conn.pins)
        if handle is None:
            raise InvalidInputError("these tokens are not pinned by this client: unpin only what you pinned "
                                    "(with the same tokens and namespace)")
        conn.pins.remove(handle)
        return w.unpin(handle)

    # --- dropped blocks and disconnects ---------------------------------------------------

    def _collect_dropped(self, values: np.ndarray, clients: np.ndarray) -> None:
        self._dropped.append((values, clients))

    def _deliver_dropped(self) -> None:
        """One EVICTED frame per client per pass, values in drop order."""
        if not self._dropped:
            return
        values = np.concatenate([v for v, _ in self._dropped])
        clients = np.concatenate([o for _, o in self._dropped])
        self._dropped.clear()
        for client in np.unique(clients).tolist():
            conn = self._conns.get(client)
            if conn is not None and not conn.dead and not conn.closing and not conn.eof:
                conn.outbuf += P.frame(P.K_EVICTED, 0, P.encode_values(values[clients == client]))

    def _disconnect(self, conn: _Conn) -> None:
        self._sel.unregister(conn.sock)
        conn.sock.close()
        del self._conns[conn.client]
        for handle in conn.pins:
            self.writer.unpin(handle)  # exact, whatever happened to its blocks since
        if conn.owner is not None:
            if self.writer.detach_owner(conn.owner) == 0 and not self.keep_on_disconnect:
                released = self.writer.clear_owner(conn.owner)
                log.info("client pid %d (id %d), the last of owner %s, left; it let go of %d blocks",
                         conn.pid, conn.client, conn.owner, released)
        elif not self.keep_on_disconnect:
            values, clients = self.writer.remove_client(conn.client)
            others = clients != conn.client
            if others.any():
                self._dropped.append((values[others], clients[others]))
            log.info("client pid %d (id %d) left; removed its %d blocks", conn.pid, conn.client, int((~others).sum()))

    def _flush(self, conn: _Conn) -> None:
        if conn.dead:
            return
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.warning("client pid %d: %s", conn.pid, e)
                conn.dead = True
                return
        if not conn.outbuf and (conn.closing or conn.eof):
            conn.dead = True
            self._disconnect(conn)
            return
        want = (0 if conn.eof else selectors.EVENT_READ) | (selectors.EVENT_WRITE if conn.outbuf else 0)
        if self._sel.get_key(conn.sock).events != want:
            self._sel.modify(conn.sock, want, conn)

    def _still_ours(self) -> bool:
        try:
            self.writer.stats()  # checks the claim
            return True
        except ShmCacheError:
            return False

    def _close_parts(self) -> None:
        """Close everything but the writer and the clients' connections."""
        if self.metrics is not None:
            self.metrics.close()
        if self.publisher is not None:
            self.publisher.close()
        if self._ingest is not None:
            self._ingest.close()
        self._sel.close()
        self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        try:
            if os.lstat(self.sock_path).st_ino == self._sock_ino:
                os.unlink(self.sock_path)
        except FileNotFoundError:
            pass

    def _shutdown(self) -> None:
        if self._ingest is not None and not self.unlink_on_exit and self._still_ours():
            try:
                self._ingest.save(segment.state_path(self.name))
            except OSError as e:
                log.error("cannot save the KV-event state for the next daemon: %s", e)
        for conn in list(self._conns.values()):
            self._sel.unregister(conn.sock)
            conn.sock.close()
        self._conns.clear()
        self._close_parts()
        self.writer.close(unlink=self.unlink_on_exit)
