"""Replay a request trace through a Writer and a Reader process, beside an exact-LRU model.

The trace is the Mooncake FAST'25 synthetic trace (Apache-2.0, bundled as
``shmcache/data/synthetic_trace.jsonl``): each request lists ``hash_ids`` of
512-token blocks, equal ids meaning a shared prefix; the last block is
partial. Tokens are generated deterministically from each id, so every run
and every process sees the same prompts.

For each request, in order, the reader process matches the prompt (that is
the hit) and then the writer inserts it, as a serving engine does after
prefill. The reference is a plain-Python exact LRU over the same 16-token
blocks: leading cached blocks are the hit, every block of the request is
touched deepest first (so a prefix outlives its extensions), and the least
recently used block goes first when full.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Callable

import numpy as np

from .errors import InvalidInputError

TRACE_BLOCK = 512
VOCAB = 128_000


def load_trace(path: str | None = None, limit: int | None = None) -> list[tuple[int, list[int]]]:
    """``(input_length, hash_ids)`` per request; the bundled trace by default."""
    if path is None:
        text = resources.files("shmcache").joinpath("data/synthetic_trace.jsonl").read_text()
    else:
        with open(path) as f:
            text = f.read()
    out = []
    for line in text.splitlines():
        if line.strip():
            r = json.loads(line)
            out.append((int(r["input_length"]), [int(h) for h in r["hash_ids"]]))
            if limit is not None and len(out) == limit:
                break
    return out


def prompt_tokens(input_length: int, hash_ids: list[int]) -> np.ndarray:
    """A request's prompt: the 512 token ids of each of its trace blocks (a
    fixed mix of the block's id and the position), cut to ``input_length``.
    One NumPy pass over the whole prompt: a routing or replay run calls it
    for every request."""
    ids = np.asarray(hash_ids, dtype=np.uint64).reshape(-1, 1)
    x = ((ids << np.uint64(9)) | np.arange(TRACE_BLOCK, dtype=np.uint64)).ravel()[:input_length]
    x = (x ^ (x >> np.uint64(31))) * np.uint64(0x9E3779B97F4A7C15)
    return ((x >> np.uint64(33)) % np.uint64(VOCAB)).astype(np.int64)


def block_names(input_length: int, hash_ids: list[int], block_size: int) -> np.ndarray:
    """Identity of each full ``block_size`` block of a request, for the
    reference model: ``trace id * (512 // block_size) + offset`` (int64).

    In a trace such as Mooncake's, equal trace ids mean equal prefixes, so
    (trace block id, offset) names a chained block exactly. Raises
    InvalidInputError for a block size outside [1, 512] or an id too large
    for the name to fit in 64 bits.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= TRACE_BLOCK:
        raise InvalidInputError(f"the block size of a trace replay must be an int in [1, {TRACE_BLOCK}], got {block_size!r}")
    per = TRACE_BLOCK // block_size
    limit = (1 << 63) // per - 1
    try:
        ids = np.asarray(hash_ids, dtype=np.int64)
    except (OverflowError, ValueError, TypeError):
        ids = None
    if ids is None or ids.ndim != 1 or (ids.size and (ids.max() > limit or ids.min() < -limit)):
        raise InvalidInputError(f"a trace's hash_ids must be integers within +-{limit:,} (for {block_size}-token "
                                f"blocks), got {str(hash_ids)[:80]}")
    j = np.arange(input_length // block_size)
    return ids[j // per] * per + j % per


def unique_blocks(trace, block_size: int) -> int:
    """Distinct full blocks in ``trace``."""
    if not trace:
        return 0
    # A stable sort (timsort: each request's keys come in runs) is several
    # times faster here than np.unique's.
    keys = np.sort(np.concatenate([block_names(length, ids, block_size) for length, ids in trace]), kind="stable")
    return int(np.count_nonzero(keys[1:] != keys[:-1])) + min(len(keys), 1)


def dense_names(trace, block_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Each request's full blocks as indices into the trace's distinct block
    names (``block_names``), and those names, sorted: ``(per request, names)``.
    ``ExactLRU`` holds blocks by such an index."""
    per_request = [block_names(length, ids, block_size) for length, ids in trace]
    if not per_request:
        return [], np.empty(0, np.int64)
    names, index = np.unique(np.concatenate(per_request), return_inverse=True)
    return np.split(index, np.cumsum([len(a) for a in per_request[:-1]])), names


class ExactLRU:
    """An exact-LRU cache of ``capacity`` blocks named by ints in
    ``[0, universe)`` (``dense_names``), used a request at a time as a serving
    engine uses its KV cache: the leading cached blocks are the hit, then
    every block of the request is touched deepest first (so a prefix outlives
    its extensions), then the least recently used blocks go until it fits.

    Every touch appends the block to a log and stamps the block with its log
    position; a log entry is current while its block's stamp still points at
    it, so the log's current entries are the blocks held, least recently used
    first, and eviction walks it from its head. When the log is full it keeps
    only its current entries (restamped), so it stays within a small multiple
    of the blocks held. Each request costs a few NumPy calls over its own
    blocks: the demo's routing part touches millions of blocks."""

    def __init__(self, capacity: int, universe: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 0:
            raise InvalidInputError(f"an LRU's capacity must be a non-negative int, got {capacity!r}")
        self.capacity = int(capacity)
        self._stamp = np.zeros(universe, np.int64)  # a held block's log position + 1, else 0
        self._log = np.empty(1024, np.int64)
        self._head = self._tail = 0  # log[head:tail] holds every current entry
        self._held = 0

    def __contains__(self, block: int) -> bool:
        return 0 <= block < len(self._stamp) and bool(self._stamp[block])

    def __len__(self) -> int:
        return self._held

    def __iter__(self):
        """The blocks held, least recently used first."""
        return iter(self._log[self._head:self._tail][self._current(self._head, self._tail)].tolist())

    def _current(self, start: int, end: int) -> np.ndarray:
        """Which of ``log[start:end]`` are current (a bool mask)."""
        return self._stamp[self._log[start:end]] == np.arange(start + 1, end + 1)

    def _append(self, blocks: np.ndarray) -> int:
        """Append ``blocks`` to the log; returns the stamp of the first."""
        n = len(blocks)
        if self._tail + n > len(self._log):
            held = self._log[self._head:self._tail][self._current(self._head, self._tail)]
            log = np.empty(max(2 * (len(held) + n), len(self._log)), np.int64)
            log[:len(held)] = held
            self._stamp[held] = np.arange(1, len(held) + 1)
            self._log, self._head, self._tail = log, 0, len(held)
        self._log[self._tail:self._tail + n] = blocks
        self._tail += n
        return self._tail - n + 1

    def serve(self, blocks: np.ndarray) -> tuple[int, np.ndarray]:
        """Serve a request of ``blocks`` (indices in prompt order); returns
        ``(the leading blocks that were cached, the blocks evicted, oldest
        first)``."""
        blocks = np.asarray(blocks, dtype=np.int64)
        missing = np.flatnonzero(self._stamp[blocks] == 0)
        hit = int(missing[0]) if len(missing) else len(blocks)
        deepest_first = blocks[::-1]
        first = self._append(deepest_first)
        stamps = np.arange(first, first + len(blocks))
        # A block named twice (a trace whose ids are not prefixes) keeps its
        # last touch, its shallowest: the largest stamp.
        np.maximum.at(self._stamp, deepest_first, stamps)
        new = len(blocks) - 1 - missing[::-1]  # the missing blocks' places in deepest_first
        self._held += int(np.count_nonzero(self._stamp[deepest_first[new]] == stamps[new]))
        return hit, self._evict(self._held - self.capacity)

    def _evict(self, count: int) -> np.ndarray:
        """Drop the ``count`` least recently used blocks; returns them."""
        out = []
        while count > 0:
            end = min(self._tail, self._head + max(2 * count, 4096))
            at = np.flatnonzero(self._current(self._head, end))[:count]
            gone = self._log[self._head + at]
            self._stamp[gone] = 0
            out.append(gone)
            count -= len(gone)
            self._held -= len(gone)
            self._head = self._head + int(at[-1]) + 1 if count == 0 else end
        return np.concatenate(out) if out else np.empty(0, np.int64)


def reference_hits(trace, block_size: int, capacity: int) -> list[int]:
    """Hit tokens per request under exact LRU of ``capacity`` blocks."""
    blocks, names = dense_names(trace, block_size)
    lru = ExactLRU(capacity, len(names))
    return [lru.serve(b)[0] * block_size for b in blocks]


def dict_index(toks: list[int], n_blocks: int, block_size: int) -> dict:
    """A vLLM-style index holding the first ``n_blocks`` blocks of a prompt:
    ``hash((parent, tuple(block)))`` chained, to its block number."""
    table, parent = {}, None
    for b in range(n_blocks):
        parent = hash((parent, tuple(toks[b * block_size : (b + 1) * block_size])))
        table[parent] = b
    return table


def dict_match(table: dict, toks: list[int], block_size: int) -> int:
    """What a vLLM-style dict index does to find a prompt's cached prefix:
    hash block after block and look each up, until the first miss. Returns
    the matched block count."""
    parent, n = None, 0
    for n in range(len(toks) // block_size):
        parent = hash((parent, tuple(toks[n * block_size : (n + 1) * block_size])))
        if parent not in table:
            return n
    return len(toks) // block_size


def _reader(name: str, trace, conn) -> None:
    """Match each request sent; answer ``(hit tokens, match ns, dict ns)``,
    the last the time a dict index holding exactly the matched blocks takes
    to give the same answer (built before it is timed)."""
    from shmcache import Reader

    r = Reader.attach(name)
    clock = time.perf_counter_ns
    while True:
        i = conn.recv()
        if i < 0:
            break
        toks = prompt_tokens(*trace[i])
        t0 = clock()
        m = r.match_prefix(toks)
        ns = clock() - t0
        as_list = toks.tolist()
        table = dict_index(as_list, len(m.values), r.block_size)
        t0 = clock()
        found = dict_match(table, as_list, r.block_size)
        dict_ns = clock() - t0
        assert found == len(m.values)
        conn.send((m.length, ns, dict_ns))
    r.close()


@dataclass
class ReplayResult:
    capacity: int
    requests: int
    prompt_tokens: int
    hit_tokens: int
    reference_hit_tokens: int
    match_p50_us: float
    match_p99_us: float
    dict_p50_us: float
    dict_p99_us: float
    matched_blocks: tuple[float, float, float, float]  # per request: mean, p50, p90, max
    inserted_blocks: int
    insert_seconds: float
    evicted_blocks: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens

    @property
    def reference_hit_rate(self) -> float:
        return self.reference_hit_tokens / self.prompt_tokens

    @property
    def insert_blocks_per_s(self) -> float:
        return self.inserted_blocks / self.insert_seconds if self.insert_seconds else 0.0


def replay(
    trace,
    capacity: int,
    block_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Replay ``trace`` through a fresh segment of ``capacity`` blocks (writer
    here, reader in a spawned process) and through the reference LRU."""
    from shmcache import Writer

    name = f"replay-{uuid.uuid4().hex[:10]}"
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    evicted = [0]
    w = Writer.create(name, capacity=capacity, block_size=block_size,
                      on_evict=lambda v: evicted.__setitem__(0, evicted[0] + len(v)))
    reader = ctx.Process(target=_reader, args=(name, trace, there), daemon=True)
    try:
        reader.start()
        hits, latencies, dict_latencies = [], [], []
        next_value = 0
        inserted = 0
        insert_ns = 0
        for i, (length, ids) in enumerate(trace):
            here.send(i)
            hit, ns, dict_ns = here.recv()
            hits.append(hit)
            latencies.append(ns)
            dict_latencies.append(dict_ns)
            toks = prompt_tokens(length, ids)
            n = len(toks) // block_size
            t0 = time.perf_counter_ns()
            cached = w.insert(toks, np.arange(next_value, next_value + n))
            insert_ns += time.perf_counter_ns() - t0
            inserted += n - cached // block_size
            next_value += n
            if progress is not None:
                progress(i + 1, len(trace))
        here.send(-1)
        reader.join(60)
    finally:
        if reader.is_alive():
            reader.kill()
            reader.join()
        w.close(unlink=True)
    ref = reference_hits(trace, block_size, capacity)
    lat = np.asarray(latencies, dtype=np.float64) / 1e3
    dict_lat = np.asarray(dict_latencies, dtype=np.float64) / 1e3
    matched = np.asarray(hits, dtype=np.float64) / block_size
    return ReplayResult(
        capacity=capacity,
        requests=len(trace),
        prompt_tokens=sum(length for length, _ in trace),
        hit_tokens=sum(hits),
        reference_hit_tokens=sum(ref),
        match_p50_us=float(np.percentile(lat, 50)),
        match_p99_us=float(np.percentile(lat, 99)),
        dict_p50_us=float(np.percentile(dict_lat, 50)),
        dict_p99_us=float(np.percentile(dict_lat, 99)),
        matched_blocks=(float(matched.mean()), float(np.percentile(matched, 50)), float(np.percentile(matched, 90)),
                        float(matched.max())),
        inserted_blocks=inserted,
        insert_seconds=insert_ns / 1e9,
        evicted_blocks=evicted[0],
    )


def format_results(results: list[ReplayResult]) -> str:
    """The comparison table the replay tool and the demo print."""
    head = (f"{'capacity':>10s} {'requests':>8s} {'hit rate':>9s} {'LRU ref':>8s} {'ratio':>6s} "
            f"{'match p50':>10s} {'p99':>8s} {'insert blk/s':>13s} {'evicted':>9s}")
    lines = [head]
    for r in results:
        ratio = r.hit_rate / r.reference_hit_rate if r.reference_hit_rate else 1.0
        lines.append(
            f"{r.capacity:>10,d} {r.requests:>8,d} {r.hit_rate:>8.2%} {r.reference_hit_rate:>8.2%} {ratio:>6.3f} "
            f"{r.match_p50_us:>8.1f}µs {r.match_p99_us:>6.1f}µs {r.insert_blocks_per_s:>13,.0f} {r.evicted_blocks:>9,d}"
        )
    lines.append("\nper request, in the reader process: blocks matched, and a vLLM-style dict index holding exactly "
                 "those blocks giving the same answer")
    lines.append(f"{'capacity':>10s} {'matched mean':>12s} {'p50':>5s} {'p90':>5s} {'max':>5s} "
                 f"{'dict p50':>10s} {'p99':>8s} {'dict/shmcache p50':>18s} {'p99':>6s}")
    for r in results:
        mean, p50, p90, top = r.matched_blocks
        lines.append(f"{r.capacity:>10,d} {mean:>12.1f} {p50:>5.0f} {p90:>5.0f} {top:>5.0f} {r.dict_p50_us:>8.1f}µs "
                     f"{r.dict_p99_us:>6.1f}µs {r.dict_p50_us / r.match_p50_us:>17.2f}x "
                     f"{r.dict_p99_us / r.match_p99_us:>5.2f}x")
    return "\n".join(lines)
