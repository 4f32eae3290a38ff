"""A shmcache holder for tests/test_liveness.py, run in a PID namespace of its
own (``unshare --pid --fork --mount-proc``) or as a plain child.

``main("writer", NAME)`` creates segment NAME and holds it;
``main("reader", NAME)`` attaches and pins ``PROMPT``. Either prints
``ready`` once it holds what it holds, then answers commands read line by
line from stdin: ``pins`` (reader: its pinned entries and whether its
handle still says pinned), ``exit``. The tests start it with the shmcache
they imported first on ``sys.path`` (``test_liveness.CHILD``).
"""

from __future__ import annotations

import sys

import numpy as np

from shmcache import Reader, Writer

BS = 4
PROMPT = np.arange(32, dtype=np.int64)  # 8 blocks
VALUES = list(range(100, 108))


def main(role: str, name: str) -> None:
    if role == "writer":
        w = Writer.create(name, capacity=64, block_size=BS)
        w.insert(PROMPT, VALUES)
    else:
        r = Reader.attach(name)
        h = r.match_and_pin(PROMPT)
        assert h.length == len(PROMPT), h
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "pins":
            print(r.stats()["pinned_entries"], int(h.pinned), flush=True)
        elif cmd == "exit":
            return


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
