"""The daemon's KV-event sources: a ZMQ SUB socket per engine publisher,
each feeding one named owner (``shmcache.events.OwnerFeed``), with gaps
healed from the publisher's replay socket.

vLLM and SGLang publish one endpoint per data-parallel rank (base port +
rank) and bind it (``tcp://*:5557``); the daemon connects to each. A
publisher's replay socket is a ROUTER: a DEALER sends ``[b"", start_seq]``
(8 bytes big-endian) and gets ``[b"", topic, seq, payload]`` for every
batch it still buffers from ``start_seq`` on (older publishers leave out
the topic), then ``[b"", b"", -1 (8 bytes, signed), b""]``.

Nothing is lost silently: a gap in an owner's sequence numbers is filled
from replay when the source has one (``healed_batches``), and whatever
replay cannot give back is counted and logged (``lost_batches``). Every
frame that does not parse is counted (``malformed``) and logged; no
message can make the daemon stop.

The loop is the daemon's: ``fds`` go into its selector, ``drain`` applies
what arrived, and ``pending`` says whether more is already queued (ZMQ's
notification descriptor is edge-triggered: it says "something changed",
not "something is there").
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass

import msgspec
import zmq

from .errors import InvalidInputError, SegmentRetiredError, WriterLostError
from .events import MalformedError, OwnerFeed, parse_frames
from .layout import MAX_OWNERS, O_BLOCKS, O_HEALED, O_LOST, O_MALFORMED
from .owners import check_owner_name

log = logging.getLogger("shmcache.ingest")

#: Client ids of event sources: the daemon's own clients stay below 2**31.
EVENTS_CLIENT = 0x80000000
#: Seconds a replay request may take before what it did not return counts as lost.
REPLAY_TIMEOUT_S = 2.0
END_SEQ = (-1).to_bytes(8, "big", signed=True)
#: Endpoints the daemon connects to: a host, not a wildcard (the publisher binds ``tcp://*:5557``;
#: the daemon connects to ``tcp://127.0.0.1:5557``), and a numeric port.
_ENDPOINT = re.compile(r"tcp://[^\s*:/][^\s*/]*:\d{1,5}|ipc://\S+")


@dataclass
class Source:
    """An engine publisher: the owner its events are attributed to, its PUB
    endpoint, and its replay (ROUTER) endpoint if it has one."""

    owner: str
    endpoint: str
    replay: str | None = None


def _pair(spec: str, flag: str) -> tuple[str, str]:
    owner, sep, endpoint = spec.partition("=")
    if not sep:
        raise InvalidInputError(f"{flag} takes OWNER=ENDPOINT (e.g. rank0=tcp://127.0.0.1:5557), got {spec!r}")
    check_owner_name(owner)
    if not _ENDPOINT.fullmatch(endpoint):
        raise InvalidInputError(
            f"{flag} {owner}: {endpoint!r} is not an endpoint the daemon can connect to: name the publisher's "
            "host and port (tcp://127.0.0.1:5557, not the tcp://*:5557 it binds) or its ipc://PATH"
        )
    return owner, endpoint


def sources_from(events: list[str], replays: list[str], config: str | None = None) -> tuple[list[Source], str | None]:
    """The sources named on the command line (``OWNER=ENDPOINT`` strings)
    and in a JSON config file, and the config's topic, if any.

    The file holds ``{"sources": [{"owner": ..., "endpoint": ..., "replay":
    ...}, ...], "topic": ...}``. Raises InvalidInputError, saying what is
    wrong, for a bad pair, a replay without its source, a repeated owner, or
    more owners than a segment holds.
    """
    pairs = [_pair(s, "--kv-events") for s in events]
    replay = dict(_pair(s, "--kv-events-replay") for s in replays)
    topic = None
    if config is not None:
        try:
            with open(config) as f:
                doc = json.load(f)
            entries = doc.get("sources", [])
            topic = doc.get("topic")
            for e in entries:
                pairs.append(_pair(f"{e['owner']}={e['endpoint']}", config))
                if e.get("replay"):
                    replay[e["owner"]] = _pair(f"{e['owner']}={e['replay']}", config)[1]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidInputError(
                f"--kv-events-config {config}: {e!r}; it must be JSON like "
                '{"sources": [{"owner": "rank0", "endpoint": "tcp://127.0.0.1:5557", "replay": "tcp://127.0.0.1:5567"}]}'
            ) from None
    owners = [o for o, _ in pairs]
    if len(set(owners)) != len(owners):
        raise InvalidInputError(f"each owner takes one --kv-events source; repeated: {sorted({o for o in owners if owners.count(o) > 1})}")
    if len(owners) > MAX_OWNERS:
        raise InvalidInputError(f"{len(owners)} event sources: a segment holds at most {MAX_OWNERS} owners")
    for o in replay:
        if o not in owners:
            raise InvalidInputError(f"--kv-events-replay {o}: no --kv-events source for owner {o!r}")
    return [Source(o, e, replay.get(o)) for o, e in pairs], topic


def _load(path: str) -> dict:
    """The state a previous daemon saved, read once: the file is removed so
    that a later crash never restores it again. {} if there is none or it
    does not parse."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        os.unlink(path)
        state = msgspec.msgpack.decode(raw)
        return state if isinstance(state, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, msgspec.DecodeError) as e:
        log.warning("cannot read the saved KV-event state %s (%s): starting without it", path, e)
        return {}


class _Sub:
    def __init__(self, ctx: zmq.Context, source: Source, topic: bytes, feed: OwnerFeed) -> None:
        self.source = source
        self.feed = feed
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 0)  # never drop at our end: a gap is healed or counted, not made
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.connect(source.endpoint)


class Ingest:
    """Every event source of one daemon, applied to its Writer.

    Across daemons: a daemon that stops and keeps its segment saves each
    source's sequence number and map (``save``); the next one restores them
    (``state_path``, read once and removed), so what owners hold survives
    and the batches published in between are fetched from replay (or
    counted lost) like any gap. Without a saved state (the daemon before
    was killed) an owner that holds blocks is resynchronised at its first
    batch: it lets go of everything, then gets what the replay socket still
    has from sequence 0; without a replay socket it starts empty (its old
    holds could no longer be removed when the engine drops them).
    """

    def __init__(self, writer, sources: list[Source], topic: str = "", state_path: str | None = None) -> None:
        self.ctx = zmq.Context()
        self.topic = topic.encode()
        self.subs: list[_Sub] = []
        saved = _load(state_path) if state_path else {}
        try:
            for i, src in enumerate(sources):
                feed = OwnerFeed(writer, src.owner, EVENTS_CLIENT | i)
                if src.owner in saved:
                    try:
                        feed.restore(saved[src.owner])
                        log.info("owner %s: restored %d blocks' map at sequence %s", src.owner, len(feed.blocks),
                                 feed.next_seq)
                    except (KeyError, IndexError, TypeError, ValueError) as e:
                        feed.blocks.clear()
                        feed.next_seq = None
                        feed.unsynced = True
                        log.warning("owner %s: the saved KV-event state is damaged (%r): starting without it",
                                    src.owner, e)
                if feed.unsynced:
                    # Holds a daemon before this one stored and left no map for: let go of
                    # them now (its engine may be gone for good); replay rebuilds them at
                    # the first batch where there is a replay socket.
                    log.warning("owner %s holds %d blocks a previous daemon stored and left no state for: it lets "
                                "go of them%s", src.owner, int(feed.words[O_BLOCKS]),
                                " and replays what its publisher still buffers at its first batch" if src.replay
                                else " (no replay socket: they come back as the engine stores them again)")
                    feed.clear()
                self.subs.append(_Sub(self.ctx, src, self.topic, feed))
                log.info("owner %s: subscribed to %s%s", src.owner, src.endpoint,
                         f" (replay {src.replay})" if src.replay else " (no replay: gaps are counted as lost)")
        except BaseException:
            self.close()
            raise

    def save(self, path: str) -> None:
        """Write every source's state for the next daemon (mode 0600)."""
        doc = msgspec.msgpack.encode({s.source.owner: s.feed.export() for s in self.subs})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(doc)

    def fds(self) -> list[int]:
        return [s.sock.getsockopt(zmq.FD) for s in self.subs]

    def pending(self) -> bool:
        """Whether a message is queued on any source now."""
        return any(s.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN for s in self.subs)

    def drain(self, budget: int = 256) -> int:
        """Apply up to ``budget`` queued messages per source; returns how many."""
        done = 0
        for s in self.subs:
            for _ in range(budget):
                try:
                    frames = s.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    self._handle(s, [f.buffer for f in frames])
                except (WriterLostError, SegmentRetiredError):
                    raise  # the segment is no longer this daemon's: it stops
                except Exception:  # a bug met by input nobody foresaw: counted and logged, never fatal
                    s.feed.count(O_MALFORMED)
                    log.exception("owner %s: message skipped after an unexpected error", s.source.owner)
                done += 1
            s.sock.getsockopt(zmq.EVENTS)  # re-arms the edge-triggered descriptor
        return done

    def _handle(self, s: _Sub, frames: list[bytes]) -> None:
        try:
            seq, payload = parse_frames(frames)
        except MalformedError as e:
            s.feed.count(O_MALFORMED)
            log.warning("owner %s: message skipped: %s", s.source.owner, e)
            return
        if s.feed.unsynced:
            s.feed.unsynced = False
            if s.source.replay is not None:
                s.feed.next_seq = 0  # rebuilt from whatever the publisher still buffers
        first, end = s.feed.sequence(seq)
        if first < end:
            self._heal(s, first, end)
        s.feed.apply_batch(seq, payload)

    def _heal(self, s: _Sub, first: int, end: int) -> None:
        """Batches ``first..end-1`` were missed: apply what the source's
        replay socket still has of them, in order; count the rest lost."""
        got: dict[int, bytes] = {}
        if s.source.replay is not None:
            got = self._replay(s, first, end)
        for seq in sorted(got):  # a gap may be any size: only what came back is walked
            s.feed.apply_batch(seq, got[seq])
            s.feed.count(O_HEALED)
        lost = (end - first) - len(got)
        if lost:
            s.feed.count(O_LOST, lost)
            log.warning("owner %s: %d batch(es) of %d..%d lost%s; what they changed is missing until the engine "
                        "stores or removes those blocks again", s.source.owner, lost, first, end - 1,
                        "" if s.source.replay else " (no replay socket configured)")
        s.feed.next_seq = end

    def _replay(self, s: _Sub, first: int, end: int) -> dict[int, bytes]:
        """Ask the replay socket for batches from ``first``; those below ``end``, by sequence."""
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        got: dict[int, bytes] = {}
        try:
            dealer.connect(s.source.replay)
            dealer.send_multipart([b"", (first & (1 << 64) - 1).to_bytes(8, "big")])
            deadline = time.monotonic() + REPLAY_TIMEOUT_S
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not dealer.poll(int(left * 1000)):
                    log.warning("owner %s: replay from %s did not finish within %.0f s", s.source.owner,
                                s.source.replay, REPLAY_TIMEOUT_S)
                    break
                frames = dealer.recv_multipart()
                if len(frames) in (4, 3) and frames[0] == b"" and frames[-2] == END_SEQ:
                    break
                try:
                    seq, payload = parse_frames(frames[-3:])
                except MalformedError as e:
                    s.feed.count(O_MALFORMED)
                    log.warning("owner %s: replay message skipped: %s", s.source.owner, e)
                    continue
                if first <= seq < end:
                    got[seq] = payload
        except zmq.ZMQError as e:
            log.warning("owner %s: replay from %s failed: %s", s.source.owner, s.source.replay, e)
        finally:
            dealer.close()
        return got

    def close(self) -> None:
        for s in self.subs:
            s.sock.close()
        self.ctx.term()
