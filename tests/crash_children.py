"""The workload of the crash-at-every-step test: a fixed tree of prompts whose
block values are a function of their prefix, so any process can tell a right
answer from a wrong one without a log."""

from __future__ import annotations

import os

import numpy as np

BS = 4
CAPACITY = 24
# 24 distinct prefixes in all: the segment starts exactly full.
BASE = [(0, 0, 0, 0), (0, 0, 1, 1), (0, 1, 2, 0), (0, 2), (1, 1, 1, 1), (1, 2, 0, 2), (2, 0, 1, 0), (2, 2, 2, 2)]
NEW = (1, 0, 2, 1)  # 3 new blocks: inserting it must evict 3
REMOVED = (0, 0)  # its subtree holds 5 blocks
# Owner "a" holds every BASE block; "b" holds SHARED's, so releasing REMOVED
# from "a" drops only (0, 0, 1) and (0, 0, 1, 1): the rest "b" still holds.
SHARED = (0, 0, 0, 0)
PINNED = (2, 2, 2, 2)
UNPINNED = (1, 2, 0, 2)
EVICT = 4


def value(prefix: tuple) -> int:
    """The value of the block that ends ``prefix``: distinct for every prefix."""
    return sum((x + 1) * 4**i for i, x in enumerate(prefix))


def tokens(prompt: tuple) -> np.ndarray:
    return np.repeat(np.asarray(prompt, dtype=np.int64), BS)


def values(prompt: tuple) -> list[int]:
    return [value(prompt[: i + 1]) for i in range(len(prompt))]


def prefixes(prompts) -> set[tuple]:
    return {p[: i + 1] for p in prompts for i in range(len(p))}


def run_op(name: str, path: str, step: int) -> None:
    """In a fresh process: take the segment over and run ``path`` with the
    crash hook at ``step``. The hook SIGKILLs this process there; exit 0 means
    the operation completed before reaching that step."""
    from shmcache import Writer

    if path == "recovery":
        Writer.open(name, _crash_at_step=step).close()
        os._exit(0)
    w = Writer.open(name)
    pin = w.pin(tokens(UNPINNED)) if path == "unpin" else None  # taking the segment over dropped every writer pin
    w._crash_at_step(step)
    if path == "insert":
        w.insert(tokens(NEW), values(NEW))
    elif path == "remove":
        w.remove([value(REMOVED)])
    elif path == "evict":
        w.evict(EVICT)
    elif path == "pin":
        w.pin(tokens(PINNED))
    elif path == "unpin":
        w.unpin(pin)
    elif path == "clear":
        w.clear()
    elif path == "release":
        w.release(tokens(REMOVED), "a")
    w.close()
    os._exit(0)


def common(p: tuple, q: tuple) -> int:
    return next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q)))


def most_held(prompt: tuple) -> dict[str, int]:
    """The most tokens of ``prompt`` each owner can ever be credited with."""
    return {"a": BS * max(common(prompt, p) for p in BASE), "b": BS * common(prompt, SHARED)}


def checking_reader(name, stop, results) -> None:
    """Match every prompt of the workload until told to stop; count answers
    that are not a prefix of the prompt's true values, or that credit an
    owner with blocks it never held."""
    from shmcache import Reader

    r = Reader.attach(name)
    prompts = BASE + [NEW]
    matches = wrong = 0
    while not stop.is_set():
        for p in prompts:
            got = r.match_prefix(tokens(p)).values.tolist()
            held = r.match_owners(tokens(p))
            matches += 1
            wrong += got != values(p)[: len(got)]
            wrong += any(n > most_held(p).get(o, 0) for o, n in held.items())
    r.close()
    results.put((matches, wrong))
