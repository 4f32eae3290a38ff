"""Measure what a fresh environment (empty Numba cache) pays before its first
answer, step by step and kernel by kernel (issue 14, target 5).

    python tools/compile_times.py            # reader, writer, serve, compile
    python tools/compile_times.py --demo     # and a whole first `shmcache demo`

A segment is made by this process (its own cache). Then a child process with
an empty ``NUMBA_CACHE_DIR`` times, one after another: ``import shmcache``,
``Reader.attach``, the first ``match_prefix`` of an int64 array, an int32
array and a list, the first ``match_owners``, then ``Writer.open`` (after this
process let go) and the writer's warm-up. Every ``Dispatcher.compile``
call in the child is timed too (a kernel's time includes the kernels it
calls that compile with it), so the table says which kernels cost what.
Then, each with an empty cache of its own: ``shmcache serve`` until its
``ready`` line, ``shmcache compile``, and (``--demo``) ``shmcache demo``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_match import machine  # noqa: E402

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from numba.core import dispatcher
compiles = []
_orig = dispatcher.Dispatcher.compile
def timed(self, sig):
    t = time.perf_counter()
    try:
        return _orig(self, sig)
    finally:
        compiles.append((self.py_func.__module__ + "." + self.py_func.__qualname__, str(sig), time.perf_counter() - t))
dispatcher.Dispatcher.compile = timed
steps = []
def step(label, fn):
    t = time.perf_counter(); out = fn(); steps.append((label, time.perf_counter() - t)); return out
import numpy as np
shmcache = step("import shmcache", lambda: __import__("shmcache"))
name = sys.argv[1]
r = step("Reader.attach", lambda: shmcache.Reader.attach(name))
prompt = np.arange(64, dtype=np.int64)
step("first match_prefix, int64 array", lambda: r.match_prefix(prompt))
step("first match_prefix, int32 array", lambda: r.match_prefix(prompt.astype(np.int32)))
step("first match_prefix, list", lambda: r.match_prefix(prompt.tolist()))
step("first match_owners, int64 array", lambda: r.match_owners(prompt))
r.close()
sys.stdout.write("READY\n"); sys.stdout.flush(); sys.stdin.readline()
w = step("Writer.open", lambda: shmcache.Writer.open(name))
w.close()
from shmcache.warmup import warm_writer
step("writer warm-up (every writer kernel)", lambda: warm_writer(16))
print(json.dumps({"steps": steps, "compiles": compiles}))
"""


def main() -> None:
    import argparse

    from shmcache import Writer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", action="store_true", help="also time a whole first `shmcache demo`")
    demo = ap.parse_args().demo

    print(f"machine: {machine()}")
    name = f"compile-times-{uuid.uuid4().hex[:8]}"
    w = Writer.create(name, capacity=1024, block_size=16)
    try:
        w.insert(list(range(64)), [1, 2, 3, 4], owner="rank0")
        with tempfile.TemporaryDirectory() as cache:
            env = fresh_env(cache)
            child = subprocess.Popen([sys.executable, "-c", CHILD, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
            assert child.stdout.readline().strip() == "READY"
            w.close()
            child.stdin.write("\n")
            child.stdin.flush()
            out = json.loads(child.stdout.read().strip().splitlines()[-1])
            child.wait(60)
    finally:
        w.close()
        import shmcache

        shmcache.unlink(name)
    print("\nstep (empty Numba cache)                      seconds")
    for label, secs in out["steps"]:
        print(f"  {label:<44s} {secs:8.2f}")
    print("\nkernels compiled, slowest first (a kernel's time includes what compiled inside it)")
    for fn, sig, secs in sorted(out["compiles"], key=lambda c: -c[2])[:40]:
        print(f"  {secs:7.2f} s  {fn}{sig[:90]}")
    print(f"  ... {len(out['compiles'])} compiles in all, {sum(c[2] for c in out['compiles']):.1f} s summed (nested time counted more than once)")
    print("\ncommand (each with an empty Numba cache)      seconds")
    print(f"  {'shmcache serve, until ready':<44s} {time_serve():8.2f}")
    print(f"  {'shmcache compile':<44s} {time_command(['compile']):8.2f}")
    if demo:
        print(f"  {'shmcache demo':<44s} {time_command(['demo']):8.2f}")


def fresh_env(cache: str) -> dict[str, str]:
    return dict(os.environ, NUMBA_CACHE_DIR=cache)


def time_serve() -> float:
    """Seconds from starting ``shmcache serve`` to its ``ready`` line."""
    name = f"compile-times-serve-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "shmcache.cli", "serve", name, "--capacity", "100000"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=fresh_env(cache))
        try:
            line = proc.stdout.readline()
            took = time.perf_counter() - t
            if not line.startswith("ready"):
                raise RuntimeError(f"shmcache serve did not get ready: {line!r}")
        finally:
            proc.terminate()
            proc.wait(60)
    return took


def time_command(args: list[str]) -> float:
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "shmcache.cli", *args], check=True, stdout=subprocess.DEVNULL,
                       env=fresh_env(cache))
        return time.perf_counter() - t


if __name__ == "__main__":
    main()
