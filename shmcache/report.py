"""What the reader and the writer both tell a person about a segment: the
header's figures (``header_stats``) and, in words, the invariant violations
the checks of ``shmcache.checks`` report (``describe_violations``).
"""

from __future__ import annotations

import numpy as np

from . import checks, owners
from .layout import (
    H_CLEARS,
    H_CLOCK,
    H_EVICTED,
    H_INSERTED,
    H_LIVE,
    H_MUTATIONS,
    H_PINNED,
    H_RECOVERED,
    H_REMOVED,
    H_WRITER_EPOCH,
    H_WRITER_HIT_BLOCKS,
    H_WRITER_MATCHES,
    H_WRITER_PID,
    H_WRITER_QUERY_BLOCKS,
    H_WRITER_PIDNS,
)

_VIOLATIONS = {
    checks.V_ODD_VERSION: "state {a} has an odd version (a write was interrupted)",
    checks.V_BAD_PARENT: "state {a} links to parent {b}, which is not a live state",
    checks.V_UNREACHABLE: "state {a} does not reach the root through live states (cycle or dead ancestor)",
    checks.V_NOT_INDEXED: "state {a} is not found through the index under its key (found {b})",
    checks.V_SLOT_BAD_STATE: "index slot {a} points at state {b}, which is out of range or free",
    checks.V_SLOT_BAD_TAG: "index slot {a} has a tag that does not match state {b}'s key",
    checks.V_SLOT_TOO_FAR: "index slot {a} (state {b}) lies beyond the recorded maximum probe distance",
    checks.V_SLOT_COUNT: "index holds {a} entries for {b} live states",
    checks.V_LIVE_COUNT: "header says {a} live states, the table holds {b}",
    checks.V_PINNED_COUNT: "header says {a} protected (pinned or above a pin) states, the table holds {b}",
    checks.V_PROTECT_COUNT: "state {a} records the wrong number of pinned states in its subtree (should be {b})",
    checks.V_MUTATING: "the mutation counter is odd ({a}): a write is in progress or was interrupted",
    checks.V_OWNERS_SUBSET: "state {a} is held by an owner that does not hold its parent {b}",
    checks.V_OWNER_COUNT: "owner entry {a} records the wrong number of blocks (it holds {b})",
    checks.V_FREE_LIST: "free list entry {a} (state {b}) is wrong",
    checks.V_CHILD_LIST: "children list of {a} is inconsistent ({b})",
    checks.V_VALUE_MAP: "state {a} is not found through the value map (found {b})",
    checks.V_HEAP_MISSING: "evictable leaf {a} is missing from the LRU heap",
    checks.V_READER_PINS: "the writer counts a wrong number of reader pins on state {a} (entries name it {b} times)",
}


def describe_violations(rows: np.ndarray) -> list[str]:
    """Human-readable lines for ``(code, a, b)`` violation rows."""
    return [_VIOLATIONS.get(int(c), "violation {c}: {a} {b}").format(c=int(c), a=int(a), b=int(b)) for c, a, b in rows]


def header_stats(data: np.ndarray, geometry, writer_alive: bool) -> dict:
    """The segment-wide figures of a header, as a plain dict, with every
    named owner's (``owners.describe``: blocks held and, for KV-event
    sources, their counters and skips); ``writer_alive`` is what the writer
    lock says (``shmcache.liveness``)."""
    h = lambda i: int(data[i])  # noqa: E731
    live = h(H_LIVE)
    return {
        "capacity": geometry.capacity,
        "block_size": geometry.block_size,
        "live_blocks": live,
        "free_blocks": geometry.capacity - live,
        "occupancy": live / geometry.capacity,
        "pinned_blocks": h(H_PINNED),
        "inserted_blocks": h(H_INSERTED),
        "evicted_blocks": h(H_EVICTED),
        "removed_blocks": h(H_REMOVED),
        "clears": h(H_CLEARS),
        "recovered_drops": h(H_RECOVERED),
        "operations": h(H_MUTATIONS) // 2,
        "clock": h(H_CLOCK),
        "writer_pid": h(H_WRITER_PID),
        "writer_pid_namespace": h(H_WRITER_PIDNS),
        "writer_alive": writer_alive,
        "writer_epoch": h(H_WRITER_EPOCH),
        "writer_matches": h(H_WRITER_MATCHES),
        "writer_query_blocks": h(H_WRITER_QUERY_BLOCKS),
        "writer_hit_blocks": h(H_WRITER_HIT_BLOCKS),
        "segment_bytes": geometry.total_bytes,
        "bytes_per_block": geometry.bytes_per_block,
        "owners": owners.describe(owners.snapshot(data, geometry.vector())),
    }
