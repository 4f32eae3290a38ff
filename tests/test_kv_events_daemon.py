"""KV events in over the wire (issue 12, part 1): ``shmcache serve
--kv-events`` in its own process, subscribed over TCP to publishers that
send what vLLM and SGLang send, frame for frame; a Reader checks what each
owner holds after every step."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import zmq

from shmcache import Reader
from shmcache.events import fold_hash

from daemon_proc import Served
from kv_publisher import Publisher
from kv_structs import ARRAY, MAP
from test_events import sample

BS = 16


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


class Node:
    """A daemon subscribed to ``pubs`` (owner -> Publisher), and a Reader."""

    def __init__(self, name: str, pubs: dict[str, Publisher], *extra: str, capacity: int = 4096,
                 config: str | None = None) -> None:
        args = []
        for owner, p in pubs.items():
            args += ["--kv-events", f"{owner}={p.endpoint}"]
            if p.replay_endpoint:
                args += ["--kv-events-replay", f"{owner}={p.replay_endpoint}"]
        if config is not None:  # the same sources from a JSON file instead
            with open(config, "w") as f:
                json.dump({"sources": [{"owner": o, "endpoint": p.endpoint, "replay": p.replay_endpoint}
                                       for o, p in pubs.items()], "topic": "kv@"}, f)
            args = ["--kv-events-config", config]
        self.served = Served(name, capacity, *args, *extra, block_size=BS)
        for p in pubs.values():
            p.wait_subscribed()
        self.reader = Reader.attach(name)

    def applied(self, owner: str, seq: int, batches: int = 0, timeout: float = 30.0) -> dict:
        """Wait until ``owner``'s batch ``seq`` is applied (and ``batches``
        in all, for sequences that go back); its owner info."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.reader.owner_info().get(owner)
            if info is not None and info["next_seq"] > seq and info["batches"] >= batches:
                return info
            assert time.monotonic() < deadline, f"{owner}: batch {seq} not applied within {timeout} s: {info}"
            time.sleep(0.005)

    def close(self) -> None:
        self.reader.close()
        self.served.kill()


@pytest.fixture
def node_factory(shm_name, ctx):
    made: list[Node] = []
    pubs: list[Publisher] = []

    def make(owners: dict[str, dict], *extra: str, **kw) -> tuple[Node, dict[str, Publisher]]:
        ps = {o: Publisher(ctx, **opts) for o, opts in owners.items()}
        pubs.extend(ps.values())
        made.append(Node(shm_name, ps, *extra, **kw))
        return made[-1], ps

    yield make
    for n in made:
        n.close()
    for p in pubs:
        p.close()


def test_two_ranks_both_encodings_and_every_hash_kind(node_factory):
    node, pubs = node_factory({"rank0": {}, "rank1": {"replay": False}})
    r = node.reader
    prompt = np.arange(1000, 1064)
    s = pubs["rank0"].send(MAP.batch([MAP.stored([2**64 - 5, 2**63 + 1, 3, 4], None, prompt)], ts=time.time()))
    node.applied("rank0", s)
    t = pubs["rank1"].send(ARRAY.batch([ARRAY.stored([-7, b"\x01" * 32], None, prompt[:32])], rank=1))
    node.applied("rank1", t)
    assert r.match_owners(prompt) == {"rank0": 64, "rank1": 32}
    assert r.match_prefix(prompt).values.tolist()[:2] == [fold_hash(2**64 - 5), fold_hash(2**63 + 1)]
    # The engines' own sample payloads, as sent.
    s = pubs["rank1"].send(sample("sglang-0.5.23-pages-of-1.msgpack"))
    node.applied("rank1", s)
    s = pubs["rank0"].send(MAP.batch([MAP.removed([2**63 + 1])]))  # a middle block
    info = node.applied("rank0", s)
    assert r.match_owners(prompt) == {"rank0": 16, "rank1": 32}
    assert info["removed_blocks"] == 3 and info["lag_ns"] > 0
    s = pubs["rank1"].send(ARRAY.batch([ARRAY.cleared()]))
    node.applied("rank1", s)
    assert r.match_owners(prompt) == {"rank0": 16, "rank1": 0}
    assert r.match_prefix(prompt).length == 16


def test_a_gap_is_healed_from_replay_or_counted_lost(node_factory):
    node, pubs = node_factory({"rank0": {}, "rank1": {"replay": False}, "rank2": {"old_replay": True}})
    r = node.reader
    prompt = np.arange(2000, 2064)
    for owner in ("rank0", "rank1", "rank2"):
        p = pubs[owner]
        p.send(MAP.batch([MAP.stored([1], None, prompt[:16])]))
        p.send(MAP.batch([MAP.stored([2], 1, prompt[16:32])]), deliver=False)
        p.send(MAP.batch([MAP.stored([3], 2, prompt[32:48])]), deliver=False)
        s = p.send(MAP.batch([MAP.stored([4], 3, prompt[48:64])]))
        node.applied(owner, s)
    assert r.match_owners(prompt) == {"rank0": 64, "rank1": 16, "rank2": 64}
    info = r.owner_info()
    assert info["rank0"]["healed_batches"] == 2 and info["rank0"]["lost_batches"] == 0
    assert info["rank2"]["healed_batches"] == 2  # a publisher whose replay leaves out the topic
    assert info["rank1"]["lost_batches"] == 2 and info["rank1"]["skipped"]["parent"] == 1
    assert pubs["rank0"].replay_requests == [1]


def test_a_restarted_engine_and_a_departed_one(node_factory):
    node, pubs = node_factory({"rank0": {}, "rank1": {}})
    r = node.reader
    prompt = np.arange(3000, 3032)
    for owner in pubs:
        node.applied(owner, pubs[owner].send(MAP.batch([MAP.stored([1, 2], None, prompt)])))
    pubs["rank0"].seq = 0  # the engine restarted: its sequence starts again
    node.applied("rank0", pubs["rank0"].send(MAP.batch([MAP.stored([9], None, prompt[:16])])), batches=2)
    assert r.match_owners(prompt) == {"rank0": 16, "rank1": 32}
    assert r.owner_info()["rank0"]["restarts"] == 1
    pubs["rank1"].close()  # a publisher that goes away keeps its blocks
    del pubs["rank1"]
    node.applied("rank0", pubs["rank0"].send(MAP.batch([])))
    assert r.match_owners(prompt) == {"rank0": 16, "rank1": 32}


def test_malformed_messages_are_counted_and_never_stop_the_daemon(node_factory):
    node, pubs = node_factory({"rank0": {}})
    p, r = pubs["rank0"], node.reader
    prompt = np.arange(4000, 4048)
    p.send_frames([b"", b"\x00" * 8])  # two frames
    p.send_frames([b"", b"\x00" * 4, MAP.batch([])])  # a truncated sequence number
    p.send_frames([b"", b"\x00" * 8, b"\x93\x01"])  # a truncated payload
    bad = MAP.stored([1], None, prompt[:16])
    s = p.send(MAP.batch([bad]))
    raw = [0.0, [{"type": "BlockStored", "block_hashes": [[1]], "parent_block_hash": None, "token_ids": [1] * 16,
                  "block_size": 16}, {"type": "Teleported"}, ["AllBlocksMoved"]], 0]
    import msgspec

    s = p.send(msgspec.msgpack.encode(raw))
    s = p.send(MAP.batch([MAP.stored([2], 1, prompt[16:32])]))
    info = node.applied("rank0", s)
    assert info["malformed"] == 3
    assert info["skipped"]["bad_field"] == 1 and info["skipped"]["unknown_type"] == 2
    assert r.match_owners(prompt) == {"rank0": 32}
    # Hostile numbers: timestamps that are no time, extra_keys that are no
    # list, and a sequence number that jumps to the last one (a gap of 2**64).
    for ts in (float("inf"), float("nan"), -1e300):
        s = p.send(MAP.batch([], ts=ts))
    s = p.send(MAP.batch([MAP.stored([3], 2, prompt[32:48], extra_keys=[7])]))
    info = node.applied("rank0", s)
    assert info["lag_ns"] <= 10**18 and info["skipped"]["extra_keys"] == 1  # a lag from any clock is clamped
    last = p.send(MAP.batch([]), seq=2**64 - 1)
    info = node.applied("rank0", -1, batches=info["batches"] + 1)
    assert info["lost_batches"] == last - (s + 1)
    assert node.served.proc.poll() is None and r.match_owners(prompt) == {"rank0": 32}


def test_dump_shows_owners_and_sources(node_factory, shm_name):
    import json
    import subprocess
    import sys

    node, pubs = node_factory({"rank0": {}})
    node.applied("rank0", pubs["rank0"].send(MAP.batch([MAP.stored([1], None, range(16)), MAP.removed([77])])))
    out = subprocess.run([sys.executable, "-m", "shmcache.cli", "dump", shm_name, "--json"], capture_output=True,
                         text=True, timeout=120)
    o = json.loads(out.stdout)["owners"]["rank0"]
    assert o["kind"] == "events" and o["attached"] and o["blocks"] == 1 and o["next_seq"] == 1
    assert o["skipped"]["unknown_block"] == 1
    text = subprocess.run([sys.executable, "-m", "shmcache.cli", "dump", shm_name], capture_output=True, text=True,
                          timeout=120).stdout
    assert "owner   rank0: 1 blocks, events, attached; seq 0, 1 batches" in text and "unknown_block 1" in text


def test_sources_from_a_config_file_with_a_topic_prefix(node_factory, tmp_path):
    node, pubs = node_factory({"rank0": {"topic": b"kv@rank0@llama"}, "rank1": {"topic": b"other"}},
                              config=str(tmp_path / "sources.json"))
    prompt = np.arange(6000, 6016)
    pubs["rank1"].send(MAP.batch([MAP.stored([1], None, prompt)]))  # filtered out by the topic prefix
    s = pubs["rank0"].send(MAP.batch([MAP.stored([1], None, prompt)]))
    node.applied("rank0", s)
    assert node.reader.match_owners(prompt) == {"rank0": 16, "rank1": 0}
    assert node.reader.owner_info()["rank1"]["batches"] == 0


@pytest.mark.parametrize("args, fragment", [
    (["--kv-events", "rank0"], "OWNER=ENDPOINT"),
    (["--kv-events", "rank 0=tcp://127.0.0.1:1"], "owner names"),
    (["--kv-events", "rank0=http://x"], "not an endpoint the daemon can connect to"),
    (["--kv-events", "rank0=tcp://*:5557"], "not the tcp://*:5557 it binds"),
    (["--kv-events", "a=tcp://127.0.0.1:1", "--kv-events-replay", "a=tcp://*:5567"], "name the publisher's host"),
    (["--kv-events", "a=tcp://127.0.0.1:1", "--kv-events", "a=tcp://127.0.0.1:2"], "repeated"),
    (["--kv-events-replay", "a=tcp://127.0.0.1:1"], "no --kv-events source"),
    (["--kv-events-config", "/nonexistent.json"], "--kv-events-config"),
])
def test_bad_event_arguments_exit_1_with_one_line(shm_name, args, fragment):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "shmcache.cli", "serve", shm_name, "--capacity", "8", *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and fragment in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_what_owners_hold_survives_a_daemon_restart(shm_name, ctx, how):
    """A daemon that keeps its segment and stops (SIGTERM) leaves its
    sources' maps for the next one: presence survives, batches published
    while no daemon ran are healed from replay (or counted lost), and
    removals of blocks stored before the restart still apply. A killed
    daemon leaves no map: an owner with a replay socket is rebuilt from it,
    one without starts empty (never holding what it can no longer remove)."""
    pubs = {"rank0": Publisher(ctx), "rank1": Publisher(ctx, replay=False)}
    prompt = np.arange(5000, 5064)
    node = Node(shm_name, pubs, "--keep")
    second = None
    try:
        for owner, p in pubs.items():
            node.applied(owner, p.send(MAP.batch([MAP.stored([1, 2], None, prompt[:32]),
                                                  MAP.stored([3], 2, prompt[32:48])])))
        assert node.reader.match_owners(prompt) == {"rank0": 48, "rank1": 48}
        if how == "stopped":
            assert node.served.stop() == 0
        else:
            node.served.kill()
        node.reader.close()
        for p in pubs.values():  # published while no daemon runs: nobody receives them
            p.send(MAP.batch([MAP.stored([4], 3, prompt[48:64])]))
        second = Node(shm_name, pubs, "--keep")
        r = second.reader
        if how == "stopped":
            assert r.match_owners(prompt) == {"rank0": 48, "rank1": 48}  # held across the restart
        for owner, p in pubs.items():
            second.applied(owner, p.send(MAP.batch([MAP.removed([2])])))
        info = r.owner_info()
        if how == "stopped":
            # The map survived: removing block 2 takes 2, 3 (and 4 where it came back by replay).
            assert r.match_owners(prompt) == {"rank0": 16, "rank1": 16}
            assert info["rank0"]["healed_batches"] == 1 and info["rank1"]["lost_batches"] == 1
        else:
            assert r.match_owners(prompt) == {"rank0": 16, "rank1": 0}
            assert info["rank0"]["healed_batches"] == 2 and info["rank0"]["lost_batches"] == 0
    finally:
        for n in (node, second):
            if n is not None:
                n.close()
        for p in pubs.values():
            p.close()
        import shmcache

        shmcache.unlink(shm_name)
