"""The exceptions shmcache raises; ``ShmCacheError`` is the root of all of them.

Each also derives from the builtin a caller would naturally catch (a bad
argument is a ``ValueError``, a missing segment a ``FileNotFoundError``), so
code that does not know shmcache still handles them sensibly. Every message
says what to do next. No error leaves a segment half-changed: input is
validated before the writer mutates anything.
"""

from __future__ import annotations


class ShmCacheError(Exception):
    """Root of every exception shmcache raises."""


class InvalidInputError(ShmCacheError, ValueError):
    """An argument has the wrong type, shape, dtype or range."""


class InvalidNameError(InvalidInputError):
    """A segment name is not 1-200 characters of ``[A-Za-z0-9_.-]``."""


class SegmentNotFoundError(ShmCacheError, FileNotFoundError):
    """No segment exists under that name."""


class SegmentExistsError(ShmCacheError, FileExistsError):
    """``Writer.create`` found the name already taken."""


class WriterBusyError(ShmCacheError):
    """A live process already holds the segment's writer lock.

    ``pid`` is that process's id.
    """

    def __init__(self, message: str, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


class WriterLostError(ShmCacheError):
    """This Writer no longer holds its segment (another writer claimed it,
    or the segment was removed): it refused to write. Close it."""


class SegmentNotReadyError(ShmCacheError):
    """The segment is still being created by a live writer: attach again
    in a moment."""


class IncompatibleSegmentError(ShmCacheError):
    """The object is not a shmcache segment of this layout version, or its size is wrong."""


class SegmentRetiredError(ShmCacheError):
    """The segment this handle maps was removed (perhaps recreated under the
    same name): attach again to see the current one."""


class SegmentCorruptError(ShmCacheError):
    """A structural invariant does not hold. ``violations`` lists each one."""

    def __init__(self, message: str, violations: list[str] | None = None) -> None:
        super().__init__(message)
        self.violations = list(violations or [])


class SegmentPermissionError(ShmCacheError, PermissionError):
    """The segment belongs to another user or is open to other users."""


class SegmentSpaceError(ShmCacheError, OSError):
    """``/dev/shm`` cannot hold a segment of the requested capacity."""


class CacheFullError(ShmCacheError):
    """An insert needs more room than eviction can free (the rest is pinned).

    ``inserted_blocks`` is how many of the prompt's new blocks were cached
    anyway: 0, unless readers pinned blocks while the insert was evicting,
    in which case the ``inserted_blocks`` blocks after the first
    ``cached_tokens`` tokens (what ``insert`` would have returned) are
    cached, their values now the cache's, and the rest are not.
    """

    def __init__(self, message: str, inserted_blocks: int = 0, cached_tokens: int = 0) -> None:
        super().__init__(message)
        self.inserted_blocks = inserted_blocks
        self.cached_tokens = cached_tokens
        #: From ``Writer.extend``: the rows of the blocks now cached (the
        #: leading ones), when ``inserted_blocks`` > 0; else None.
        self.rows = None


class PinLimitError(ShmCacheError):
    """A Reader cannot pin more: its pin entries are used up, or it has no
    reader-table slot."""


class OwnerLimitError(ShmCacheError):
    """Every entry of the segment's owner table is taken by an owner that
    holds blocks or is connected, so another owner cannot be added."""


class DaemonUnavailableError(ShmCacheError, ConnectionError):
    """The writer daemon is not reachable (not started, dead, or not answering).

    Matching through a Client keeps working: it reads the segment directly.
    """


class ClosedError(ShmCacheError):
    """The Writer or Reader was closed."""
