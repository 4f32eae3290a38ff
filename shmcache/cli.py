"""The ``shmcache`` command.

* ``shmcache serve NAME --capacity N``: the writer daemon, in the foreground
  (logs to stderr, one ``ready ...`` line on stdout, clean exit on SIGTERM or
  SIGINT; exit 1 with one line on stderr when it cannot start). With
  ``--kv-events OWNER=ENDPOINT`` it also ingests engines' KV events; with
  ``--publish-events ENDPOINT`` it publishes its own, as vLLM does; with
  ``--metrics-port`` it serves Prometheus metrics.
* ``shmcache demo``: a daemon and worker processes replaying the bundled
  Mooncake trace, with a live progress line, a summary and the dump; then
  cache-aware routing of the same trace over 4 simulated ranks' KV events.
* ``shmcache compile``: compile every kernel into Numba's on-disk cache
  ahead of time (a container image build), so that no process of the image
  waits on the compiler.
* ``shmcache metrics NAME --port 9400``: Prometheus metrics of a segment
  (one whose writer is embedded; the daemon serves its own with
  ``--metrics-port``).
* ``shmcache dump NAME``: inspect a live segment read-only (``--json`` for
  scripts, ``--check`` to verify every invariant; exit 1 if one fails).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import InvalidInputError, ShmCacheError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_command(code: str) -> list[str]:
    """The command that runs ``code`` in a new interpreter importing this
    very shmcache: the directory it was imported from comes first on the
    child's ``sys.path``. ``python -m shmcache.cli`` would put the working
    directory first: run from a source checkout (as the README's first
    command is), a daemon then imported the uninstalled tree while the
    workers, spawned with this process's ``sys.path``, imported the
    installed package, and each compiled its own kernels into its own
    cache."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {_ROOT!r}); {code}"]


def serve_command(*args: str) -> list[str]:
    """``shmcache serve ARGS`` as a command for this very shmcache (``python_command``)."""
    return [*python_command("from shmcache.cli import main; sys.exit(main(sys.argv[1:]))"), "serve", *args]


def serve(args: argparse.Namespace) -> int:
    import logging

    from .daemon import Daemon

    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        sources, topic = [], None
        if args.kv_events or args.kv_events_replay or args.kv_events_config:
            from .ingest import sources_from

            sources, topic = sources_from(args.kv_events, args.kv_events_replay, args.kv_events_config)
        publish = None
        if args.publish_events:
            publish = dict(endpoint=args.publish_events, replay=args.publish_replay, topic=args.publish_topic,
                           per_owner=args.publish_per_owner, model=args.publish_model, buffer=args.publish_buffer,
                           array_format=args.publish_format == "array")
            if args.publish_interval_ms is not None:
                publish["interval"] = args.publish_interval_ms / 1e3
            if args.publish_buffer_mb is not None:
                publish["buffer_bytes"] = args.publish_buffer_mb << 20
        elif (args.publish_replay or args.publish_per_owner or args.publish_model or args.publish_interval_ms is not None
              or args.publish_buffer_mb is not None):
            raise InvalidInputError("--publish-replay, --publish-per-owner, --publish-model, --publish-interval-ms and "
                                    "--publish-buffer-mb need --publish-events ENDPOINT")
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
            publish=publish,
            metrics_port=args.metrics_port,
            metrics_addr=args.metrics_addr,
            compile_helper=not args.compile_alone,
            **({} if args.spin_us is None else {"spin_us": args.spin_us}),
        )
    except (ShmCacheError, OSError) as e:
        print(f"shmcache serve: cannot start: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"shmcache serve: cannot start: {e.name} is missing: pip install 'shmcache[events]' "
              "(KV events) or 'shmcache[metrics]' (--metrics-port)", file=sys.stderr)
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


def metrics(args: argparse.Namespace) -> int:
    import signal
    import threading

    try:
        from .metrics import Metrics
    except ImportError:
        print("shmcache metrics: prometheus_client is missing: pip install 'shmcache[metrics]'", file=sys.stderr)
        return 1
    try:
        m = Metrics(args.name, args.port, args.addr)
    except OSError as e:
        print(f"shmcache metrics: cannot serve on port {args.port}: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving metrics of {args.name} on http://{args.addr}:{m.port}/metrics", flush=True)
    stop.wait()
    m.close()
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
    v.add_argument("--compile-alone", action="store_true",
                   help="on an empty Numba cache, compile in this process only, without a helper process "
                        "(where something else compiles meanwhile)")
    v.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    v.add_argument("--kv-events", action="append", default=[], metavar="OWNER=ENDPOINT",
                   help="subscribe to an engine's KV-event publisher (vLLM, SGLang) and attribute its blocks to OWNER; "
                        "repeat per data-parallel rank")
    v.add_argument("--kv-events-replay", action="append", default=[], metavar="OWNER=ENDPOINT",
                   help="that publisher's replay socket: missed batches are fetched from it")
    v.add_argument("--kv-events-topic", metavar="PREFIX", help="subscribe to topics starting with PREFIX (default: all)")
    v.add_argument("--kv-events-config", metavar="FILE",
                   help='JSON {"sources": [{"owner": ..., "endpoint": ..., "replay": ...}], "topic": ...}')
    v.add_argument("--publish-events", metavar="ENDPOINT",
                   help="publish the segment's changes as vLLM-format KV events on a ZMQ PUB socket "
                        "(bound for tcp://*:PORT and ipc://, connected otherwise)")
    v.add_argument("--publish-replay", metavar="ENDPOINT", help="ROUTER socket answering replay requests (bound)")
    v.add_argument("--publish-topic", default="", metavar="TOPIC", help="topic of the node's stream (default empty)")
    v.add_argument("--publish-per-owner", action="store_true",
                   help="one stream per named owner, topic kv@OWNER@MODEL, instead of the node's")
    v.add_argument("--publish-model", metavar="MODEL", help="MODEL of the per-owner topics (default: the segment name)")
    v.add_argument("--publish-buffer", type=int, default=10_000, metavar="N", help="batches kept for replay per stream")
    v.add_argument("--publish-buffer-mb", type=int, metavar="MB",
                   help="memory for the batches kept for replay, all streams together (default 64)")
    v.add_argument("--publish-interval-ms", type=float, metavar="MS",
                   help="gather changes into one batch for up to MS milliseconds (default 2; 0: a batch per pass)")
    v.add_argument("--publish-format", choices=("map", "array"), default="map",
                   help="events as type-tagged maps (vLLM >= 0.24) or positional arrays (older consumers)")
    v.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on this port (0: any)")
    v.add_argument("--metrics-addr", default="0.0.0.0", metavar="ADDR", help="address of the metrics endpoint")
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
    m = sub.add_parser("metrics", help="serve a segment's Prometheus metrics (a segment whose writer is embedded)")
    m.add_argument("name")
    m.add_argument("--port", type=int, default=9400)
    m.add_argument("--addr", default="0.0.0.0")
    m.set_defaults(func=metrics)
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
