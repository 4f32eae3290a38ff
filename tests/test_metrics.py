"""Prometheus metrics (issue 13, part 2): the daemon's ``--metrics-port``
and ``shmcache metrics`` for an embedded writer, scraped over HTTP and
parsed with prometheus_client's text parser; every listed metric is there
and moves the right way after a known sequence of operations."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from shmcache import Client, Reader, Writer

from daemon_proc import Served
from kv_publisher import Publisher
from kv_structs import MAP

BS = 4
LISTED = ["prefix_cache_queries_total", "prefix_cache_hits_total", "blocks", "capacity_blocks",
          "inserted_blocks_total", "evicted_blocks_total", "removed_blocks_total", "owner_blocks", "events_total",
          "events_lost_total", "events_skipped_total", "event_lag_seconds", "readers", "writer_up"]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples[("shmcache_" + name, tuple(sorted(labels.items())))]


def names(samples: dict) -> set[str]:
    return {n for n, _ in samples}


def reader_child(name, attached, die):
    r = Reader.attach(name)
    r.match_prefix(np.arange(8, dtype=np.int64))
    attached.set()
    die.wait(60)
    os.kill(os.getpid(), signal.SIGKILL)  # dies holding its reader slot


def test_daemon_metrics_move_with_operations(shm_name):
    ctx = zmq.Context()
    engine = Publisher(ctx)  # a vLLM-format KV-event source, owner "rank0"
    served = Served(shm_name, 12, "--kv-events", f"rank0={engine.endpoint}", "--metrics-port", "0",
                    "--publish-events", "tcp://127.0.0.1:*", block_size=BS)
    try:
        engine.wait_subscribed()
        port = int(dict(kv.split("=", 1) for kv in served.ready.split()[1:])["metrics_port"])
        before = scrape(port)
        for n in LISTED[:8] + ["readers", "writer_up", "published_batches_total", "daemon_request_seconds_count"]:
            assert "shmcache_" + n in names(before), n
        assert value(before, "capacity_blocks") == 12 and value(before, "writer_up") == 1
        assert value(before, "blocks", state="live") == 0 and value(before, "blocks", state="free") == 12

        c = Client.connect(shm_name, owner="router0")
        for i in range(4):  # 12 blocks into a capacity of 12, then 4 more: evictions
            c.insert(1000 * (i + 1) + np.arange(3 * BS), np.arange(3) + 10 * i)
        r = Reader.attach(shm_name)
        assert r.match_prefix(4000 + np.arange(3 * BS)).length == 3 * BS
        r.match_prefix(np.arange(2 * BS) + 99_999)  # a miss
        engine.send(MAP.batch([MAP.stored([11, 12], None, list(range(50, 58)), block_size=BS),
                               MAP.stored([13], 99, list(range(60, 64)), block_size=BS)], ts=0.0))
        deadline = time.monotonic() + 30
        while r.owner_info().get("rank0", {}).get("next_seq", 0) < 1:  # the daemon shows no other sign
            assert time.monotonic() < deadline, "the event batch was not applied"
            time.sleep(0.005)
        after = scrape(port)
        assert value(after, "inserted_blocks_total") == 14  # 12 by the client, 2 from the event
        assert value(after, "evicted_blocks_total") > value(before, "evicted_blocks_total")
        assert value(after, "blocks", state="live") == 12 and value(after, "blocks", state="free") == 0
        assert value(after, "prefix_cache_queries_total") >= 5 * BS
        assert value(after, "prefix_cache_hits_total") >= 3 * BS
        assert value(after, "owner_blocks", owner="router0") > 0 and value(after, "owner_blocks", owner="rank0") == 2
        assert value(after, "events_total", source="rank0") == 2
        assert value(after, "events_skipped_total", source="rank0", reason="parent") == 1
        assert value(after, "events_lost_total", source="rank0") == 0
        assert value(after, "event_lag_seconds", source="rank0") > 0  # ts 0.0: published long ago
        assert value(after, "readers", state="alive") == 2  # r, and the reader a Client attaches
        assert value(after, "published_batches_total") > 0
        assert value(after, "daemon_request_seconds_count") >= 5  # hello + 4 inserts
        c.close()
        r.close()
        Client.connect(shm_name).close()  # a round trip after the close: its removal is applied
        gone = scrape(port)
        assert value(gone, "removed_blocks_total") > 0 and value(gone, "owner_blocks", owner="router0") == 0
        assert value(gone, "readers", state="alive") == 0
    finally:
        served.kill()
        engine.close()
        ctx.destroy(linger=0)


def test_shmcache_metrics_for_an_embedded_writer(shm_name, spawn):
    w = Writer.create(shm_name, capacity=16, block_size=BS)
    w.reap_interval = 3600  # a dead reader stays until reaped
    proc = subprocess.Popen([sys.executable, "-m", "shmcache.cli", "metrics", shm_name, "--port", "0",
                             "--addr", "127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = None
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving metrics of {shm_name} on http://127.0.0.1:"), line + proc.stderr.read()
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        w.insert(np.arange(8), [1, 2], owner="engine")
        attached, die = spawn.Event(), spawn.Event()
        child = spawn.Process(target=reader_child, args=(shm_name, attached, die))
        child.start()
        assert attached.wait(120)
        s = scrape(port)
        for n in LISTED:
            if n not in ("events_total", "events_lost_total", "events_skipped_total", "event_lag_seconds"):
                assert "shmcache_" + n in names(s), n
        assert value(s, "readers", state="alive") == 1 and value(s, "readers", state="dead") == 0
        assert value(s, "prefix_cache_hits_total") == 8 and value(s, "writer_up") == 1
        die.set()
        child.join(60)
        s = scrape(port)
        assert value(s, "readers", state="alive") == 0 and value(s, "readers", state="dead") == 1
        w.close()
        assert value(scrape(port), "writer_up") == 0
    finally:
        if child is not None and child.is_alive():
            child.kill()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
        if w._A is not None:
            w.close(unlink=True)
        else:
            Writer.open(shm_name).close(unlink=True)


def test_metrics_port_in_use_is_a_clear_error(shm_name):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        w = Writer.create(shm_name, capacity=8, block_size=BS)
        out = subprocess.run([sys.executable, "-m", "shmcache.cli", "metrics", shm_name, "--port",
                              str(s.getsockname()[1]), "--addr", "127.0.0.1"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "cannot serve on port" in out.stderr
        w.close(unlink=True)
    finally:
        s.close()


@pytest.mark.parametrize("flag, value", [("--publish-replay", "x"), ("--publish-model", "x"), ("--publish-interval-ms", "5"),
                                         ("--publish-buffer-mb", "8")])
def test_publish_options_need_an_endpoint(shm_name, flag, value):
    out = subprocess.run([sys.executable, "-m", "shmcache.cli", "serve", shm_name, "--capacity", "8", flag, value],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "need --publish-events" in out.stderr
    assert not os.path.exists(f"/dev/shm/shmcache.{shm_name}")


def test_the_grafana_dashboard_asks_for_exported_metrics():
    import json
    import re

    with open(os.path.join(os.path.dirname(__file__), "..", "tools", "grafana-shmcache.json")) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_bucket$", "", m) for e in exprs for m in re.findall(r"shmcache_\w+", e)}
    exported = {"shmcache_" + n for n in LISTED} | {"shmcache_daemon_request_seconds", "shmcache_published_batches_total"}
    assert used and used <= exported, used - exported
    assert {"shmcache_prefix_cache_hits_total", "shmcache_blocks", "shmcache_evicted_blocks_total",
            "shmcache_owner_blocks", "shmcache_event_lag_seconds"} <= used
