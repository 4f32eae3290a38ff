"""Runs in a spawned process: Hypothesis damages a live segment and a Reader
(and the writer's repair) must survive every case. A segfault or a hang here
shows up as the child's exit code or timeout in the parent."""

from __future__ import annotations

import uuid
from collections import Counter

import numpy as np

BS = 4
PROMPTS = [tuple((i * 7 + j * 3) % 5 for j in range(k)) for i in range(12) for k in (2, 4, 6)]


def run(n_cases: int, seed: int, out) -> None:
    from hypothesis import HealthCheck, given, settings, seed as hseed
    from hypothesis import strategies as st

    import shmcache
    from shmcache import Reader, SegmentCorruptError, Writer
    from shmcache.recovery import rebuild
    from shmcache.wstate import M_CRASH

    name = f"t-fuzz-{uuid.uuid4().hex[:12]}"
    w = Writer.create(name, capacity=96, block_size=BS)
    try:
        prompts = [np.repeat(np.asarray(p, dtype=np.int64), BS) for p in PROMPTS]
        for i, p in enumerate(prompts):
            n = len(p) // BS
            try:
                w.insert(p, np.arange(1000 * i, 1000 * i + n))
            except shmcache.InvalidInputError:
                pass
        r = Reader.attach(name)
        whole = w._map.maps[0]
        buf = np.frombuffer(whole, dtype=np.uint8)
        pristine = buf.copy()
        g = w.geometry
        regions = {
            "header": (0, 4096),
            "states": (g.states_offset, g.index_offset),
            "index": (g.index_offset, g.index_offset + g.index_slots * 8),
            "writable": (g.wregion_offset, g.total_bytes),
        }
        tally: Counter = Counter()
        specials = [0, 1, 2, 0xFFFFFFFF, 0xFFFFFFFE, 2**31, 2**32, 2**63, 2**64 - 1, g.capacity, g.capacity + 1, g.index_slots]

        damage = st.lists(
            st.tuples(
                st.sampled_from(sorted(regions)),
                st.floats(0, 1, exclude_max=True),
                st.one_of(st.integers(0, 7).map(lambda b: ("bit", b)),
                          st.sampled_from(specials).map(lambda v: ("word", v)),
                          st.integers(0, 2**64 - 1).map(lambda v: ("word", v))),
            ),
            min_size=1, max_size=4,
        )

        @hseed(seed)
        @settings(max_examples=n_cases, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(damage)
        def case(hits):
            buf[:] = pristine
            for region, where, (kind, v) in hits:
                lo, hi = regions[region]
                at = lo + int(where * (hi - lo)) // 8 * 8
                if kind == "bit":
                    buf[at + v // 8 % 8] ^= np.uint8(1 << (v % 8))
                else:
                    buf[at : at + 8] = np.frombuffer(int(v).to_bytes(8, "little"), dtype=np.uint8)
            for p in prompts:
                try:
                    r.match_prefix(p)
                    tally["matches"] += 1
                except shmcache.ShmCacheError as e:  # typed refusal (e.g. a damaged RETIRED word)
                    tally[type(e).__name__] += 1
            try:
                r.check()
                tally["check ok"] += 1
            except SegmentCorruptError as e:
                assert e.violations
                tally["check found damage"] += 1
            if hits[0][1] < 0.25:  # a quarter of the cases: the writer's repair on the damage
                rebuild(w._A)
                tally["repairs"] += 1
            tally["cases"] += 1

        case()
        buf[:] = pristine
        del buf
        r.close()
        out.put(dict(tally))
    finally:
        w._A.meta[M_CRASH] = 0
        w.close(unlink=True)
