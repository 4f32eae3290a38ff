"""Where a match finds each block's state: in the record after its parent's,
or through the index (``matcher._NEXT_BIAS``). The answers must not depend
on which, and the writer's record order must keep the first one common."""

from __future__ import annotations

import numpy as np
import pytest

from shmcache import Reader, Writer
from shmcache.layout import G_INDEX, G_SLOTS, SLOT_STATE_MASK
from shmcache.matcher import CHUNK, workspace_path

BS = 4
BLOCKS = 2 * CHUNK + 8  # three chunks: the walk's policy changes between them


def prompt(blocks) -> np.ndarray:
    """Tokens whose block i is filled with ``blocks[i]``."""
    return np.repeat(np.asarray(list(blocks), dtype=np.int64), BS)


def matched_states(r: Reader, toks: np.ndarray) -> np.ndarray:
    """The states of ``r``'s match of ``toks``, read from its workspace."""
    k = r.match_prefix(toks).length // BS
    path, _ = workspace_path(r._ws, len(toks) // BS)
    return path[:k].copy()


def test_an_insert_takes_consecutive_records_and_an_evicted_chain_gives_them_back_in_order(shm_name):
    with Writer.create(shm_name, capacity=2 * BLOCKS, block_size=BS) as w, Reader.attach(shm_name) as r:
        old, other, new = (prompt(range(base, base + BLOCKS)) for base in (1, 1000, 2000))
        w.insert(old, np.arange(BLOCKS))
        assert (np.diff(matched_states(r, old)) == 1).all()  # a hit: old is used, then other
        w.insert(other, np.arange(BLOCKS) + 100)
        w.insert(new, np.arange(BLOCKS) + 200)  # the segment is full: evicts the least recent chain, leaf first
        assert r.match_prefix(old).length == 0 and r.match_prefix(other).length == BLOCKS * BS
        assert (np.diff(matched_states(r, new)) == 1).all()
        w.check()


def test_a_block_is_found_in_the_record_after_its_parents_without_the_index(shm_name):
    with Writer.create(shm_name, capacity=2 * BLOCKS, block_size=BS) as w, Reader.attach(shm_name) as r:
        toks = prompt(range(1, BLOCKS + 1))
        w.insert(toks, np.arange(BLOCKS))
        states = matched_states(r, toks)
        # Take a block after the first chunk out of the index (a writable
        # view of the data part: this segment is not checked again).
        data, geom = w._map.data, w.geometry.vector()
        index, slots = int(geom[G_INDEX]), int(geom[G_SLOTS])
        gone = CHUNK + 3
        at = np.flatnonzero((data[index : index + slots] & np.uint64(SLOT_STATE_MASK)) == states[gone] + 1)
        assert len(at) == 1
        data[index + at[0]] = 0
        m = r.match_prefix(toks)
        assert (m.length, m.values.tolist()) == (BLOCKS * BS, list(range(BLOCKS)))
        assert w.match_prefix(toks).length == BLOCKS * BS


def grow(w: Writer, prompts: list[list[int]], model: dict, upto: int, start: int = 0) -> None:
    """Insert every prompt one block longer per round, from ``start`` to
    ``upto`` blocks, interleaved: each chain's records end up apart."""
    for n in range(start + 1, upto + 1):
        for blocks in prompts:
            insert(w, blocks[:n], model)


def insert(w: Writer, blocks: list[int], model: dict) -> None:
    """Insert ``blocks`` (values derived from them) into ``w`` and the model
    (every cached prefix, as a tuple, to its value)."""
    values = [b * 7 + 3 for b in blocks]
    w.insert(prompt(blocks), values)
    for i in range(len(blocks)):
        model.setdefault(tuple(blocks[: i + 1]), values[i])


@pytest.mark.parametrize("layout", ["consecutive", "interleaved", "mixed"])
def test_answers_are_the_same_whatever_order_the_records_are_in(shm_name, layout):
    # Six prompts, pairs of them sharing their first 10 blocks.
    prompts = [[10_000 * (j // 2) + b for b in range(10)] + [10_000 * j + 500 + b for b in range(BLOCKS - 10)]
               for j in range(6)]
    model: dict[tuple[int, ...], int] = {}
    with Writer.create(shm_name, capacity=512, block_size=BS) as w, Reader.attach(shm_name) as r:
        if layout == "consecutive":
            for blocks in prompts:
                insert(w, blocks, model)
        elif layout == "interleaved":
            grow(w, prompts, model, BLOCKS)
        else:  # the first chunk whole, then interleaved
            for blocks in prompts:
                insert(w, blocks[:CHUNK], model)
            grow(w, prompts, model, BLOCKS, CHUNK)

        def check() -> None:
            for blocks in prompts:
                for cut in range(BLOCKS + 1):
                    query = blocks[:cut] + [99_999]  # and a block that misses
                    k = 0
                    while k < len(query) and tuple(query[: k + 1]) in model:
                        k += 1
                    want = [model[tuple(query[: i + 1])] for i in range(k)]
                    for m in (r.match_prefix(prompt(query)), w.match_prefix(prompt(query))):
                        assert (m.length, m.values.tolist()) == (k * BS, want)

        check()
        steps = np.concatenate([np.diff(matched_states(r, prompt(blocks))) for blocks in prompts])
        followed = (steps == 1).mean()  # consecutive: all but where a prompt leaves its pair's prefix
        assert {"consecutive": followed > 0.95, "interleaved": followed < 0.1, "mixed": 0.3 < followed < 0.7}[layout]
        # Remove the second half of every other prompt and insert it again:
        # freed records are reused out of the prompts' order.
        half = BLOCKS // 2
        for blocks in prompts[::2]:
            w.remove([model[tuple(blocks[: half + 1])]])
            for i in range(half + 1, BLOCKS + 1):
                del model[tuple(blocks[:i])]
        for blocks in prompts[::2]:
            insert(w, blocks, model)
        check()
        w.check()
