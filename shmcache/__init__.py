"""shmcache: a node-local prefix-cache index in POSIX shared memory.

One ``Writer`` process owns a segment; any number of ``Reader`` processes
attach and match prompts against it lock-free. See ``shmcache.layout`` for
the format and ``shmcache.matcher`` for the reader protocol.
"""

import sys

if sys.byteorder != "little":  # pragma: no cover - no big-endian host to test on
    raise ImportError("shmcache needs a little-endian host: the segment format is little-endian words")

from . import jitcache  # noqa: E402

_KERNEL_DIGEST = jitcache.source_digest()  # before the kernel modules load: see shmcache.jitcache
jitcache.lock_saves()  # before any kernel compiles: two processes' saves never share a data file

from .errors import (  # noqa: E402
    CacheFullError,
    ClosedError,
    DaemonUnavailableError,
    IncompatibleSegmentError,
    InvalidInputError,
    InvalidNameError,
    OwnerLimitError,
    PinLimitError,
    SegmentCorruptError,
    SegmentExistsError,
    SegmentNotFoundError,
    SegmentNotReadyError,
    SegmentPermissionError,
    SegmentRetiredError,
    SegmentSpaceError,
    ShmCacheError,
    WriterBusyError,
    WriterLostError,
)
from .keys import PrefixMatch, block_keys  # noqa: E402
from .pins import PinnedMatch  # noqa: E402
from .reader import Reader  # noqa: E402
from .segment import exists, unlink  # noqa: E402
from .writer import Writer, WriterPin  # noqa: E402
from .client import Client  # noqa: E402

jitcache.sync(_KERNEL_DIGEST)  # before any kernel loads from Numba's cache

__version__ = "0.1.0"

__all__ = [
    "Writer",
    "Reader",
    "Client",
    "PrefixMatch",
    "PinnedMatch",
    "WriterPin",
    "block_keys",
    "exists",
    "unlink",
    "ShmCacheError",
    "InvalidInputError",
    "InvalidNameError",
    "OwnerLimitError",
    "SegmentNotFoundError",
    "SegmentNotReadyError",
    "SegmentExistsError",
    "WriterBusyError",
    "WriterLostError",
    "IncompatibleSegmentError",
    "SegmentCorruptError",
    "SegmentPermissionError",
    "SegmentRetiredError",
    "SegmentSpaceError",
    "CacheFullError",
    "PinLimitError",
    "ClosedError",
    "DaemonUnavailableError",
]
