"""KV events in: the batches vLLM and SGLang publish, decoded and applied as
one named owner's holds on a segment.

The wire format (vLLM 0.33's ``vllm/distributed/kv_events.py``; SGLang
0.5.23 publishes the same structs):

* A ZMQ message is three frames: topic, the batch's sequence number as 8
  bytes big-endian (0 for a publisher's first batch, +1 per batch, 0 again
  when it restarts), and a msgpack payload. Replay answers from the
  publisher's ROUTER socket carry the same frames after an empty one.
* The payload is a batch ``[ts, events, rank]`` (``rank``, vLLM's
  ``data_parallel_rank`` or SGLang's ``attn_dp_rank``, may be nil or absent).
* An event is a map tagged by ``"type"`` (``BlockStored``, ``BlockRemoved``,
  ``AllBlocksCleared``), or, as vLLM up to 0.23 and older SGLang encode
  them, a positional array ``[tag, field, ...]`` in declaration order
  (``STORED_FIELDS``, ``REMOVED_FIELDS``). Unknown fields are ignored.
* Block hashes are ints (vLLM: unsigned, possibly >= 2**63; SGLang: signed
  int64) or bytes (a SHA-256 digest). They are only names: an owner's
  blocks are keyed with shmcache's own chained keys from their token ids,
  chained from the parent block's key, which ``OwnerFeed`` finds through
  its map from the engine's hash to the block (``Writer.extend``'s rows).

What cannot be keyed from tokens alone is skipped and counted by reason
(``layout.SKIP_REASONS``); nothing an engine sends can make an owner
credited with a block it does not hold.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Union

import msgspec
import numpy as np

from .errors import CacheFullError, InvalidInputError
from .layout import (
    O_BATCHES,
    O_BLOCKS,
    O_CLEARS,
    O_EVENTS,
    O_LAG_NS,
    O_LAST_NS,
    O_MALFORMED,
    O_NEXT_SEQ,
    O_REMOVED,
    O_RESTARTS,
    O_SKIPPED,
    O_STORED,
    OWNER_EVENTS,
    SKIP_REASONS,
)

from .wire_tokens import parse_tokens

log = logging.getLogger("shmcache.events")

#: Positional field order of the array encoding, as vLLM declares them.
STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
                 "extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window", "locality",
                 "ownership")
REMOVED_FIELDS = ("block_hashes", "medium", "group_idx", "locality", "ownership")
#: Cache groups whose blocks are keyed by their tokens alone.
MAIN_KINDS = (None, "full_attention", "mla_attention", "full", "mla")
#: The tiers an owner's matchable KV lives in.
GPU_MEDIUMS = (None, "GPU", "gpu")
SKIP = {reason: O_SKIPPED + i for i, reason in enumerate(SKIP_REASONS)}
_MAX_LAG_NS = 10**18  # about 30 years
_U64 = (1 << 64) - 1

_decode = msgspec.msgpack.Decoder().decode


class MalformedError(ValueError):
    """A message or batch that does not follow the wire format."""


@dataclass
class Stored:
    hashes: list
    parent: object
    tokens: np.ndarray  # int64, every id in [0, 2**32)
    block_size: int
    lora_name: str | None
    extra_keys: list | None
    namespace: str | int | None


@dataclass
class Removed:
    hashes: list


@dataclass
class Cleared:
    pass


@dataclass
class Skipped:
    """An event not applied: why, and how many blocks it named."""

    reason: str
    blocks: int


def _fields(event: object, names: tuple[str, ...]) -> dict:
    if isinstance(event, dict):
        return event
    return dict(zip(names, event[1:]))


_HASH_TYPES = {int, bytes}  # exact types: a bool is no hash


def _is_hash(h: object) -> bool:
    return type(h) in _HASH_TYPES


def decode_event(event: object) -> Stored | Removed | Cleared | Skipped:
    """One event, normalised; ``Skipped`` for what cannot be applied."""
    if isinstance(event, dict):
        tag = event.get("type")
    elif isinstance(event, (list, tuple)) and event:
        tag = event[0]
    else:
        return Skipped("bad_field", 0)
    if tag == "AllBlocksCleared":
        return Cleared()
    if tag not in ("BlockStored", "BlockRemoved"):
        return Skipped("unknown_type", 0)
    f = _fields(event, STORED_FIELDS if tag == "BlockStored" else REMOVED_FIELDS)
    hashes = f.get("block_hashes")
    if not isinstance(hashes, list) or not {type(h) for h in hashes} <= _HASH_TYPES:
        return Skipped("bad_field", len(hashes) if isinstance(hashes, list) else 0)
    n = len(hashes)
    if f.get("medium") not in GPU_MEDIUMS or f.get("locality") not in (None, "LOCAL") or f.get("ownership") is not None:
        return Skipped("medium", n)
    if f.get("group_idx") not in (None, 0):
        return Skipped("group", n)
    if tag == "BlockRemoved":
        return Removed(hashes)
    if f.get("kv_cache_spec_kind") not in MAIN_KINDS:
        return Skipped("group", n)
    parent, tokens, block_size = f.get("parent_block_hash"), f.get("token_ids"), f.get("block_size")
    lora_name, lora_id, extra = f.get("lora_name"), f.get("lora_id"), f.get("extra_keys")
    if not (parent is None or _is_hash(parent)) or type(block_size) is not int or block_size < 1 \
            or not (lora_name is None or isinstance(lora_name, str)) or not (extra is None or isinstance(extra, list)) \
            or not (lora_id is None or (type(lora_id) is int and lora_id >= 0)):
        return Skipped("bad_field", n)
    if not isinstance(tokens, list) or not tokens:
        return Skipped("no_tokens", n)
    try:
        toks = np.array(tokens)
    except (ValueError, TypeError, OverflowError):
        return Skipped("bad_field", n)
    if len(toks) != n * block_size or toks.ndim != 1 or toks.dtype.kind not in "iu" or toks.min() < 0 or toks.max() >= 1 << 32:
        return Skipped("bad_field", n)
    # The namespace: the adapter's name, or (publishers that send only its id) the id.
    return Stored(hashes, parent, toks, block_size, lora_name, extra, lora_name if lora_name is not None else lora_id)


def _typed_decoder(array_like: bool):
    """A decoder of whole batches into structs declared as vLLM declares
    them (``token_ids`` left raw, for ``wire_tokens``), events encoded as
    maps or (``array_like``) positional arrays. It refuses any batch with an
    event it does not know; those take the generic path. (``defstruct``:
    the types are objects here, not annotations to evaluate.)"""
    opt = dict(array_like=array_like, tag=True, omit_defaults=True, gc=False)
    hash_, maybe = Union[int, bytes], lambda t: (Union[t, None], None)  # noqa: E731
    stored = msgspec.defstruct("BlockStored", [
        ("block_hashes", list[hash_]), ("parent_block_hash", Union[int, bytes, None]), ("token_ids", msgspec.Raw),
        ("block_size", int), ("lora_id", *maybe(int)), ("medium", *maybe(str)), ("lora_name", *maybe(str)),
        ("extra_keys", *maybe(list)), ("group_idx", *maybe(int)), ("kv_cache_spec_kind", *maybe(str)),
        ("kv_cache_spec_sliding_window", *maybe(int)), ("locality", *maybe(str)), ("ownership", *maybe(str)),
        ("session_id", *maybe(str)), ("lookahead_token_ids", *maybe(list)),
    ], **opt)
    removed = msgspec.defstruct("BlockRemoved", [
        ("block_hashes", list[hash_]), ("medium", *maybe(str)), ("group_idx", *maybe(int)),
        ("locality", *maybe(str)), ("ownership", *maybe(str)),
    ], **opt)
    cleared = msgspec.defstruct("AllBlocksCleared", [], **opt)
    batch = msgspec.defstruct("Batch", [("ts", Any), ("events", list[Union[stored, removed, cleared]]),
                                        ("rank", Any, None)], array_like=True, gc=False)
    return msgspec.msgpack.Decoder(batch).decode, stored, removed


_TYPED = [_typed_decoder(False), _typed_decoder(True)]


def _from_typed(e, stored_type, removed_type) -> Stored | Removed | Cleared | Skipped:
    """``decode_event`` for an event a typed decoder read."""
    if type(e) is not stored_type and type(e) is not removed_type:
        return Cleared()
    n = len(e.block_hashes)
    if e.medium not in GPU_MEDIUMS or e.locality not in (None, "LOCAL") or e.ownership is not None:
        return Skipped("medium", n)
    if e.group_idx not in (None, 0):
        return Skipped("group", n)
    if type(e) is removed_type:
        return Removed(e.block_hashes)
    if e.kv_cache_spec_kind not in MAIN_KINDS:
        return Skipped("group", n)
    if e.block_size < 1 or (e.lora_id is not None and e.lora_id < 0):
        return Skipped("bad_field", n)
    raw = np.frombuffer(e.token_ids, dtype=np.uint8)
    toks = np.empty(len(raw), dtype=np.int64)
    got = parse_tokens(raw, toks)
    if got == 0:
        return Skipped("no_tokens", n)
    if got != n * e.block_size:
        return Skipped("bad_field", n)
    namespace = e.lora_name if e.lora_name is not None else e.lora_id
    return Stored(e.block_hashes, e.parent_block_hash, toks[:got], e.block_size, e.lora_name, e.extra_keys, namespace)


def decode_events(payload) -> tuple[float | None, list]:
    """``(ts, normalised events)`` of a batch payload: decoded into typed
    structs when every event is one vLLM declares (the fast path), else
    generically, event by event. Raises MalformedError."""
    for decode, stored_type, removed_type in _TYPED:
        try:
            batch = decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue
        ts = batch.ts
        if type(ts) not in (int, float) or not math.isfinite(ts):
            ts = None
        return ts, [_from_typed(e, stored_type, removed_type) for e in batch.events]
    ts, events = decode_batch(payload)
    return ts, [decode_event(e) for e in events]


def decode_batch(payload: bytes) -> tuple[float | None, list]:
    """``(ts, events)`` of a batch payload; raises MalformedError."""
    try:
        batch = _decode(payload)
    except (msgspec.DecodeError, ValueError) as e:
        raise MalformedError(f"payload is not msgpack: {e}") from None
    if not isinstance(batch, (list, tuple)) or len(batch) < 2 or not isinstance(batch[1], list):
        raise MalformedError("payload is not a batch [ts, events, rank]")
    ts = batch[0]
    if type(ts) not in (int, float) or not math.isfinite(ts):
        ts = None
    return ts, batch[1]


def parse_frames(frames: list) -> tuple[int, bytes]:
    """``(sequence number, payload)`` of a published message (topic, seq,
    payload; bytes or buffers); raises MalformedError."""
    if len(frames) != 3 or len(frames[1]) != 8:
        raise MalformedError(f"expected 3 frames (topic, 8-byte sequence, payload), got {len(frames)}")
    return int.from_bytes(frames[1], "big"), frames[2]


def fold_hashes(hashes: list) -> np.ndarray:
    """``fold_hash`` of each, as an int64 array (vectorised for the common
    cases: every hash an int64, or every hash an uint64)."""
    if all(type(h) is int for h in hashes):  # NumPy would parse bytes of digits as numbers
        for dtype in (np.int64, np.uint64):
            try:
                return np.array(hashes, dtype=dtype).view(np.int64)
            except OverflowError:
                pass
    return np.array([fold_hash(h) for h in hashes], dtype=np.int64)


def fold_hash(h: int | bytes) -> int:
    """An engine block hash as the int64 a block's value holds: its low 64
    bits, two's complement (bytes: the first eight, little-endian)."""
    if isinstance(h, bytes):
        return int.from_bytes(h[:8].ljust(8, b"\0"), "little", signed=True)
    h &= (1 << 64) - 1
    return h - (1 << 64) if h >= 1 << 63 else h


def _pack(state: int, gen: int) -> int:
    """A segment block as one int: the ``(state, drop count)`` row of
    ``Writer.extend`` (a Python int is a third of the memory of the row)."""
    return gen << 32 | state


def _rows(packed: list[int]) -> np.ndarray:
    """``(state, drop count)`` rows of packed blocks."""
    v = np.array(packed, dtype=np.int64)
    rows = np.empty((len(v), 2), dtype=np.int64)
    np.bitwise_and(v, 0xFFFFFFFF, out=rows[:, 0])
    np.right_shift(v, 32, out=rows[:, 1])
    return rows


@dataclass
class _Partial:
    """An engine block that ends inside a segment block (its engine blocks
    are smaller): ``anchor`` is the packed row of the last complete segment
    block before it (None: the start of a prompt), ``pending`` the tokens
    after that up to and including it, ``prev`` the engine hash of the
    block before it in the same segment block (None if it is the first),
    and ``completes`` the packed rows of segment blocks later engine blocks
    completed: they are no longer held once this one goes."""

    anchor: int | None
    pending: tuple
    namespace: str | None
    prev: object = None
    completes: list = field(default_factory=list)


class OwnerFeed:
    """One owner's events, applied to a Writer: sequence numbers, the map
    from engine hash to segment block, regrouping of smaller engine blocks,
    and the counters in the owner's table entry.

    ``client`` is the client id its blocks record (the daemon gives every
    event source its own, so values, the engines' folded hashes, are
    unique per source). The map holds, per engine hash, the packed row of
    the segment block it completes (an int) or a ``_Partial``; it is as
    large as the engine's cache, whose removals shrink it.
    """

    def __init__(self, writer, owner: str, client: int) -> None:
        self.writer = writer
        self.owner = owner
        self.client = client
        self.block_size = writer.block_size
        self.blocks: dict[object, int | _Partial] = {}
        self.next_seq: int | None = None
        writer.attach_owner(owner, kind=OWNER_EVENTS)
        self.words = writer._owner_word(writer._owner_entry(owner))
        #: The owner holds blocks this feed has no map for (a daemon before
        #: this one stored them and its state was not saved): they are
        #: resynchronised at the first batch (``shmcache.ingest``).
        self.unsynced = int(self.words[O_BLOCKS]) > 0
        self._refused_size: int | None = None

    # --- state across daemons ----------------------------------------------------

    def export(self) -> dict:
        """This feed's state, for the next daemon of the segment: the next
        sequence number and the map, its blocks named by ``Writer.block_id``
        (a drop count means nothing to another Writer)."""
        def ident(packed: int | None) -> list | None:
            """The block's id, or None if it is gone or no longer held: its
            record may hold another block by now."""
            if packed is None:
                return None
            row = _rows([packed])[0]
            return list(self.writer.block_id(row)) if self.writer.holds(row, self.owner) else None

        blocks = []
        for h, b in self.blocks.items():
            if isinstance(b, int):
                if (i := ident(b)) is not None:
                    blocks.append([h, i])
            elif b.anchor is None or (a := ident(b.anchor)) is not None:
                blocks.append([h, None if b.anchor is None else a, list(b.pending), b.namespace, b.prev,
                               [c for c in map(ident, b.completes) if c is not None]])
        return {"next_seq": self.next_seq, "blocks": blocks}

    def restore(self, state: dict) -> None:
        """Take over an ``export``ed state. Blocks no longer there, or no
        longer held by this owner, are left out (as if removed)."""
        def row(ident):
            if ident is None:
                return None
            r = self.writer.find_block(tuple(ident), self.owner)
            return None if r is None else _pack(int(r[0]), int(r[1]))

        self.blocks.clear()
        for entry in state["blocks"]:
            h = entry[0]
            if len(entry) == 2:
                r = row(entry[1])
                if r is not None:
                    self.blocks[h] = r
            else:
                anchor = row(entry[1])
                if entry[1] is not None and anchor is None:
                    continue
                completes = [c for c in map(row, entry[5]) if c is not None]
                self.blocks[h] = _Partial(anchor, tuple(entry[2]), entry[3], entry[4], completes)
        self.next_seq = state["next_seq"]
        self.unsynced = False

    # --- counters ------------------------------------------------------------

    def count(self, word: int, n: int = 1) -> None:
        self.words[word] += n

    def skip(self, reason: str, blocks: int) -> None:
        self.words[SKIP[reason]] += max(blocks, 1)

    # --- batches ---------------------------------------------------------------

    def sequence(self, seq: int) -> tuple[int, int]:
        """Account for a batch numbered ``seq`` before applying it: returns
        ``(first missing, end)`` of the gap before it (empty when none). A
        sequence that goes back is a restarted publisher: the owner lets go
        of everything first."""
        if self.next_seq is not None and seq < self.next_seq:
            log.warning("owner %s: sequence went back from %d to %d (publisher restarted): dropping what it held",
                        self.owner, self.next_seq - 1, seq)
            self.count(O_RESTARTS)
            self.clear()
            return 0, seq  # the restarted publisher's batches before this one: a gap like any other
        if self.next_seq is not None and seq > self.next_seq:
            return self.next_seq, seq
        return seq, seq

    def apply_batch(self, seq: int, payload: bytes) -> None:
        """Apply one batch whose sequence was accounted for. The sequence
        moves past it whatever happens while applying it; the owner table
        shows the new sequence (and the batch counted) only once the batch
        is applied, so whoever reads it there may rely on the batch's effect."""
        self.next_seq = seq + 1
        try:
            try:
                ts, events = decode_events(payload)
            except MalformedError as e:
                self.count(O_MALFORMED)
                log.warning("owner %s: batch %d skipped: %s", self.owner, seq, e)
                return
            for event in events:
                self.apply(event)
            self.count(O_EVENTS, len(events))
            now = time.time()
            # A publisher's clock is its own: a lag is clamped, never trusted to fit.
            self.words[O_LAG_NS] = int(min(max((now - ts) * 1e9, 0.0), _MAX_LAG_NS)) if ts is not None else 0
            self.words[O_LAST_NS] = int(now * 1e9)
        finally:
            self.count(O_BATCHES)
            self.words[O_NEXT_SEQ] = self.next_seq & _U64

    def apply(self, ev: Stored | Removed | Cleared | Skipped) -> None:
        if isinstance(ev, Stored):
            self.store(ev)
        elif isinstance(ev, Removed):
            self.remove(ev.hashes)
        elif isinstance(ev, Cleared):
            self.count(O_CLEARS)
            self.clear()
        else:
            self.skip(ev.reason, ev.blocks)

    # --- the three events -----------------------------------------------------------

    def clear(self) -> None:
        self.count(O_REMOVED, self.writer.clear_owner(self.owner))
        self.blocks.clear()

    def remove(self, hashes: list) -> None:
        """The engine dropped these blocks: the owner lets go of the segment
        blocks they complete (and, as always, of everything below)."""
        pop = self.blocks.pop
        popped = [pop(h, None) for h in hashes]
        rows = [b for b in popped if type(b) is int]
        unknown = popped.count(None)
        if unknown:
            self.skip("unknown_block", unknown)
        if len(rows) + unknown < len(popped):
            for b in popped:
                if isinstance(b, _Partial):
                    rows.extend(b.completes)
        if rows:
            self.count(O_REMOVED, self.writer.release_refs(_rows(rows), self.owner))

    def store(self, ev: Stored) -> None:
        n = len(ev.hashes)
        if not self._accepts(ev.block_size, n):
            return
        if ev.parent is None:
            where = (None, (), ev.namespace, None)
        else:
            where = self._after(ev.parent)
            if where is None:
                return self.skip("parent", n)
        if ev.extra_keys is None and self.blocks.keys().isdisjoint(ev.hashes):
            self._insert(ev, 0, n, where)  # the usual case: all new, nothing to look at block by block
            return
        start = 0
        for i, h in enumerate(ev.hashes):
            if ev.extra_keys is not None and i < len(ev.extra_keys) and not _plain(ev.extra_keys[i], ev.lora_name):
                self._insert(ev, start, i, where)
                return self.skip("extra_keys", n - i)
            known = self.blocks.get(h)
            if isinstance(known, int) and not self.writer.holds(_rows([known])[0], self.owner):
                del self.blocks[h]  # let go of since (an ancestor removed, or evicted): stored anew
            elif known is not None:
                # Reported again (vLLM re-emits reused blocks, with a nil
                # parent): it is where it was; go on from there.
                if self._insert(ev, start, i, where) is None:
                    return
                where = self._after(h)
                start = i + 1
        self._insert(ev, start, n, where)

    def _after(self, h: object) -> tuple | None:
        """Where a block following engine block ``h`` goes: ``(anchor,
        pending, namespace, prev)``; None if ``h`` is not in the map."""
        b = self.blocks.get(h)
        if b is None:
            return None
        if isinstance(b, int):
            return b, (), None, None  # below a segment block the key chains from its key: no namespace needed
        return b.anchor, b.pending, b.namespace, h

    def _insert(self, ev: Stored, start: int, end: int, where: tuple) -> tuple | None:
        """Insert engine blocks ``start..end`` of ``ev`` (none of them known)
        after ``where``; returns where a block after them goes, or None if
        they could not be keyed (counted)."""
        if start == end:
            return where
        anchor, pending, ns, prev = where
        bs, seg = ev.block_size, self.block_size
        toks = ev.tokens[start * bs : end * bs]
        if pending:
            toks = np.concatenate([np.array(pending, dtype=toks.dtype), toks])
        n_full = len(toks) // seg
        ends = range(len(pending) + bs, len(pending) + (end - start) * bs + 1, bs)
        packed: list[int] = []
        if n_full:
            # A segment block's value: the folded hash of the engine block that completes it.
            values = fold_hashes(ev.hashes[start:end] if bs == seg else
                                 [ev.hashes[start + j] for j, e in enumerate(ends) if e % seg == 0])
            try:
                rows = self.writer.extend(None if anchor is None else _rows([anchor])[0], toks[: n_full * seg],
                                          values, owner=self.owner, namespace=ns, client=self.client)
            except CacheFullError as e:
                rows = e.rows  # the leading blocks it did cache (readers pinned while it evicted), if any
                if rows is None:
                    self.skip("full", end - start)
                    return None
            except InvalidInputError as e:
                log.warning("owner %s: %d blocks skipped: %s", self.owner, end - start, e)
                self.skip("duplicate", end - start)
                return None
            if rows is None:
                self.skip("parent", end - start)
                return None
            packed = ((rows[:, 1] << 32) | rows[:, 0]).tolist()  # _pack, for every row
            self.count(O_STORED, len(packed))
            if len(packed) < n_full:  # keep what was cached in the map; the rest is skipped
                kept = next(j for j, e in enumerate(ends) if e > len(packed) * seg)
                self.skip("full", end - start - kept)
                end, ends = start + kept, ends[:kept]
                if not kept:
                    return None
        if bs == seg and not pending:  # engine blocks are segment blocks: each completes one
            self.blocks.update(zip(ev.hashes[start:end], packed))
            return packed[-1], (), ns, None
        for j, e in enumerate(ends):
            h, full = ev.hashes[start + j], e // seg
            if e % seg == 0:
                row = packed[full - 1]
                self.blocks[h] = row
                while prev is not None:  # the earlier engine blocks of this segment block
                    b = self.blocks.get(prev)
                    if not isinstance(b, _Partial):
                        break
                    b.completes.append(row)
                    prev = b.prev
                where = (row, (), ns, None)
            else:
                base = packed[full - 1] if full else anchor
                self.blocks[h] = _Partial(base, tuple(toks[full * seg : e].tolist()), ns, prev)
                where = (base, self.blocks[h].pending, ns, h)
            prev = where[3]
        return where

    def _accepts(self, engine_block_size: int, n: int) -> bool:
        """Whether blocks of ``engine_block_size`` tokens can be regrouped
        into this segment's blocks (it must divide them); says once why not."""
        if self.block_size % engine_block_size == 0:
            return True
        if self._refused_size != engine_block_size:
            log.error("owner %s: engine block size %d does not divide the segment's block size %d: its blocks "
                      "are skipped (serve a segment whose block size is a multiple of the engine's)",
                      self.owner, engine_block_size, self.block_size)
            self._refused_size = engine_block_size
        self.skip("block_size", n)
        return False


def _plain(extra: object, lora_name: str | None) -> bool:
    """Whether a block's ``extra_keys`` entry adds nothing to its tokens but
    the LoRA name (which the namespace already keys)."""
    return extra is None or (lora_name is not None and isinstance(extra, (list, tuple)) and list(extra) == [lora_name])

