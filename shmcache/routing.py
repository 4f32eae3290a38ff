"""Cache-aware data-parallel routing, simulated on the bundled trace.

N simulated engine ranks each keep an exact-LRU KV cache of C blocks and
publish what it gains and loses as vLLM does (ZMQ PUB, vLLM's frames and
msgpack batches) to one ``shmcache serve --kv-events``; a router picks a
rank for every request of the trace. Policies:

* ``round-robin``: rank ``i mod N``.
* ``least-loaded``: the rank with the least queued prefill work.
* ``cache-aware``: the rank ``Reader.match_owners`` says holds the longest
  prefix of the prompt (ties: the least loaded), unless that rank's queue
  is more than ``IMBALANCE_S`` seconds longer than the shortest: then the
  least loaded, the load-balance guard the gateways use.

Load is simulated from the trace's arrival times: a rank prefills a
request's uncached tokens at ``PREFILL_TOKENS_S``, one request after
another; a request's time to first token is its wait in that queue plus its
prefill. The cache-aware router sees each engine's events before it routes the next
request (it waits for the daemon to apply them: in a real deployment
requests are far more than a millisecond apart). The other two read
nothing, so in their runs the ranks publish nothing: the daemon's work
would change none of their figures, and on a small machine it would take
the router's CPU.

The reference for hit rates is one exact-LRU cache of N x C blocks shared by
every request: what the ranks together could hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from .cli import serve_command
from .layout import O_NEXT_SEQ
from .replay import ExactLRU, block_names, dense_names, prompt_tokens, reference_hits

POLICIES = ("round-robin", "least-loaded", "cache-aware")
PREFILL_TOKENS_S = 20_000.0
IMBALANCE_S = 5.0


@dataclass
class Request:
    arrival_s: float
    input_length: int
    hash_ids: list[int]


def load_requests(limit: int | None = None) -> list[Request]:
    """The bundled trace's requests, in order."""
    text = resources.files("shmcache").joinpath("data/synthetic_trace.jsonl").read_text()
    out = []
    for line in text.splitlines():
        if line.strip():
            r = json.loads(line)
            out.append(Request(r["timestamp"] / 1000.0, int(r["input_length"]), [int(h) for h in r["hash_ids"]]))
            if limit is not None and len(out) == limit:
                break
    return out


def engine_hashes(req: Request, block_size: int) -> list[int]:
    """The engine's block hashes of a request's full blocks: each block's
    name in the reference model (``replay.block_names``: in a trace whose
    ids are prefixes, as the bundled one's are, it names a chained block
    exactly) through splitmix64's finaliser, a bijection of 64-bit words, so
    they are unique and spread as content hashes are."""
    return _hashes(block_names(req.input_length, req.hash_ids, block_size)).tolist()


def _hashes(names: np.ndarray) -> np.ndarray:
    """``engine_hashes`` of block names (int64), as uint64."""
    z = names.view(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Engine:
    """One rank: an exact-LRU KV cache of ``capacity`` blocks, and the
    publisher of its KV events. Blocks are named by their index in a run's
    table of block hashes (``clear``)."""

    def __init__(self, ctx, rank: int, capacity: int, block_size: int) -> None:
        import msgspec
        import zmq

        self.rank = rank
        self.block_size = block_size
        self.capacity = capacity
        self.lru = ExactLRU(capacity, 0)
        self.hashes = np.empty(0, np.uint64)
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.pub.bind_to_random_port('tcp://127.0.0.1')}"
        self.seq = 0
        self.busy_until = 0.0
        self.requests = 0
        self._encode = msgspec.msgpack.Encoder().encode

    def wait_subscribed(self, timeout: float = 60.0) -> None:
        while True:
            if not self.pub.poll(int(timeout * 1000)):
                raise RuntimeError(f"the daemon did not subscribe to rank {self.rank}")
            if self.pub.recv()[:1] == b"\x01":
                return

    def publish(self, events: list[dict]) -> int:
        seq, self.seq = self.seq, self.seq + 1
        self.pub.send_multipart([b"", seq.to_bytes(8, "big"), self._encode([time.time(), events, self.rank])])
        return seq

    def serve(self, req: Request, blocks: np.ndarray, tokens: np.ndarray | None, now: float,
              publish: bool = True) -> tuple[int, float, int | None]:
        """Run a request of ``blocks`` (indices into the hash table): ``(hit
        blocks, time to first token, seq of the batch that reports its KV or
        None if not ``publish``)``."""
        n, evicted = self.lru.serve(blocks)
        start = max(now, self.busy_until)
        self.busy_until = start + (req.input_length - n * self.block_size) / PREFILL_TOKENS_S
        self.requests += 1
        if not publish:
            return n, self.busy_until - now, None
        events: list[dict] = []
        if len(evicted):
            events.append({"type": "BlockRemoved", "block_hashes": self.hashes[evicted].tolist(), "medium": "GPU"})
        if n < len(blocks):
            bs = self.block_size
            stored = self.hashes[blocks[max(n - 1, 0):]].tolist()
            events.append({"type": "BlockStored", "block_hashes": stored[1:] if n else stored,
                           "parent_block_hash": stored[0] if n else None,
                           "token_ids": tokens[n * bs : len(blocks) * bs].tolist(), "block_size": bs, "lora_id": None,
                           "medium": "GPU", "lora_name": None})
        return n, self.busy_until - now, self.publish(events)

    def clear(self, hashes: np.ndarray) -> int:
        """Empty the cache, for a run whose blocks have these hashes."""
        self.lru = ExactLRU(self.capacity, len(hashes))
        self.hashes = hashes
        self.busy_until = 0.0
        self.requests = 0
        return self.publish([{"type": "AllBlocksCleared"}])

    def close(self) -> None:
        self.pub.close()


@dataclass
class PolicyResult:
    policy: str
    hit_tokens: int = 0
    prompt_tokens: int = 0
    requests_per_rank: list[int] = field(default_factory=list)
    decision_ns: list[int] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    hits: list[float] = field(default_factory=list)  # per request, its token hit rate

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class Simulation:
    """Ranks, one daemon subscribed to them, and a router's Reader."""

    def __init__(self, ranks: int, capacity: int, block_size: int = 16, name: str | None = None) -> None:
        import zmq

        from . import owners

        self.block_size = block_size
        self.name = name or f"route-{uuid.uuid4().hex[:8]}"
        self.ctx = zmq.Context()
        self.engines = [Engine(self.ctx, i, capacity, block_size) for i in range(ranks)]
        self._blocks: tuple[list[Request], list[np.ndarray], np.ndarray] | None = None
        cmd = serve_command(self.name, "--capacity", str(2 * ranks * capacity), "--block-size", str(block_size),
                            "--log-level", "warning")
        for e in self.engines:
            cmd += ["--kv-events", f"rank{e.rank}={e.endpoint}"]
        self.daemon = subprocess.Popen(cmd, stdout=subprocess.PIPE, bufsize=0)
        try:
            from .demo import wait_ready
            from .reader import Reader

            wait_ready(self.daemon)
            for e in self.engines:
                e.wait_subscribed()
            self.reader = Reader.attach(self.name)
            table = owners.snapshot(self.reader._data, self.reader._geom)
            self._next_seq = [owners.entry_words(self.reader._data, self.reader._geom, table.find(f"rank{e.rank}"))
                              for e in self.engines]
        except BaseException:
            self.close()
            raise

    def applied(self, rank: int, seq: int, timeout: float = 60.0) -> None:
        """Wait until the daemon applied rank ``rank``'s batch ``seq``."""
        words, deadline = self._next_seq[rank], time.monotonic() + timeout
        while int(words[O_NEXT_SEQ]) <= seq:
            os.sched_yield()  # on a small machine the daemon needs this core
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {rank}'s batch {seq} was not applied within {timeout:.0f} s")

    def blocks(self, requests: list[Request]) -> tuple[list[np.ndarray], np.ndarray]:
        """Each request's full blocks as indices into a table of their
        engine hashes, and that table: what the ranks' caches hold. Computed
        once for the list ``run`` was last given."""
        if self._blocks is None or self._blocks[0] is not requests:
            blocks, names = dense_names([(r.input_length, r.hash_ids) for r in requests], self.block_size)
            self._blocks = (requests, blocks, _hashes(names))
        return self._blocks[1], self._blocks[2]

    def run(self, requests: list[Request], policy: str, progress=None) -> PolicyResult:
        blocks, hashes = self.blocks(requests)
        for e in self.engines:
            self.applied(e.rank, e.clear(hashes))
        res = PolicyResult(policy)
        clock = time.perf_counter_ns
        bs, n_ranks = self.block_size, len(self.engines)
        names = [f"rank{e.rank}" for e in self.engines]
        reads = policy == "cache-aware"  # only this router reads the segment
        last = None  # (rank, seq) of the batch reporting the previous request's KV
        for i, req in enumerate(requests):
            tokens = prompt_tokens(req.input_length, req.hash_ids)[: len(blocks[i]) * bs] if reads else None
            if last is not None:  # the router sees it before it routes this request, made meanwhile
                self.applied(*last)
            now = req.arrival_s
            t0 = clock()
            loads = [max(e.busy_until - now, 0.0) for e in self.engines]
            if policy == "round-robin":
                pick = i % n_ranks
            elif policy == "least-loaded":
                pick = min(range(n_ranks), key=loads.__getitem__)
            else:
                held = self.reader.match_owners(tokens)
                least = min(loads)
                pick = max(range(n_ranks), key=lambda r: (held.get(names[r], 0), -loads[r]))
                if loads[pick] - least > IMBALANCE_S:
                    pick = loads.index(least)
            res.decision_ns.append(clock() - t0)
            hit, ttft, seq = self.engines[pick].serve(req, blocks[i], tokens, now, publish=reads)
            last = (pick, seq) if seq is not None else None
            res.hit_tokens += hit * bs
            res.prompt_tokens += len(blocks[i]) * bs
            res.hits.append(hit / len(blocks[i]) if len(blocks[i]) else 0.0)
            res.ttft_s.append(ttft)
            if progress is not None:
                progress(i + 1)
        for e in self.engines:
            self.applied(e.rank, e.seq - 1)
        res.requests_per_rank = [e.requests for e in self.engines]
        return res

    def close(self) -> None:
        if getattr(self, "reader", None) is not None:
            self.reader.close()
        if self.daemon.poll() is None:
            self.daemon.terminate()
        self.daemon.wait(60)
        for e in self.engines:
            e.close()
        self.ctx.term()


def shared_cache_hit_rate(requests: list[Request], capacity: int, block_size: int = 16) -> float:
    """Token hit rate of one exact-LRU cache of ``capacity`` blocks serving every request."""
    trace = [(r.input_length, r.hash_ids) for r in requests]
    hits = reference_hits(trace, block_size, capacity)
    total = sum((r.input_length // block_size) * block_size for r in requests)
    return sum(hits) / total if total else 0.0


def table(results: list[PolicyResult], shared: float) -> str:
    """The comparison, as a Markdown table."""
    rows = ["| policy | token hit rate | of the shared cache's | requests per rank, max / mean | mean TTFT | "
            "router decision p50 / p99 |", "|---|---|---|---|---|---|"]
    for r in results:
        counts = np.asarray(r.requests_per_rank)
        p50, p99 = np.percentile(np.asarray(r.decision_ns) / 1e3, [50, 99])
        rows.append(f"| {r.policy} | {r.hit_rate:.1%} | {r.hit_rate / shared:.0%} | {counts.max() / counts.mean():.2f} | "
                    f"{np.mean(r.ttft_s):.2f} s | {p50:.1f} / {p99:.1f} µs |")
    return "\n".join(rows)
