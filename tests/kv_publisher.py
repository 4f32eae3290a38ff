"""A stand-in for an engine's KV-event publisher, speaking exactly what
vLLM's ``ZmqEventPublisher`` speaks: a PUB endpoint sending ``(topic,
seq as 8 bytes big-endian, payload)`` and a ROUTER replay endpoint answering
``[b"", start_seq]`` with every buffered batch from ``start_seq`` on, then
the end marker. It binds an XPUB (the same wire protocol as PUB) so a test
can wait until the daemon's subscription has arrived instead of sleeping.
"""

from __future__ import annotations

import threading

import zmq

END_SEQ = (-1).to_bytes(8, "big", signed=True)


class Publisher:
    def __init__(self, ctx: zmq.Context, topic: bytes = b"", replay: bool = True, old_replay: bool = False) -> None:
        self.topic = topic
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, also a restarted subscriber's
        self.port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.seq = 0
        self.buffer: list[tuple[int, bytes]] = []
        self.replay_endpoint = None
        self._stop = threading.Event()
        self._thread = None
        self.replay_requests: list[int] = []
        if replay:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            port = self.router.bind_to_random_port("tcp://127.0.0.1")
            self.replay_endpoint = f"tcp://127.0.0.1:{port}"
            self._old = old_replay
            self._thread = threading.Thread(target=self._serve_replay, daemon=True)
            self._thread.start()

    def wait_subscribed(self, timeout: float = 30.0) -> None:
        """Block until a subscription message arrives (skipping the
        unsubscription of a subscriber that went away)."""
        while True:
            if not self.pub.poll(int(timeout * 1000)):
                raise AssertionError(f"no subscriber reached {self.endpoint} within {timeout} s")
            if self.pub.recv()[:1] == b"\x01":
                return

    def send(self, payload: bytes, *, deliver: bool = True, seq: int | None = None) -> int:
        """Publish one batch (buffered for replay); with ``deliver=False`` it
        is only buffered, as if the subscriber missed it. Returns its seq."""
        if seq is None:
            seq, self.seq = self.seq, self.seq + 1
        self.buffer.append((seq, payload))
        if deliver:
            self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def send_frames(self, frames: list[bytes]) -> None:
        self.pub.send_multipart(frames)

    def _serve_replay(self) -> None:
        while not self._stop.is_set():
            if not self.router.poll(50):
                continue
            frame = self.router.recv_multipart()
            if len(frame) != 3:
                continue
            client, _, start = frame
            start_seq = int.from_bytes(start, "big")
            self.replay_requests.append(start_seq)
            for seq, buf in list(self.buffer):
                if seq >= start_seq:
                    head = [client, b""] if self._old else [client, b"", self.topic]
                    self.router.send_multipart([*head, seq.to_bytes(8, "big"), buf])
            self.router.send_multipart([client, b"", *([] if self._old else [b""]), END_SEQ, b""])

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self.router.close()
        self.pub.close()
