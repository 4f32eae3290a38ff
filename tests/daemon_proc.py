"""Run ``shmcache serve`` as a real child process for tests, and client workers."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

import numpy as np


class Served:
    """A ``shmcache serve`` subprocess; ``ready`` is its ready line."""

    def __init__(self, name: str, capacity: int, *extra: str, block_size: int = 4) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shmcache.cli", "serve", name, "--capacity", str(capacity),
             "--block-size", str(block_size), "--log-level", "warning", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.ready = self._line(600)

    def _line(self, timeout: float) -> str:
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not readable:
            self.kill()
            raise AssertionError("shmcache serve printed no ready line")
        return self.proc.stdout.readline().strip()

    def stop(self) -> int:
        """SIGTERM, wait, return the exit code."""
        os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(60)


def two_blocks(producer: int, i: int) -> np.ndarray:
    """A prompt of two full blocks (block size 4) unique to (producer, i)."""
    return np.repeat(np.array([1_000_000 * (producer + 1) + 2 * i, 1_000_000 * (producer + 1) + 2 * i + 1]), 4)


def producer(name, index, n_prompts, go, done, drain, release, results):
    """Insert ``n_prompts`` unique prompts through a Client, collecting evictions.

    After every producer is done, one round trip to the daemon guarantees
    every eviction pushed before it has arrived (one ordered stream).
    """
    from shmcache import Client

    c = Client.connect(name)
    inserted, evicted = [], []
    go.wait(300)
    for i in range(n_prompts):
        values = expected_values(index, i)
        c.insert(two_blocks(index, i), values)
        inserted += values
        evicted += c.poll_evicted().tolist()
    done.set()
    drain.wait(300)
    c.remove([])
    evicted += c.poll_evicted().tolist()
    results.put((index, c.client_id, inserted, evicted))
    release.wait(300)
    c.close()


def expected_values(producer: int, i: int) -> list[int]:
    """The values producer ``producer`` gives the two blocks of its prompt ``i``."""
    return [10_000_000 * (producer + 1) + 2 * i, 10_000_000 * (producer + 1) + 2 * i + 1]


def checking_reader(name, n_producers, n_prompts, matching, stop, results):
    """Match the producers' prompts while they insert; every answer must be a
    prefix of that prompt's true values (the reference)."""
    from shmcache import Reader

    r = Reader.attach(name)
    rng = np.random.default_rng(os.getpid())
    matches = hits = wrong = 0
    while not stop.is_set():
        if matches == 100:
            matching.set()
        p, i = int(rng.integers(n_producers)), int(rng.integers(n_prompts))
        got = r.match_prefix(two_blocks(p, i)).values.tolist()
        matches += 1
        hits += bool(got)
        wrong += got != expected_values(p, i)[: len(got)]
    r.close()
    results.put((matches, hits, wrong))
