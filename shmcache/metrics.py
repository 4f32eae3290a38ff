"""Prometheus metrics of a segment, read from its shared-memory counters at
each scrape.

The numbers live in the segment (header counters, the reader table, the
owner table), so one collector over a ``Reader`` serves them for any
writer, embedded or the daemon, without prometheus_client's multiprocess
mode. Names follow vLLM's (``vllm:prefix_cache_queries`` counts tokens),
prefixed ``shmcache_``:

==========================================  =======  =========================================
metric                                      type     from
==========================================  =======  =========================================
``prefix_cache_queries_total``              counter  tokens asked by matches (readers + writer)
``prefix_cache_hits_total``                 counter  tokens of those found cached
``blocks{state=live|free|pinned}``          gauge    occupancy (pinned: protected from eviction)
``capacity_blocks``                         gauge    the segment's capacity
``inserted_blocks_total``                   counter  blocks inserted
``evicted_blocks_total``                    counter  blocks evicted by capacity (LRU)
``removed_blocks_total``                    counter  blocks removed, cleared or let go of
``owner_blocks{owner}``                     gauge    blocks each named owner holds
``events_total{source}``                    counter  KV events applied, per event source (owner)
``events_lost_total{source}``               counter  batches missed and not healed by replay
``events_skipped_total{source,reason}``     counter  blocks of events not applied, by reason
``event_lag_seconds{source}``               gauge    publish-to-applied time of the latest batch
``readers{state=alive|dead}``               gauge    registered readers (dead: not yet reaped)
``writer_up``                               gauge    1 while a live writer holds the segment
``daemon_request_seconds``                  histo    daemon only: time to apply one request
``published_batches_total``                 counter  daemon only: KV-event batches published
==========================================  =======  =========================================

Reader counters live in reader slots: a slot reaped after its reader died
starts again from 0, which Prometheus' ``rate`` reads as a counter reset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .dump import reader_slots
from .reader import Reader

if TYPE_CHECKING:
    from .daemon import Daemon

#: Buckets of ``daemon_request_seconds``: a round trip is tens of
#: microseconds; an insert that evicts or a replay can take milliseconds.
REQUEST_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1, 1.0)


class SegmentCollector:
    """A prometheus_client collector reading ``reader``'s segment at each
    scrape; ``published`` (optional) returns the batches a publisher sent."""

    def __init__(self, reader: Reader, published: Callable[[], int] | None = None) -> None:
        self.reader = reader
        self.published = published

    def collect(self) -> Iterator[Metric]:
        r = self.reader
        stats = r.stats()
        bs = stats["block_size"]
        slots = reader_slots(r)  # this scraper's own slot is no reader of interest: alive None
        queries = stats["writer_query_blocks"] + sum(row["query_blocks"] for row in slots)
        hits = stats["writer_hit_blocks"] + sum(row["hit_blocks"] for row in slots)
        alive = sum(row["alive"] is True for row in slots)
        dead = sum(row["alive"] is False for row in slots)
        yield CounterMetricFamily("shmcache_prefix_cache_queries", "Tokens asked by prefix matches", value=queries * bs)
        yield CounterMetricFamily("shmcache_prefix_cache_hits", "Tokens of prefix matches found cached", value=hits * bs)
        g = GaugeMetricFamily("shmcache_blocks", "Blocks by state", labels=["state"])
        for state, key in (("live", "live_blocks"), ("free", "free_blocks"), ("pinned", "pinned_blocks")):
            g.add_metric([state], stats[key])
        yield g
        yield GaugeMetricFamily("shmcache_capacity_blocks", "Blocks the segment holds", value=stats["capacity"])
        for name, key, doc in (("inserted_blocks", "inserted_blocks", "Blocks inserted"),
                               ("evicted_blocks", "evicted_blocks", "Blocks evicted by capacity (LRU)"),
                               ("removed_blocks", "removed_blocks", "Blocks removed, cleared or let go of")):
            yield CounterMetricFamily(f"shmcache_{name}", doc, value=stats[key])
        owners = r.owner_info()
        g = GaugeMetricFamily("shmcache_owner_blocks", "Blocks each named owner holds", labels=["owner"])
        for owner, info in owners.items():
            g.add_metric([owner], info["blocks"])
        yield g
        events = CounterMetricFamily("shmcache_events", "KV events applied", labels=["source"])
        lost = CounterMetricFamily("shmcache_events_lost", "KV-event batches missed and not healed", labels=["source"])
        skipped = CounterMetricFamily("shmcache_events_skipped", "Blocks of KV events not applied",
                                      labels=["source", "reason"])
        lag = GaugeMetricFamily("shmcache_event_lag_seconds", "Publish-to-applied time of the latest batch",
                                labels=["source"])
        for owner, info in owners.items():
            if info["kind"] != "events":
                continue
            events.add_metric([owner], info["events"])
            lost.add_metric([owner], info["lost_batches"])
            for reason, n in info["skipped"].items():
                skipped.add_metric([owner, reason], n)
            lag.add_metric([owner], info["lag_ns"] / 1e9)
        yield from (events, lost, skipped, lag)
        g = GaugeMetricFamily("shmcache_readers", "Registered readers", labels=["state"])
        g.add_metric(["alive"], alive)
        g.add_metric(["dead"], dead)
        yield g
        yield GaugeMetricFamily("shmcache_writer_up", "1 while a live writer holds the segment",
                                value=1 if stats["writer_alive"] else 0)
        if self.published is not None:
            yield CounterMetricFamily("shmcache_published_batches", "KV-event batches published",
                                      value=self.published())


class Metrics:
    """An HTTP endpoint serving a segment's metrics (``/metrics``), in a
    thread of this process. Owns a Reader of the segment until ``close``.
    ``daemon``: also its request histogram and published batches."""

    def __init__(self, name: str, port: int, addr: str = "0.0.0.0", daemon: "Daemon | None" = None) -> None:
        self.registry = CollectorRegistry()
        self.reader = Reader.attach(name)
        published = None
        if daemon is not None and daemon.publisher is not None:
            publisher = daemon.publisher
            published = lambda: publisher.published_batches  # noqa: E731
        self.registry.register(SegmentCollector(self.reader, published))
        self.request_seconds = None
        if daemon is not None:
            self.request_seconds = Histogram("shmcache_daemon_request_seconds", "Time to apply one daemon request",
                                             buckets=REQUEST_BUCKETS, registry=self.registry)
        try:
            self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        except OSError:
            self.reader.close()
            raise
        self.port = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self.reader.close()
