"""What ``shmcache dump`` reports about a live segment, computed read-only.

``describe(reader, depth, width, check)`` returns one plain dict (the JSON
document of ``dump --json``); ``render`` turns it into text. The tree summary
comes from one O(capacity) Numba pass over the state table, so it works on a
segment the writer is changing (it then describes a recent, not an exact,
state) and takes well under a second for a million blocks.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from . import liveness
from .errors import SegmentCorruptError
from .identity import who
from .layout import (
    G_CAPACITY,
    G_READER_SLOTS,
    G_STATES,
    H_MAX_PROBE,
    H_VERSION,
    LINK_PARENT_BIAS,
    LOW32,
    R_LINK,
    R_PINS,
    R_VALUE,
    RD_HIT_BLOCKS,
    RD_PID,
    RD_PINNED,
    RD_QUERIES,
    RD_QUERY_BLOCKS,
    RD_PIDNS,
    reader_lock_byte,
    reader_word,
    RECORD_WORDS,
)
from .recovery import S_VALID, classify

_LOW32 = np.uint64(LOW32)


@njit(cache=True)
def tree_arrays(data, geom):
    """``(parent, subtree size, children, client, pinned)`` per record; size 0
    for records that are free or do not reach the root."""
    cap = geom[G_CAPACITY]
    states = geom[G_STATES]
    parent = np.empty(cap, dtype=np.int64)
    client = np.empty(cap, dtype=np.int64)
    pinned = np.zeros(cap, dtype=np.bool_)
    for s in range(cap):
        link = data[states + s * RECORD_WORDS + R_LINK]
        parent[s] = np.int64(link & _LOW32) - LINK_PARENT_BIAS
        client[s] = np.int64(link >> np.uint64(32))
        pinned[s] = (data[states + s * RECORD_WORDS + R_PINS] & _LOW32) != 0
    status = classify(parent)
    depth = np.zeros(cap, dtype=np.int64)
    for s in range(cap):
        if status[s] == S_VALID and depth[s] == 0:
            d = 0
            cur = s
            while cur >= 0 and depth[cur] == 0:
                d += 1
                cur = parent[cur]
            base = depth[cur] if cur >= 0 else 0
            cur = s
            while cur >= 0 and depth[cur] == 0:
                depth[cur] = base + d
                d -= 1
                cur = parent[cur]
    # Deepest first, children before parents: a counting sort by depth (an
    # argsort here would compile Numba's quicksort, 3.5 s on a fresh cache).
    deepest = 0
    for s in range(cap):
        if status[s] == S_VALID:
            deepest = max(deepest, depth[s])
    start = np.zeros(deepest + 2, dtype=np.int64)  # by deepest - depth: where that depth's states begin
    for s in range(cap):
        if status[s] == S_VALID:
            start[deepest - depth[s] + 1] += 1
    for d in range(deepest + 1):
        start[d + 1] += start[d]
    order = np.empty(start[deepest + 1], dtype=np.int64)
    for s in range(cap):
        if status[s] == S_VALID:
            order[start[deepest - depth[s]]] = s
            start[deepest - depth[s]] += 1
    size = np.zeros(cap, dtype=np.int64)
    children = np.zeros(cap, dtype=np.int64)
    for s in order:
        size[s] += 1
        p = parent[s]
        if p >= 0:
            size[p] += size[s]
            children[p] += 1
    return parent, size, children, client, pinned


def _top(parent, size, children, client, data, geom, depth: int, width: int) -> list[dict]:
    """The widest prefixes: up to ``width`` children per level, ``depth`` levels."""
    states = int(geom[G_STATES])
    live = size > 0

    def widest(of: int) -> np.ndarray:
        kids = np.flatnonzero(live & (parent == of))
        return kids[np.argsort(-size[kids], kind="stable")[:width]]

    def node(s: int, level: int) -> dict:
        out = {
            "state": int(s),
            "value": int(np.int64(data[states + s * RECORD_WORDS + R_VALUE])),
            "client": int(client[s]),
            "blocks": int(size[s]),
            "children": int(children[s]),
        }
        if level < depth and children[s]:
            out["top"] = [node(int(c), level + 1) for c in widest(s)]
        return out

    return [node(int(s), 1) for s in widest(-1)]


def reader_slots(reader) -> list[dict]:
    """Every slot of the reader table, as ``reader`` reads it: pid and PID
    namespace, counters (queries, query and hit blocks, pinned blocks), and
    ``alive`` (its lock is held) for a slot registered by another reader;
    None for a free slot or ``reader``'s own."""
    wdata = reader._wdata
    out = []
    for slot in range(int(reader._geom[G_READER_SLOTS])):
        pid = int(wdata[reader_word(slot, RD_PID)])
        row = {"slot": slot, "pid": pid, "pid_namespace": int(wdata[reader_word(slot, RD_PIDNS)])}
        row.update((k, int(wdata[reader_word(slot, f)])) for k, f in (
            ("queries", RD_QUERIES), ("query_blocks", RD_QUERY_BLOCKS), ("hit_blocks", RD_HIT_BLOCKS),
            ("pinned_blocks", RD_PINNED)))
        row["alive"] = liveness.is_held(reader._map.fd, reader_lock_byte(slot)) if pid and slot != reader._slot else None
        out.append(row)
    return out


def describe(reader, depth: int = 0, width: int = 5, check: bool = False) -> dict:
    """Everything ``dump`` shows, as one JSON-ready dict."""
    data, geom = reader._data, reader._geom
    stats = reader.stats()
    info: dict = {
        "name": reader.name,
        "layout_version": int(data[H_VERSION]),
        "block_size": stats["block_size"],
        "capacity": stats["capacity"],
        "segment_bytes": stats["segment_bytes"],
        "bytes_per_block": round(stats["bytes_per_block"], 1),
        "seed": f"{reader.seed:032x}",
        "incarnation": f"{reader.incarnation:016x}",
        "writer": {"pid": stats["writer_pid"], "pid_namespace": stats["writer_pid_namespace"],
                   "alive": stats["writer_alive"], "epoch": stats["writer_epoch"]},
        "occupancy": {
            "live_blocks": stats["live_blocks"],
            "free_blocks": stats["free_blocks"],
            "fraction": round(stats["occupancy"], 6),
            "protected_blocks": stats["pinned_blocks"],
        },
        "counters": {k: stats[k] for k in ("operations", "inserted_blocks", "evicted_blocks", "removed_blocks",
                                           "clears", "recovered_drops", "clock")},
        "max_probe": int(data[H_MAX_PROBE]),
    }
    slots = reader_slots(reader)
    queries, query_blocks, hit_blocks = (sum(r[k] for r in slots) for k in ("queries", "query_blocks", "hit_blocks"))
    readers = [{"slot": r["slot"], "pid": r["pid"], "pid_namespace": r["pid_namespace"], "alive": r["alive"],
                "queries": r["queries"],
                "block_hit_rate": round(r["hit_blocks"] / r["query_blocks"], 6) if r["query_blocks"] else 0.0,
                "pinned_blocks": r["pinned_blocks"]}
               for r in slots if r["alive"] is not None]
    wq, wh = stats["writer_query_blocks"], stats["writer_hit_blocks"]
    info["hits"] = {
        "reader_queries": queries,
        "reader_block_hit_rate": round(hit_blocks / query_blocks, 6) if query_blocks else 0.0,
        "writer_matches": stats["writer_matches"],
        "writer_block_hit_rate": round(wh / wq, 6) if wq else 0.0,
    }
    info["readers"] = readers
    parent, size, children, client, pinned = tree_arrays(data, geom)
    live = size > 0
    clients, counts = np.unique(client[live], return_counts=True)
    info["clients"] = {str(int(o)): int(c) for o, c in zip(clients, counts)}
    info["owners"] = reader.owner_info()
    info["pinned_blocks"] = int((pinned & live).sum())
    info["root_prefixes"] = int((live & (parent == -1)).sum())
    if depth > 0:
        info["tree"] = _top(parent, size, children, client, data, geom, depth, width)
    if check:
        try:
            reader.check()
            info["violations"] = []
        except SegmentCorruptError as e:
            info["violations"] = e.violations
    return info


def render(info: dict) -> str:
    """The text form of ``describe``'s dict."""
    w, occ, c, h = info["writer"], info["occupancy"], info["counters"], info["hits"]
    lines = [
        f"segment {info['name']}  layout v{info['layout_version']}  block size {info['block_size']}  "
        f"capacity {info['capacity']:,}  {info['segment_bytes'] / 2**20:.1f} MiB ({info['bytes_per_block']} B/block)",
        f"writer  {who(w['pid'], w['pid_namespace'])} ({'alive' if w['alive'] else 'not running'}), epoch {w['epoch']}",
        f"blocks  {occ['live_blocks']:,} live ({occ['fraction']:.1%}), {occ['free_blocks']:,} free, "
        f"{info['pinned_blocks']:,} pinned, {occ['protected_blocks']:,} protected, {info['root_prefixes']:,} root prefixes",
        f"counts  {c['operations']:,} operations, {c['inserted_blocks']:,} inserted, {c['evicted_blocks']:,} evicted, "
        f"{c['removed_blocks']:,} removed, {c['clears']} clears, {c['recovered_drops']} dropped by recovery",
        f"hits    readers: {h['reader_queries']:,} queries, block hit rate {h['reader_block_hit_rate']:.1%}; "
        f"writer: {h['writer_matches']:,} matches, {h['writer_block_hit_rate']:.1%}",
        f"index   max probe {info['max_probe']}",
        "clients  " + (", ".join(f"{o}: {n:,}" for o, n in info["clients"].items()) or "none"),
    ]
    for name, o in info["owners"].items():
        line = f"owner   {name}: {o['blocks']:,} blocks, {o['kind']}{', attached' if o['attached'] else ''}"
        if o["kind"] == "events":
            skipped = ", ".join(f"{k} {n:,}" for k, n in o["skipped"].items() if n) or "none"
            lag = f"{o['lag_ns'] / 1e6:.2f} ms" if o["batches"] else "-"
            line += (f"; seq {o['next_seq'] - 1 if o['batches'] else '-'}, {o['batches']:,} batches, "
                     f"{o['events']:,} events, lag {lag}, lost {o['lost_batches']:,}, healed {o['healed_batches']:,}, "
                     f"restarts {o['restarts']}, clears {o['clears']}, malformed {o['malformed']:,}, skipped: {skipped}")
        lines.append(line)
    for r in info["readers"]:
        lines.append(f"reader  slot {r['slot']} {who(r['pid'], r['pid_namespace'])} ({'alive' if r['alive'] else 'dead'}), "
                     f"{r['queries']:,} queries, block hit rate {r['block_hit_rate']:.1%}, {r['pinned_blocks']:,} pinned")

    def tree(nodes: list[dict], indent: int) -> None:
        for n in nodes:
            lines.append(f"{'  ' * indent}- {n['blocks']:,} blocks under value {n['value']} "
                         f"(client {n['client']}, {n['children']} children)")
            tree(n.get("top", []), indent + 1)

    if "tree" in info:
        lines.append("tree (widest prefixes first):")
        tree(info["tree"], 1)
    if "violations" in info:
        v = info["violations"]
        lines.append("check   ok" if not v else f"check   {len(v)} violation(s)")
        lines += [f"  - {x}" for x in v]
    return "\n".join(lines)
