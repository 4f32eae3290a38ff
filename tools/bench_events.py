"""Benchmark: KV events into one daemon, and the overlap query readers ask.

Three figures, in one run:

1. Ingest throughput: 4 publisher processes, each a stand-in for one
   data-parallel rank's vLLM publisher (XPUB with vLLM's frames and high-
   water mark), send pre-encoded batches as fast as they can, each batch
   the BlockStored of one new 32-block prompt (16 tokens a block): first
   N batches that only store (caches filling), then N that each also remove
   the oldest prompt's 32 blocks, as vLLM reports evictions (caches full). One ``shmcache serve --kv-events`` applies them.
   Baseline, same payloads in this process: a Python dict index (engine
   hash -> parent and owners), what a router written in Python keeps.
2. Publish-to-visible lag: this process publishes one new prompt as a
   fifth owner and polls ``match_owners`` until the daemon's write shows;
   when the ranks are idle, and while they publish PACED_BLOCKS_S blocks/s
   in all (a steady load below saturation: at saturation the lag is the
   queue's length, whatever the daemon does).
3. ``match_owners`` with 8 owners against ``match_prefix`` on the same
   2,048-token prompt (warm, interleaved calls).

    python tools/bench_events.py            # full run
    python tools/bench_events.py --quick    # smaller, for a smoke test
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_match import machine, percentiles  # noqa: E402

BS = 16
BLOCKS = 32
RANKS = 4
#: Blocks/s the ranks publish in all while lag is measured under load.
PACED_BLOCKS_S = 100_000


def payloads(rank: int, n: int, window: int) -> list[bytes]:
    """Rank ``rank``'s ``n`` batches, encoded as vLLM encodes them; from
    batch ``window`` on, each also removes the prompt ``window`` before it."""
    import msgspec

    enc = msgspec.msgpack.Encoder().encode
    out = []
    for i in range(n):
        base = (rank << 40) | (i << 8)
        toks = list(range(base % (1 << 31), base % (1 << 31) + BLOCKS * BS))
        events = [{"type": "BlockStored", "block_hashes": [base + j for j in range(BLOCKS)], "parent_block_hash": None,
                   "token_ids": toks, "block_size": BS, "lora_id": None, "medium": "GPU", "lora_name": None}]
        if i >= window:  # the engine evicts the oldest prompt, block by block, as vLLM reports it
            old = (rank << 40) | ((i - window) << 8)
            events.append({"type": "BlockRemoved", "block_hashes": [old + j for j in range(BLOCKS)], "medium": "GPU"})
        out.append(enc([time.time(), events, rank]))
    return out


def publisher(rank: int, n: int, paced: int, rate: float, port_q, gos, stop) -> None:
    """At ``gos[0]``, publish ``n`` store-only batches as fast as possible; at
    ``gos[1]``, ``n`` more, each also removing one of the first ``n``; at
    ``gos[2]``, up to ``paced`` more at ``rate`` batches/s until ``stop``."""
    import zmq

    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 100_000)  # vLLM's default high-water mark
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    batches = payloads(rank, 2 * n + paced, window=n)
    port_q.put((rank, port))
    while pub.recv()[:1] != b"\x01":  # the daemon subscribed
        pass
    port_q.put((rank, "subscribed"))
    for phase in range(2):
        gos[phase].wait()
        for seq in range(phase * n, (phase + 1) * n):
            pub.send_multipart([b"", seq.to_bytes(8, "big"), batches[seq]])
    gos[2].wait()
    t0 = time.monotonic()
    for seq in range(2 * n, 2 * n + paced):
        if stop.is_set():
            break
        pause = t0 + (seq - 2 * n) / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        pub.send_multipart([b"", seq.to_bytes(8, "big"), batches[seq]])
    stop.wait()
    pub.close(linger=1000)
    ctx.term()


def blast(r, daemon_pid: int, go, until: int) -> tuple[float, float, dict]:
    """Set ``go``, wait until every rank applied ``until`` batches; ``(seconds,
    daemon CPU seconds, owner info)``."""
    cpu0, t0 = _cpu_seconds(daemon_pid), time.perf_counter()
    go.set()
    while True:
        info = r.owner_info()
        if sum(info[f"rank{i}"]["batches"] for i in range(RANKS)) >= RANKS * until:
            return time.perf_counter() - t0, _cpu_seconds(daemon_pid) - cpu0, info
        time.sleep(0.005)


def baseline(all_payloads: list[list[bytes]]) -> float:
    """Blocks stored per second by a Python dict index fed the same batches."""
    import msgspec

    decode = msgspec.msgpack.Decoder().decode
    index: dict = {}
    blocks = 0
    t0 = time.perf_counter()
    for rank, batches in enumerate(all_payloads):
        for p in batches:
            for ev in decode(p)[1]:
                if ev["type"] == "BlockStored":
                    parent = ev["parent_block_hash"]
                    for h in ev["block_hashes"]:
                        entry = index.setdefault(h, [parent, set()])
                        entry[1].add(rank)
                        parent = h
                    blocks += len(ev["block_hashes"])
                else:
                    for h in ev["block_hashes"]:
                        entry = index.get(h)
                        if entry is not None:
                            entry[1].discard(rank)
    return blocks / (time.perf_counter() - t0)


def lag_samples(reader, pub, seq0: int, n: int, owner: str = "probe") -> list[int]:
    import msgspec

    enc = msgspec.msgpack.Encoder().encode
    out = []
    for i in range(seq0, seq0 + n):
        toks = np.arange(BLOCKS * BS, dtype=np.int64) + (7 << 28) + i * BLOCKS * BS
        ev = {"type": "BlockStored", "block_hashes": [(9 << 40) + i * BLOCKS + j for j in range(BLOCKS)],
              "parent_block_hash": None, "token_ids": toks.tolist(), "block_size": BS, "lora_id": None,
              "medium": "GPU", "lora_name": None}
        payload = enc([time.time(), [ev], None])
        t0 = time.monotonic_ns()
        pub.send_multipart([b"", i.to_bytes(8, "big"), payload])
        while reader.match_owners(toks).get(owner, 0) < BLOCKS * BS:
            pass
        out.append(time.monotonic_ns() - t0)
    return out


def overlap_query(quick: bool) -> tuple[tuple[float, float], tuple[float, float]]:
    from shmcache import Reader, Writer

    name = f"bench-owners-{uuid.uuid4().hex[:8]}"
    prompt = np.arange(2048, dtype=np.int64)
    with Writer.create(name, capacity=1024, block_size=BS) as w:
        for i in range(8):
            w.insert(prompt[: 256 * (i + 1)], np.arange(16 * (i + 1)) + 1000 * i, owner=f"rank{i}", client=i)
        with Reader.attach(name) as r:
            assert len(r.match_owners(prompt)) == 8
            clock = time.perf_counter_ns
            a, b = [], []
            for _ in range(20_000 if quick else 200_000):
                t = clock()
                r.match_prefix(prompt)
                a.append(clock() - t)
                t = clock()
                r.match_owners(prompt)
                b.append(clock() - t)
        w.close(unlink=True)
    return percentiles(a), percentiles(b)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches and samples")
    args = ap.parse_args()
    n = 500 if args.quick else 4000
    n_lag = 100 if args.quick else 1000
    print(f"machine: {machine()}")
    import zmq

    from shmcache import Reader

    (p50m, p99m), (p50o, p99o) = overlap_query(args.quick)
    print(f"\nmatch_owners (8 owners) vs match_prefix, 2,048 tokens, warm: "
          f"match_prefix p50 {p50m:.2f} us p99 {p99m:.2f} us; match_owners p50 {p50o:.2f} us p99 {p99o:.2f} us; "
          f"ratio p50 {p50o / p50m:.2f}x p99 {p99o / p99m:.2f}x")

    spawn = mp.get_context("spawn")
    port_q, gos, stop = spawn.Queue(), [spawn.Event() for _ in range(3)], spawn.Event()
    rate = PACED_BLOCKS_S / RANKS / BLOCKS  # batches/s per publisher
    paced = int(rate * 120)
    procs = [spawn.Process(target=publisher, args=(i, n, paced, rate, port_q, gos, stop)) for i in range(RANKS)]
    for p in procs:
        p.start()
    ports = dict(port_q.get(timeout=300) for _ in procs)
    ctx = zmq.Context()
    probe = ctx.socket(zmq.XPUB)
    probe_port = probe.bind_to_random_port("tcp://127.0.0.1")
    name = f"bench-events-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "shmcache.cli", "serve", name, "--capacity", str(2 * RANKS * n * BLOCKS),
           "--log-level", "warning", "--kv-events", f"probe=tcp://127.0.0.1:{probe_port}"]
    for rank, port in sorted(ports.items()):
        cmd += ["--kv-events", f"rank{rank}=tcp://127.0.0.1:{port}"]
    daemon = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout.readline().startswith("ready"), "the daemon did not start"
        for _ in procs:
            assert port_q.get(timeout=120)[1] == "subscribed"
        while probe.recv()[:1] != b"\x01":
            pass
        r = Reader.attach(name)
        idle = lag_samples(r, probe, 0, n_lag)
        grow = blast(r, daemon.pid, gos[0], n)
        steady = blast(r, daemon.pid, gos[1], 2 * n)
        lost = sum(steady[2][f"rank{i}"]["lost_batches"] for i in range(RANKS))
        gos[2].set()
        time.sleep(1.0)  # the paced load is running
        loaded = lag_samples(r, probe, n_lag, n_lag)
        stop.set()
        r.close()
    finally:
        stop.set()
        daemon.terminate()
        daemon.wait(60)
        for p in procs:
            p.join(60)
        probe.close()
        ctx.term()
    base = baseline([payloads(i, 2 * n, window=n) for i in range(RANKS)])
    print(f"\ningest, {RANKS} publishers x {n:,} batches of {BLOCKS} blocks, {lost} batches lost; "
          f"a Python dict index fed the same batches in-process (stores and removals): {base:,.0f} blocks stored/s")
    for label, (secs, cpu, _) in (("stores only (caches filling)", grow),
                                  ("each batch also removes 32 blocks (caches full)", steady)):
        rate = RANKS * n * BLOCKS / secs
        print(f"  {label}: {rate:,.0f} blocks stored/s, ratio to the dict index {rate / base:.2f}x; "
              f"the daemon used {cpu / secs:.0%} of a core")
    for label, s in (("idle", idle), (f"while the ranks publish {PACED_BLOCKS_S:,} blocks/s", loaded)):
        p50, p99 = np.percentile(np.asarray(s) / 1e6, [50, 99])
        print(f"publish-to-visible lag in match_owners, {label}: p50 {p50:.3f} ms p99 {p99:.3f} ms ({len(s)} samples)")


if __name__ == "__main__":
    main()
