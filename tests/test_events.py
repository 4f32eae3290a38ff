"""KV events in (issue 12, part 1), decoded and applied without sockets:
the engines' own payloads (tests/data/kv-events, encoded by vLLM 0.33's and
SGLang 0.5.23's structs), both encodings, every skip class, regrouping of
1-token pages, and what an owner holds after removals, clears and
restarts. ``test_kv_events_daemon.py`` does the same over ZMQ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shmcache import Reader, Writer
from shmcache.events import OwnerFeed, decode_batch, fold_hash

from kv_structs import ARRAY, MAP

SAMPLES = Path(__file__).parent / "data" / "kv-events"
BS = 16


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


@pytest.fixture
def seg(shm_name):
    with Writer.create(shm_name, capacity=512, block_size=BS) as w:
        with Reader.attach(shm_name) as r:
            yield w, r


def feed(w: Writer, owner: str = "rank0", client: int = 0xC0000000) -> OwnerFeed:
    return OwnerFeed(w, owner, client)


def apply(f: OwnerFeed, payload: bytes) -> None:
    first, end = f.sequence(f.next_seq or 0)
    f.apply_batch(end, payload)


def skipped(r: Reader, owner: str) -> dict[str, int]:
    return {k: n for k, n in r.owner_info()[owner]["skipped"].items() if n}


def test_samples_decode_to_what_samples_json_says():
    described = json.loads((SAMPLES / "samples.json").read_text())
    for name, info in described.items():
        ts, events = decode_batch(sample(name))
        assert ts == info["decoded"][0] and len(events) == len(info["decoded"][1]), name


def test_vllm_int_hashes_above_2_63_then_a_child(seg):
    w, r = seg
    f = feed(w)
    apply(f, sample("vllm-0.33.0-stored-int.msgpack"))
    prompt = np.arange(1000, 1032)
    assert r.match_owners(prompt) == {"rank0": 32}
    assert r.match_prefix(prompt).values.tolist() == [fold_hash(18446744073709551611), fold_hash(12345678901234567890)]
    apply(f, sample("vllm-0.33.0-stored-child-lora.msgpack"))  # a child of the second block
    assert r.match_owners(np.r_[prompt, np.arange(2000, 2016)]) == {"rank0": 48}
    assert r.owner_info()["rank0"]["stored_blocks"] == 3
    w.check()


def test_vllm_bytes_hashes(seg):
    w, r = seg
    apply(feed(w), sample("vllm-0.33.0-stored-bytes.msgpack"))
    assert r.match_owners(np.arange(1000, 1016)) == {"rank0": 16}
    assert r.match_prefix(np.arange(1000, 1016)).values.tolist() == [fold_hash(bytes(range(32)))]


def test_removal_then_clear_in_one_batch(seg):
    w, r = seg
    f = feed(w)
    apply(f, sample("vllm-0.33.0-stored-int.msgpack"))
    apply(f, sample("vllm-0.33.0-stored-child-lora.msgpack"))
    apply(f, sample("vllm-0.33.0-removed-cleared.msgpack"))  # removes 777, then clears
    assert r.match_owners(np.arange(1000, 1032)) == {"rank0": 0}
    assert w.stats()["live_blocks"] == 0
    info = r.owner_info()["rank0"]
    assert info["clears"] == 1 and info["removed_blocks"] == 3 and info["blocks"] == 0


def test_every_skip_class_is_counted_and_nothing_is_keyed(seg):
    w, r = seg
    f = feed(w)
    apply(f, sample("vllm-0.33.0-skips.msgpack"))  # a CPU-tier block, a sliding-window group, extra_keys
    assert skipped(r, "rank0") == {"medium": 1, "group": 1, "extra_keys": 1}
    events = [
        MAP.stored([1], None, [], 16),  # no tokens
        MAP.stored([2], 99, range(16), 16),  # a parent never stored
        MAP.stored([3], None, range(24), 24),  # 24 does not divide 16
        MAP.stored([4], None, range(16), 16, kv_cache_spec_kind="mamba"),
        MAP.stored([5], None, range(16), 16, locality="REMOTE"),
        MAP.removed([5]),  # never stored
        MAP.removed([6], medium="CPU"),
    ]
    apply(f, MAP.batch(events))
    assert skipped(r, "rank0") == {"medium": 3, "group": 2, "extra_keys": 1, "no_tokens": 1, "parent": 1,
                                   "block_size": 1, "unknown_block": 1}
    assert r.stats()["owners"]["rank0"]["skipped"] == w.stats()["owners"]["rank0"]["skipped"] == r.owner_info()["rank0"]["skipped"]
    assert w.stats()["live_blocks"] == 0 and r.owners() == {"rank0": 0}


@pytest.mark.parametrize("enc", [MAP, ARRAY], ids=["map", "array"])
def test_bad_events_are_counted_and_the_rest_of_the_batch_applies(seg, enc):
    w, r = seg
    f = feed(w)
    good = enc.stored([10], None, range(16))
    f.apply_batch(0, enc.batch([good]))
    import msgspec

    raw = msgspec.msgpack.decode(enc.batch([good]))
    bad_hash = dict(raw[1][0]) if isinstance(raw[1][0], dict) else list(raw[1][0])
    if isinstance(bad_hash, dict):
        bad_hash["block_hashes"] = [1.5]
    else:
        bad_hash[1] = [1.5]
    events = [{"type": "BlockMoved"}, ["Nonsense", 1], 7, bad_hash, raw[1][0]]
    f.apply_batch(1, msgspec.msgpack.encode([0.0, events, 0]))
    f.apply_batch(2, b"\xc1 not msgpack")
    f.apply_batch(3, msgspec.msgpack.encode({"ts": 1}))
    info = r.owner_info()["rank0"]
    assert info["skipped"]["unknown_type"] == 2 and info["skipped"]["bad_field"] == 2
    assert info["malformed"] == 2 and info["batches"] == 4
    assert r.match_owners(np.arange(16)) == {"rank0": 16}  # the good block, stored twice, held once
    w.check()


def test_array_encoding_sample_and_ours_agree(seg):
    w, r = seg
    f = feed(w)
    apply(f, sample("vllm-array-form-stored-removed.msgpack"))  # stores [31, 32], removes 32, clears
    assert r.owner_info()["rank0"]["stored_blocks"] == 2 and r.owners() == {"rank0": 0}
    g = feed(w, "rank1", 0xC0000001)
    apply(g, ARRAY.batch([ARRAY.stored([31, 32], None, range(1000, 1032)), ARRAY.removed([32])]))
    assert r.match_owners(np.arange(1000, 1032)) == {"rank0": 0, "rank1": 16}


def test_two_owners_one_prefix_and_a_middle_removal(seg):
    w, r = seg
    a, b = feed(w, "rank0", 0xC0000000), feed(w, "rank1", 0xC0000001)
    prompt = np.arange(64)
    apply(a, MAP.batch([MAP.stored([1, 2, 3, 4], None, prompt)]))
    apply(b, MAP.batch([MAP.stored([11, 12, 13], None, prompt[:48])]))  # the same blocks, other hashes
    assert r.match_owners(prompt) == {"rank0": 64, "rank1": 48}
    apply(a, MAP.batch([MAP.removed([2])]))  # rank0 loses blocks 2.. of its chain; rank1 keeps its
    assert r.match_owners(prompt) == {"rank0": 16, "rank1": 48}
    assert r.match_prefix(prompt).length == 48  # block 4 had no other owner: it left the cache
    # rank0 re-stores block 2 below block 1 (a removed hash is forgotten), then 3 again.
    apply(a, MAP.batch([MAP.stored([2], 1, prompt[16:32]), MAP.stored([3], 2, prompt[32:48])]))
    assert r.match_owners(prompt) == {"rank0": 48, "rank1": 48}
    # A child of a block rank0 no longer holds is not keyed.
    apply(a, MAP.batch([MAP.removed([1]), MAP.stored([5], 3, prompt[48:64])]))
    assert r.match_owners(prompt) == {"rank0": 0, "rank1": 48}
    assert skipped(r, "rank0") == {"parent": 1}
    w.check()


def test_reused_blocks_reemitted_with_a_nil_parent_are_idempotent(seg):
    w, r = seg
    f = feed(w)
    prompt = np.arange(48)
    apply(f, MAP.batch([MAP.stored([1, 2], None, prompt[:32])]))
    apply(f, MAP.batch([MAP.stored([1, 2, 3], None, prompt)]))  # 1 and 2 reported again, then a new one
    assert r.match_owners(prompt) == {"rank0": 48}
    assert r.owners() == {"rank0": 3} and w.stats()["live_blocks"] == 3


def test_lora_blocks_live_in_their_namespace(seg):
    w, r = seg
    f = feed(w)
    prompt = np.arange(32)
    apply(f, MAP.batch([MAP.stored([1, 2], None, prompt, lora_name="sql", extra_keys=[["sql"], ["sql"]])]))
    assert r.match_owners(prompt) == {"rank0": 0}
    assert r.match_owners(prompt, namespace="sql") == {"rank0": 32}


def test_restart_and_clear_drop_what_the_owner_held_then_apply_what_follows(seg):
    w, r = seg
    f = feed(w)
    prompt = np.arange(32)
    for seq in range(3):
        assert f.sequence(seq) == (seq, seq)
        f.apply_batch(seq, MAP.batch([MAP.stored([seq + 1], None, prompt[:16] + 100 * seq)]))
    assert r.owners() == {"rank0": 3}
    assert f.sequence(0) == (0, 0)  # back to 0: the publisher restarted
    f.apply_batch(0, MAP.batch([MAP.stored([7], None, prompt[:16])]))
    assert r.owners() == {"rank0": 1} and r.owner_info()["rank0"]["restarts"] == 1
    assert f.sequence(5) == (1, 5)  # a gap: 1..4 missing


def test_one_token_pages_are_regrouped_into_segment_blocks(seg):
    w, r = seg
    f = feed(w)
    apply(f, sample("sglang-0.5.23-pages-of-1.msgpack"))  # 3 pages stored, the last removed: no full block
    assert w.stats()["live_blocks"] == 0 and r.owners() == {"rank0": 0}
    prompt = np.arange(1000, 1040)
    # The rest of the first 16-token block and most of a second, in pieces, in the signed-hash style.
    pages = [(-(i + 100), int(t)) for i, t in enumerate(prompt[2:], start=2)]
    apply(f, MAP.batch([MAP.stored([h for h, _ in pages[:10]], 4242, [t for _, t in pages[:10]], 1)]))
    assert r.match_owners(prompt) == {"rank0": 0}  # 12 tokens: not a full block yet
    apply(f, MAP.batch([MAP.stored([h for h, _ in pages[10:]], pages[9][0], [t for _, t in pages[10:]], 1)]))
    assert r.match_owners(prompt) == {"rank0": 32}  # 40 tokens: two full blocks, 8 pending
    # The value of a segment block is the hash of the page that completed it.
    assert r.match_prefix(prompt).values.tolist() == [fold_hash(-(15 + 100)), fold_hash(-(31 + 100))]
    # Evicting the last page of the second block (a leaf, as SGLang does) lets it go.
    apply(f, MAP.batch([MAP.removed([h for h, _ in pages[29:]])]))
    assert r.match_owners(prompt) == {"rank0": 16}
    # A middle page of the first block takes that block (and all after it) with it.
    apply(f, MAP.batch([MAP.removed([pages[3][0]])]))
    assert r.match_owners(prompt) == {"rank0": 0}
    w.check()


def test_lora_id_alone_names_the_namespace_and_bytes_hashes_fold_as_bytes(seg):
    from shmcache.events import fold_hashes

    w, r = seg
    f = feed(w)
    prompt = np.arange(16)
    apply(f, MAP.batch([MAP.stored([1], None, prompt, lora_id=7)]))  # an older publisher: no lora_name
    assert r.match_owners(prompt) == {"rank0": 0} and r.match_owners(prompt, namespace=7) == {"rank0": 16}
    digits = [b"123", b"\xff" * 32]
    assert fold_hashes(digits).tolist() == [fold_hash(h) for h in digits]
    assert fold_hashes([2**64 - 1, 5]).tolist() == [-1, 5] and fold_hashes([-3, 2**63]).tolist() == [-3, -(2**63)]


def _plain_events(events) -> list:
    return [tuple(v.tolist() if isinstance(v, np.ndarray) else v for v in vars(e).values()) + (type(e).__name__,)
            for e in events]


def test_the_fast_typed_decoding_and_the_generic_one_agree_on_every_payload():
    from shmcache.events import decode_batch, decode_event, decode_events

    payloads = [sample(p.name) for p in sorted(SAMPLES.glob("*.msgpack"))]
    for enc in (MAP, ARRAY):
        payloads.append(enc.batch([enc.stored([2**64 - 1, b"\x00" * 32], 5, range(32), lora_id=3, extra_keys=[None, ["m", 1]]),
                                   enc.stored([1], None, [2**32 - 1] * 16, group_idx=0, kv_cache_spec_kind="mla_attention"),
                                   enc.removed([-4], medium=None), enc.cleared()], ts=1.5))
    for payload in payloads:
        ts, generic = decode_batch(payload)
        assert _plain_events(decode_events(payload)[1]) == _plain_events([decode_event(e) for e in generic])
