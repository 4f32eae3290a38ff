"""The ``shmcache`` command.

* ``shmcache serve NAME --capacity N``: the writer daemon, in the foreground
  (logs to stderr, one ``ready ...`` line on stdout, clean exit on SIGTERM or
  SIGINT; exit 1 with one line on stderr when it cannot start). With
  ``--kv-events OWNER=ENDPOINT`` it also ingests engines' KV events.
* ``shmcache demo``: a daemon and worker processes replaying the bundled
  Mooncake trace, with a live progress line, a summary and the dump; then
  cache-aware routing of the same trace over 4 simulated ranks' KV events.
* ``shmcache compile``: compile every kernel into Numba's on-disk cache
  ahead of time (a container image build), so that no process of the image
  waits on the compiler.
* ``shmcache dump NAME``: inspect a live segment read-only (``--json`` for
  scripts, ``--check`` to verify every invariant; exit 1 if one fails).
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import ShmCacheError


def serve(args: argparse.Namespace) -> int:
    import logging

    from .daemon import Daemon

    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        sources, topic = [], None
        if args.kv_events or args.kv_events_replay or args.kv_events_config:
            from .ingest import sources_from

            sources, topic = sources_from(args.kv_events, args.kv_events_replay, args.kv_events_config)
        daemon = Daemon(
            args.name,
            args.capacity,
            args.block_size,
            sock_path=args.socket,
            allow_uids=tuple(args.allow_uid),
            keep_on_disconnect=args.on_disconnect == "keep",
            unlink_on_exit=not args.keep,
            kv_events=sources,
            kv_events_topic=args.kv_events_topic if args.kv_events_topic is not None else topic or "",
            **({} if args.spin_us is None else {"spin_us": args.spin_us}),
        )
    except (ShmCacheError, OSError) as e:
        print(f"shmcache serve: cannot start: {e}", file=sys.stderr)
        return 1
    daemon.run(ready=lambda line: print(line, flush=True))
    return 0


def demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(workers=args.workers, requests=args.requests, capacity_fraction=args.capacity, block_size=args.block_size,
               routing=not args.no_routing)


def compile_kernels(args: argparse.Namespace) -> int:
    from .jitcache import cache_dir
    from .warmup import compile_all

    where = cache_dir()
    if where is None:
        print("shmcache compile: Numba's on-disk cache is off here (NUMBA_DISABLE_JIT, or no writable "
              "cache directory): set NUMBA_CACHE_DIR to a directory this user can write", file=sys.stderr)
        return 1
    total = compile_all(args.block_size or (16,), lambda step, secs: print(f"{secs:7.1f} s  {step}", flush=True))
    print(f"{total:7.1f} s  in all; kernels cached in {where}")
    return 0


def dump(args: argparse.Namespace) -> int:
    from .dump import describe, render
    from .reader import Reader

    with Reader.attach(args.name) as r:
        info = describe(r, depth=args.depth if args.tree else 0, width=args.width, check=args.check)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 1 if info.get("violations") else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="shmcache", description="Node-local prefix-cache index in shared memory.")
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser("serve", help="run the writer daemon in the foreground")
    v.add_argument("name")
    v.add_argument("--capacity", type=int, required=True, help="blocks the segment holds")
    v.add_argument("--block-size", type=int, default=16)
    v.add_argument("--socket", help="Unix socket path (default /dev/shm/shmcache.NAME.sock)")
    v.add_argument("--allow-uid", type=int, action="append", default=[], help="also accept clients of this uid")
    v.add_argument("--on-disconnect", choices=("remove", "keep"), default="remove",
                   help="what happens to a client's blocks when it disconnects or dies")
    v.add_argument("--keep", action="store_true", help="leave the segment in place on exit")
    v.add_argument("--spin-us", type=int,
                   help="microseconds to poll for requests before sleeping (default 200; 0: sleep at once)")
    v.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    v.add_argument("--kv-events", action="append", default=[], metavar="OWNER=ENDPOINT",
                   help="subscribe to an engine's KV-event publisher (vLLM, SGLang) and attribute its blocks to OWNER; "
                        "repeat per data-parallel rank")
    v.add_argument("--kv-events-replay", action="append", default=[], metavar="OWNER=ENDPOINT",
                   help="that publisher's replay socket: missed batches are fetched from it")
    v.add_argument("--kv-events-topic", metavar="PREFIX", help="subscribe to topics starting with PREFIX (default: all)")
    v.add_argument("--kv-events-config", metavar="FILE",
                   help='JSON {"sources": [{"owner": ..., "endpoint": ..., "replay": ...}], "topic": ...}')
    v.set_defaults(func=serve)
    d = sub.add_parser("demo", help="daemon + worker processes replaying the bundled request trace")
    d.add_argument("--workers", type=int, default=4)
    d.add_argument("--requests", type=int, default=None, help="replay only the first N requests")
    d.add_argument("--block-size", type=int, default=16)
    d.add_argument("--capacity", type=float, default=0.25, help="capacity as a fraction of the trace's unique blocks")
    d.add_argument("--no-routing", action="store_true", help="skip part 2 (cache-aware routing over KV events)")
    d.set_defaults(func=demo)
    c = sub.add_parser("compile", help="compile every kernel into Numba's cache ahead of time (container images)")
    c.add_argument("--block-size", type=int, action="append", metavar="N",
                   help="segment block size to compile for (default 16; repeat for several)")
    c.set_defaults(func=compile_kernels)
    u = sub.add_parser("dump", help="inspect a live segment (read-only)")
    u.add_argument("name")
    u.add_argument("--json", action="store_true", help="one JSON document")
    u.add_argument("--check", action="store_true", help="verify every invariant; exit 1 on a violation")
    u.add_argument("--tree", action="store_true", help="show the widest prefixes")
    u.add_argument("--depth", type=int, default=3, help="levels of --tree")
    u.add_argument("--width", type=int, default=5, help="prefixes per level of --tree")
    u.set_defaults(func=dump)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except ShmCacheError as e:
        print(f"shmcache: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
