"""The shmcache segment format: every constant, offset and field, defined once.

A segment is one POSIX shared-memory object, ``/dev/shm/shmcache.<name>``,
made of two parts mapped separately:

* the **data part** ``[0, wregion_offset)``: header, state table and
  transition index. Only the writer maps it writable; readers map it
  read-only, so a stray write in a worker process cannot damage the cache.
* the **writable part** ``[wregion_offset, total_bytes)``: what readers
  write: the reader table and per-state hit stamps. Nothing in it can make a
  reader return a wrong answer; at worst it skews LRU order or statistics.

Everything is little-endian uint64 words; offsets below are word indices
into the part they belong to, unless named ``*_BYTES``/``*_OFFSET``.

Header (data part, words 0..511, one 4 KiB page)
------------------------------------------------
Identity and geometry are written once at create, before ``H_MAGIC``, and
never change. Attach trusts none of them until ``validate_header`` has
recomputed the geometry from ``capacity``/``block_size`` and compared it
with what is recorded and with the object's real size.

============  ====  ==========================================================
field         word  meaning
============  ====  ==========================================================
MAGIC            0  ``b"SHMCACHE"``; written last at create (release store)
VERSION          1  ``LAYOUT_VERSION``; a reader refuses any other
BLOCK_SIZE       2  tokens per block
CAPACITY         3  number of state records (blocks)
INDEX_SLOTS      4  slots in the transition index (``2 * capacity``)
READER_SLOTS     5  records in the reader table
STATES_OFFSET    6  byte offset of the state table
INDEX_OFFSET     7  byte offset of the transition index
WREGION_OFFSET   8  byte offset of the writable part (mmap-aligned)
TOTAL_BYTES      9  size of the shared-memory object
SEED_LO/HI   10,11  per-segment key seed (see ``shmcache.hashing``)
INCARNATION     12  random id of this creation of the name
CREATED_NS      13  creation time, ns since the epoch
READER_PINS     14  pin entries per reader slot (a multiple of 16)
OWNERS_OFFSET   15  byte offset of the owner table
WRITER_PID      16  pid of the writer holding the segment, 0 when none; for
                    people only (liveness is the writer lock, below)
WRITER_PIDNS    17  inode of that pid's PID namespace (``identity``)
WRITER_EPOCH    18  number of writers that have held the segment
WRITER_CLAIM    19  random id of the current writer's claim: a Writer checks
                    it before every operation and stops if it changed
MUTATIONS       24  seqlock word: odd while the writer mutates, +2 per op
CLOCK           25  logical time: +2 per writer operation; reader hits stamp CLOCK+1
MAX_PROBE       26  longest index probe distance ever stored (bounds lookups)
RETIRED         27  non-zero once the segment is being removed: a reader that
                    still maps it must stop answering from it
EVICTING        28  state + 1 of the leaf the writer is about to evict, 0 when
                    none: the writer's half of the reader-pin handshake
OWNERS_EPOCH    29  seqlock word of the owner table's names: odd while an
                    entry is named or renamed, +2 per change
LIVE            32  states in use
PINNED          33  protected states (pinned, or above a pinned state)
INSERTED..      34+ lifetime counters (see ``H_*`` below)
============  ====  ==========================================================

MUTATIONS/CLOCK/MAX_PROBE share one cache line that the writer writes every
operation and every reader reads twice a match; the identity words sit on
their own line so a reader's fast path never touches them.

State record (data part, ``RECORD_WORDS`` = 8 words = one 64-byte line)
-----------------------------------------------------------------------
A reader touching a state touches exactly one cache line. A state's child
is usually the next record (the writer's free stack, ``wstate``), where a
reader looks first (``matcher._NEXT_BIAS``); nothing depends on it.

=======  ====  ===============================================================
field    word  meaning
=======  ====  ===============================================================
VERSION     0  even: stable; odd: being written. +1 before and +1 after every
               change (+2 after a change of OWNERS alone: ``set_owners``),
               never reset, so a reused record never repeats a value
KEY_LO      1  low 64 bits of the chained 128-bit block key
KEY_HI      2  high 64 bits
VALUE       3  the engine's int64 (KV block id, host slot, ...)
LINK        4  low 32: ``LINK_FREE`` (0), ``LINK_ROOT`` (1) or parent+2;
               high 32: id of the client that inserted it (0 for the
               embedded writer; the daemon's clients and event sources
               have their own, see ``shmcache.daemon``)
RECENCY     5  CLOCK of the writer's last use (LRU); writer-only
PINS        6  low 32: own pin count (per-block reference count);
               high 32: pinned states in the subtree, itself included. A
               state is *protected* (never evicted) while this is > 0;
               writer-only, rebuilt by recovery
OWNERS      7  presence: bit ``i`` set while owner-table entry ``i`` holds
               the block (0: held by no named owner)
=======  ====  ===============================================================

Invariants (checked by ``Writer.check``): a live record's parent is live or
the root; every subtree pin count is exact; every live
record is found through the index under its key, and every index slot points
at a live record whose key carries the slot's tag; LIVE and PINNED match;
an owner holds a block only if it holds its parent (a child's OWNERS bits
are a subset of its parent's), and each owner's BLOCKS is the number of
records with its bit.

Owner table (data part, ``MAX_OWNERS`` entries of ``OWNER_WORDS`` words at OWNERS_OFFSET)
------------------------------------------------------------------------------------------
Named owners (a data-parallel rank, an engine, a client) and, for those
fed by KV events, their event source's counters. Entry ``i`` is bit ``i``
of every record's OWNERS word. Names change only under OWNERS_EPOCH, and
an entry is renamed only while it holds no block, so a reader that saw
OWNERS_EPOCH even and unchanged across a walk maps every bit it read to
the right name. Counters are single words, written by the writer's process
only, and read without a lock (each is exact; two may be from different
instants).

==========  =====  ==========================================================
field       word   meaning
==========  =====  ==========================================================
NAME_LEN        0  bytes of the name; 0: the entry is free
NAME         1..8  the name (1-64 bytes of ``[A-Za-z0-9._:@/-]``), zero-padded
BLOCKS          9  blocks it holds
KIND           10  ``OWNER_CLIENT`` or ``OWNER_EVENTS``: what feeds it
ATTACHED       11  1 while its client is connected or its publisher subscribed
NEXT_SEQ       12  event sequence number expected next; 0 before the first
BATCHES..      13+ event-source counters (``O_*`` below, ``SKIP_REASONS``)
==========  =====  ==========================================================

Transition index (data part, ``INDEX_SLOTS`` words)
---------------------------------------------------
Open addressing, linear probing, backward-shift deletion, load <= 1/2. A slot
is 0 (empty) or ``(key_lo & TAG_MASK) | (state + 1)``; the home slot of a
key is ``(key_hi * INDEX_SLOTS) >> 64``. The tag lets a probe skip foreign
slots without touching their records. The index is derived data: recovery
rebuilds it from the state table.

Writable part
-------------
Word offsets into the writable part:

===========  ===============================  ======================================================
byte                  held by
====================  ======================================================
``LOCK_WRITER``       the writer, from before the header exists (create) or
                      from its claim (``Writer.open``) until it closes or dies
``LOCK_READER0 + i``  the reader holding slot ``i``, from its claim until it
                      closes or dies; the writer, briefly, while it clears
                      the pins a dead holder left there
====================  ======================================================
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
from numba.extending import register_jitable

MAGIC = int.from_bytes(b"SHMCACHE", "little")
LAYOUT_VERSION = 4

HEADER_WORDS = 512
HEADER_BYTES = HEADER_WORDS * 8
#: mmap offsets must be multiples of the allocation granularity; 64 KiB
#: covers every page size Linux uses on x86-64 and AArch64.
REGION_ALIGN = max(65536, mmap.ALLOCATIONGRANULARITY)

# --- header words ---------------------------------------------------------
H_MAGIC = 0
H_VERSION = 1
H_BLOCK_SIZE = 2
H_CAPACITY = 3
H_INDEX_SLOTS = 4
H_READER_SLOTS = 5
H_STATES_OFFSET = 6
H_INDEX_OFFSET = 7
H_WREGION_OFFSET = 8
H_TOTAL_BYTES = 9
H_SEED_LO = 10
H_SEED_HI = 11
H_INCARNATION = 12
H_CREATED_NS = 13
H_READER_PINS = 14
H_OWNERS_OFFSET = 15
H_WRITER_PID = 16
H_WRITER_PIDNS = 17
H_WRITER_EPOCH = 18
H_WRITER_CLAIM = 19
H_MUTATIONS = 24
H_CLOCK = 25
H_MAX_PROBE = 26
H_RETIRED = 27
H_EVICTING = 28
H_OWNERS_EPOCH = 29
H_LIVE = 32
H_PINNED = 33
H_INSERTED = 34
H_EVICTED = 35
H_REMOVED = 36
H_CLEARS = 37
H_RECOVERED = 38
H_WRITER_MATCHES = 39
H_WRITER_QUERY_BLOCKS = 40
H_WRITER_HIT_BLOCKS = 41

# --- state record ----------------------------------------------------------
RECORD_WORDS = 8
RECORD_BYTES = RECORD_WORDS * 8
R_VERSION = 0
R_KEY_LO = 1
R_KEY_HI = 2
R_VALUE = 3
R_LINK = 4
R_RECENCY = 5
R_PINS = 6
R_OWNERS = 7

LINK_FREE = 0
LINK_ROOT = 1
LINK_PARENT_BIAS = 2
LOW32 = 0xFFFFFFFF

# --- owner table ------------------------------------------------------------
MAX_OWNERS = 64  # the bits of a record's OWNERS word
OWNER_WORDS = 48
OWNERS_BYTES = MAX_OWNERS * OWNER_WORDS * 8
MAX_OWNER_NAME = 64
O_NAME_LEN = 0
O_NAME = 1
O_BLOCKS = 9
O_KIND = 10
O_ATTACHED = 11
O_NEXT_SEQ = 12
O_BATCHES = 13  # batches applied
O_EVENTS = 14  # events applied
O_STORED = 15  # blocks stored (new to this owner)
O_REMOVED = 16  # blocks this owner released (BlockRemoved, clears, restarts)
O_LOST = 17  # batches missed and not recovered by replay
O_HEALED = 18  # batches recovered from the replay socket
O_RESTARTS = 19  # times the sequence went back (publisher restarted)
O_CLEARS = 20  # AllBlocksCleared events
O_LAG_NS = 21  # latest batch: wall-clock ns from its timestamp to applied
O_LAST_NS = 22  # wall-clock ns when the latest batch was applied
O_MALFORMED = 23  # messages that could not be decoded (bad frames, payload)
O_SKIPPED = 24  # first of ``len(SKIP_REASONS)`` counters of blocks not keyed
OWNER_CLIENT = 1
OWNER_EVENTS = 2
#: Why an event's blocks were not keyed, in the order of their counters.
SKIP_REASONS = (
    "group",  # another KV-cache group than the main one (sliding window, mamba, ...)
    "medium",  # stored in an offload tier (CPU, disk), not the GPU
    "extra_keys",  # multimodal or salted blocks: the tokens alone are not the key
    "no_tokens",  # the event carries no (or too few) token ids
    "parent",  # parent block never stored by this owner (or no longer held)
    "block_size",  # an engine block size that does not divide the segment's
    "unknown_type",  # an event type this version does not know
    "bad_field",  # a field of the wrong type or value (a hash that is not an int or bytes, ...)
    "full",  # no room: every block pinned
    "duplicate",  # a block hash the owner already used for other tokens
    "unknown_block",  # a BlockRemoved of a block the owner never stored (or whose store was skipped)
)
assert O_SKIPPED + len(SKIP_REASONS) <= OWNER_WORDS

# --- transition index ------------------------------------------------------
INDEX_LOAD_INVERSE = 2
TAG_MASK = 0xFFFFFFFF00000000
SLOT_STATE_MASK = 0xFFFFFFFF

# --- writable part -----------------------------------------------------------
W_HEADER_WORDS = 8
W_PIN_SEQ = 0
READERS_WORD = W_HEADER_WORDS
READER_SLOTS = 256
READER_WORDS = 8
RD_PID = 0
RD_PIDNS = 1
RD_QUERIES = 2
RD_QUERY_BLOCKS = 3
RD_HIT_BLOCKS = 4
RD_PIN_SEQ = 5
RD_PINNED = 6
#: Pin entries per reader slot unless the creator asks otherwise: thousands
#: of blocks (a few long prompts) per worker process, 4 MiB per segment.
DEFAULT_READER_PINS = 4096
PIN_ALIGN = 16  # entries: keeps each slot's pin area on its own cache lines
MAX_READER_PINS = 1 << 20


@register_jitable
def reader_word(slot: int, field: int) -> int:
    """Word of the writable part holding ``field`` (``RD_*``) of reader
    ``slot``. A plain function in Python, inlined into the kernels."""
    return READERS_WORD + slot * READER_WORDS + field


# --- lock bytes (offsets into the shared-memory object) ----------------------
LOCK_WRITER = 0
LOCK_READER0 = 1


def reader_lock_byte(slot: int) -> int:
    """The byte whose lock marks reader ``slot`` as held by a live process."""
    return LOCK_READER0 + slot

# --- limits ------------------------------------------------------------------
MAX_CAPACITY = (1 << 31) - 1
MAX_BLOCK_SIZE = 1 << 16

# --- geometry vector handed to kernels (trusted, built at attach) -----------
G_CAPACITY = 0
G_BLOCK_SIZE = 1
G_STATES = 2  # word offset of the state table in the data part
G_INDEX = 3  # word offset of the index in the data part
G_SLOTS = 4
G_HITS = 5  # word offset of the hit stamps in the writable part
G_READER_SLOTS = 6
G_SLOT = 7  # the calling reader's slot in the reader table (-1: none); per process
G_PINS = 8  # uint32 offset of the pin area in the writable part
G_READER_PINS = 9
G_OWNERS = 10  # word offset of the owner table in the data part
G_WORDS = 11


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class Geometry:
    """Sizes and offsets of one segment, all derived from capacity and block size."""

    capacity: int
    block_size: int
    index_slots: int
    reader_slots: int
    owners_offset: int
    states_offset: int
    index_offset: int
    wregion_offset: int
    hits_offset: int  # bytes, from the start of the writable part
    reader_pins: int
    pins_offset: int  # bytes, from the start of the writable part
    total_bytes: int

    @classmethod
    def for_capacity(cls, capacity: int, block_size: int, reader_pins: int | None = None) -> "Geometry":
        """The one geometry a segment of this capacity, block size and
        per-reader pin count has. ``reader_pins`` defaults to
        ``DEFAULT_READER_PINS``, or the capacity if smaller, rounded up to a
        multiple of ``PIN_ALIGN``."""
        if reader_pins is None:
            reader_pins = min(DEFAULT_READER_PINS, capacity)
        reader_pins = _round_up(max(reader_pins, 1), PIN_ALIGN)
        index_slots = max(16, INDEX_LOAD_INVERSE * capacity)
        owners_offset = HEADER_BYTES
        states_offset = owners_offset + OWNERS_BYTES
        index_offset = states_offset + capacity * RECORD_BYTES
        wregion_offset = _round_up(index_offset + index_slots * 8, REGION_ALIGN)
        hits_offset = (READERS_WORD + READER_SLOTS * READER_WORDS) * 8
        pins_offset = hits_offset + capacity * 8
        total = _round_up(wregion_offset + pins_offset + READER_SLOTS * reader_pins * 4, REGION_ALIGN)
        return cls(
            capacity=capacity,
            block_size=block_size,
            index_slots=index_slots,
            reader_slots=READER_SLOTS,
            owners_offset=owners_offset,
            states_offset=states_offset,
            index_offset=index_offset,
            wregion_offset=wregion_offset,
            hits_offset=hits_offset,
            reader_pins=reader_pins,
            pins_offset=pins_offset,
            total_bytes=total,
        )

    def header_fields(self) -> dict[int, int]:
        """The header words that record this geometry."""
        return {
            H_BLOCK_SIZE: self.block_size,
            H_CAPACITY: self.capacity,
            H_INDEX_SLOTS: self.index_slots,
            H_READER_SLOTS: self.reader_slots,
            H_READER_PINS: self.reader_pins,
            H_OWNERS_OFFSET: self.owners_offset,
            H_STATES_OFFSET: self.states_offset,
            H_INDEX_OFFSET: self.index_offset,
            H_WREGION_OFFSET: self.wregion_offset,
            H_TOTAL_BYTES: self.total_bytes,
        }

    def vector(self) -> np.ndarray:
        """The ``G_*`` vector kernels take: offsets in words, per part."""
        g = np.zeros(G_WORDS, dtype=np.int64)
        g[G_CAPACITY] = self.capacity
        g[G_BLOCK_SIZE] = self.block_size
        g[G_STATES] = self.states_offset // 8
        g[G_INDEX] = self.index_offset // 8
        g[G_SLOTS] = self.index_slots
        g[G_HITS] = self.hits_offset // 8
        g[G_READER_SLOTS] = self.reader_slots
        g[G_SLOT] = -1
        g[G_PINS] = self.pins_offset // 4
        g[G_READER_PINS] = self.reader_pins
        g[G_OWNERS] = self.owners_offset // 8
        return g

    @property
    def bytes_per_block(self) -> float:
        return self.total_bytes / self.capacity


def check_geometry_args(capacity: object, block_size: object, reader_pins: object = 1) -> None:
    """Raise ``InvalidInputError`` unless capacity, block size and pins per reader are usable."""
    from .errors import InvalidInputError

    for name, v, hi in (("capacity", capacity, MAX_CAPACITY), ("block_size", block_size, MAX_BLOCK_SIZE),
                        ("reader_pins", reader_pins, MAX_READER_PINS)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InvalidInputError(f"{name} must be an int, got {type(v).__name__}")
        if not 1 <= int(v) <= hi:
            raise InvalidInputError(f"{name} must be between 1 and {hi}, got {int(v)}")
