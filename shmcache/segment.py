"""POSIX shared-memory objects: naming, exclusive creation, validated attach, mapping.

This module owns the operating-system side of a segment; ``shmcache.layout``
owns what is inside it. It uses posix_ipc rather than
``multiprocessing.shared_memory`` because, before Python 3.13, the latter's
resource tracker unlinks segments that other processes still use
(CPython gh-82300): a reader here never unlinks anything.

Platform caveats: Linux (``/dev/shm`` is tmpfs). Creation reserves every
byte up front with ``posix_fallocate``, so a full ``/dev/shm`` fails at
create with ``SegmentSpaceError`` rather than with SIGBUS on a later write.
Objects are created with ``O_CREAT | O_EXCL`` (never adopted) and mode 0600
unless the creator asks for another; attach checks the owner uid, the mode
and the size before it trusts a byte of the header.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field

import numpy as np
import posix_ipc

from . import liveness
from .atomics import publish_word
from .errors import (
    IncompatibleSegmentError,
    InvalidInputError,
    InvalidNameError,
    SegmentExistsError,
    SegmentNotFoundError,
    SegmentNotReadyError,
    SegmentPermissionError,
    SegmentSpaceError,
)
from .layout import (
    H_CAPACITY,
    H_BLOCK_SIZE,
    H_CREATED_NS,
    H_INCARNATION,
    H_MAGIC,
    H_READER_PINS,
    H_RETIRED,
    H_SEED_HI,
    H_SEED_LO,
    H_VERSION,
    HEADER_BYTES,
    HEADER_WORDS,
    LAYOUT_VERSION,
    LOCK_WRITER,
    MAGIC,
    MAX_BLOCK_SIZE,
    MAX_CAPACITY,
    MAX_READER_PINS,
    Geometry,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
PREFIX = "shmcache."


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid segment name, else raise InvalidNameError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidNameError(
            f"invalid segment name {name!r}: use 1-200 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit (it becomes /dev/shm/shmcache.<name>)"
        )
    return name


def shm_path(name: str) -> str:
    """The POSIX name of the segment's shared-memory object."""
    return "/" + PREFIX + name


def sem_path(name: str) -> str:
    """The POSIX name of the segment's writer semaphore."""
    return "/" + PREFIX + name + ".writer"


#: Size of a glibc named semaphore's file (``sizeof(sem_t)`` on 64-bit
#: Linux); a shorter file would fault (SIGBUS) the process that waits on it.
SEM_BYTES = 32


def check_semaphore(name: str) -> None:
    """Refuse a writer semaphore that another user owns or others may post.

    Linux keeps named semaphores as ``/dev/shm/sem.<name>`` files; one made
    by someone else (before us, or after ours was unlinked) would let them
    play with the claim gate, and a truncated one would crash whoever waits
    on it. Raises SegmentPermissionError.
    """
    path = "/dev/shm/sem." + sem_path(name)[1:]
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o022 or not stat.S_ISREG(st.st_mode) or st.st_size < SEM_BYTES:
        raise SegmentPermissionError(
            f"the writer semaphore of segment {name!r} ({path}) belongs to uid {st.st_uid} with mode "
            f"{stat.S_IMODE(st.st_mode):04o}: it was not made by this segment's writer; "
            "check who made it, then remove it with shmcache.unlink(name)"
        )


@dataclass
class Mapping:
    """A segment mapped into this process.

    ``data`` views the data part (read-only unless mapped by the writer),
    ``wdata`` the writable part. ``close`` drops the views and unmaps; the
    arrays must not be used after it. If the caller still holds a view of its
    own, the mapping is released when that view is garbage-collected.
    """

    name: str
    geometry: Geometry
    data: np.ndarray
    wdata: np.ndarray
    maps: list[mmap.mmap] = field(repr=False)
    fd: int = -1  # a descriptor of the object, kept to notice resizing

    def resized(self) -> bool:
        """Whether the object's size is no longer the one it was mapped with.

        A shrunk object's missing pages raise SIGBUS when touched, so this
        only asks the kernel (fstat) and touches none of them.
        """
        return os.fstat(self.fd).st_size != self.geometry.total_bytes

    def close(self) -> None:
        self.data = self.wdata = None  # type: ignore[assignment]
        for m in self.maps:
            try:
                m.close()
            except BufferError:
                pass
        self.maps = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: The writer's whole-segment mapping is pre-faulted (MAP_POPULATE): the
#: pages are reserved at create anyway, and a first touch inside an insert
#: costs a page fault per 4 KB, which a fresh segment's inserts measured at
#: up to twice their time. Readers map lazily: attach stays fast.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _map(fd: int, length: int, offset: int, writable: bool, populate: bool = False) -> mmap.mmap:
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    flags = mmap.MAP_SHARED | (_POPULATE if populate else 0)
    return mmap.mmap(fd, length, flags=flags, prot=prot, offset=offset)


def _words(m: mmap.mmap) -> np.ndarray:
    return np.frombuffer(m, dtype=np.uint64)


def _open_object(name: str) -> posix_ipc.SharedMemory:
    try:
        return posix_ipc.SharedMemory(shm_path(name))
    except posix_ipc.ExistentialError:
        raise SegmentNotFoundError(
            f"no shmcache segment named {name!r} (/dev/shm{shm_path(name)}): "
            "start its writer first (Writer.create or `shmcache serve`)"
        ) from None


def create(name: str, geometry: Geometry, mode: int, seed: tuple[int, int], words: dict[int, int]) -> Mapping:
    """Create, reserve, initialise and map a new segment, writable, holding
    its writer lock (``LOCK_WRITER``) through the returned mapping's ``fd``.

    The lock is taken as soon as the object exists, so an attacher that
    finds it uninitialised can tell a creator at work from one that died.
    The header's identity, geometry and ``words`` (header word -> value)
    are written, then MAGIC last with a release store, so an attacher that
    sees MAGIC sees a complete header. Raises SegmentExistsError if the
    name is taken, SegmentSpaceError if ``/dev/shm`` cannot hold it
    (nothing is left behind then).
    """
    try:
        shm = posix_ipc.SharedMemory(shm_path(name), posix_ipc.O_CREX, mode=mode)
    except posix_ipc.ExistentialError:
        raise SegmentExistsError(
            f"segment {name!r} already exists: Writer.open({name!r}) takes it over, "
            f"or shmcache.unlink({name!r}) removes it"
        ) from None
    try:
        if not liveness.try_lock(shm.fd, LOCK_WRITER):  # only a process that broke into a new inode could hold it
            raise SegmentExistsError(f"segment {name!r} was opened by another process while being created")
        os.fchmod(shm.fd, mode)
        try:
            os.posix_fallocate(shm.fd, 0, geometry.total_bytes)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                raise SegmentSpaceError(
                    e.errno,
                    f"/dev/shm cannot hold segment {name!r} ({geometry.total_bytes / 2**20:.1f} MiB for "
                    f"capacity {geometry.capacity}): free space there or ask for a smaller capacity",
                ) from None
            raise
        m = _map(shm.fd, geometry.total_bytes, 0, writable=True, populate=True)
    except BaseException:
        shm.close_fd()
        posix_ipc.unlink_shared_memory(shm_path(name))
        raise
    fd = os.dup(shm.fd)
    shm.close_fd()
    header = _words(m)
    for word, value in {**geometry.header_fields(), **words}.items():
        header[word] = value
    header[H_VERSION] = LAYOUT_VERSION
    header[H_SEED_LO], header[H_SEED_HI] = seed
    header[H_INCARNATION] = secrets.randbits(64)
    header[H_CREATED_NS] = time.time_ns()
    publish_word(header, H_MAGIC, np.uint64(MAGIC))
    woff = geometry.wregion_offset // 8
    return Mapping(name, geometry, header[:woff], header[woff:], [m], fd)


def validate_header(words: np.ndarray, size: int, name: str) -> Geometry:
    """Recompute the geometry from the header and check it against the object.

    ``words`` is a private copy of the header. Raises IncompatibleSegmentError
    on a wrong magic, layout version, geometry or size.
    """
    if int(words[H_MAGIC]) != MAGIC:
        raise IncompatibleSegmentError(
            f"/dev/shm{shm_path(name)} is not an initialised shmcache segment (bad magic): "
            "if its creator crashed, remove it with shmcache.unlink(name) and create it again"
        )
    version = int(words[H_VERSION])
    if version != LAYOUT_VERSION:
        raise IncompatibleSegmentError(
            f"segment {name!r} has layout version {version}, this shmcache reads version "
            f"{LAYOUT_VERSION}: attach with the shmcache release that created it, or recreate it"
        )
    capacity, block_size = int(words[H_CAPACITY]), int(words[H_BLOCK_SIZE])
    reader_pins = int(words[H_READER_PINS])
    if not (1 <= capacity <= MAX_CAPACITY and 1 <= block_size <= MAX_BLOCK_SIZE and 1 <= reader_pins <= MAX_READER_PINS):
        raise IncompatibleSegmentError(
            f"segment {name!r} has an impossible capacity {capacity}, block size {block_size} or pins per "
            f"reader {reader_pins}: it is damaged; remove it with shmcache.unlink(name) and create it again"
        )
    geometry = Geometry.for_capacity(capacity, block_size, reader_pins)
    for word, expected in geometry.header_fields().items():
        if int(words[word]) != expected:
            raise IncompatibleSegmentError(
                f"segment {name!r}: header word {word} is {int(words[word])}, expected {expected} for "
                f"capacity {capacity}: it is damaged; remove it with shmcache.unlink(name) and create it again"
            )
    if size != geometry.total_bytes:
        raise IncompatibleSegmentError(
            f"segment {name!r} is {size} bytes, its header says {geometry.total_bytes}: it was "
            "truncated or resized; remove it with shmcache.unlink(name) and create it again"
        )
    return geometry


#: How long ``attach`` waits for a segment that a live writer is creating.
READY_WAIT_S = 2.0


def _initialised_header(fd: int) -> np.ndarray | None:
    """A private copy of the header, or None while its creator has not yet
    reserved the object or published MAGIC (a zero first word)."""
    if os.fstat(fd).st_size < HEADER_BYTES:
        return None
    head = _map(fd, HEADER_BYTES, 0, writable=False)
    try:
        header = _words(head)[:HEADER_WORDS].copy()
    finally:
        head.close()
    return None if int(header[H_MAGIC]) == 0 else header


def _await_creator(name: str, fd: int) -> np.ndarray:
    """The header of a segment found uninitialised, once its creator has
    published it; waits up to ``READY_WAIT_S`` on the writer semaphore,
    which a creator holds until the header is complete.

    Raises SegmentNotReadyError while the creator (the holder of the writer
    lock) is still at work, IncompatibleSegmentError if no live process
    holds it: the creator died before finishing.
    """
    try:
        check_semaphore(name)
        gate = posix_ipc.Semaphore(sem_path(name))
    except (posix_ipc.ExistentialError, SegmentPermissionError):
        gate = None  # none, or not one to trust: the lock below still tells
    if gate is not None:
        try:
            gate.acquire(READY_WAIT_S)
            gate.release()
        except posix_ipc.BusyError:
            pass
        finally:
            gate.close()
    header = _initialised_header(fd)
    if header is not None:
        return header
    if liveness.is_held(fd, LOCK_WRITER):
        raise SegmentNotReadyError(
            f"segment {name!r} is still being created by its writer after {READY_WAIT_S:.0f} s (a large "
            "segment takes a while to reserve): attach again in a moment"
        )
    raise IncompatibleSegmentError(
        f"/dev/shm{shm_path(name)} was never initialised and no writer is creating it (its creator died "
        f"during create): remove it with shmcache.unlink({name!r}) and create it again"
    )


def attach(name: str, writable: bool, allow_other_owner: bool = False) -> Mapping:
    """Map an existing segment after checking owner, mode, size and header.

    ``writable=False`` maps the data part read-only (readers);
    ``writable=True`` maps everything read-write (the writer). A segment
    that a live writer is still creating is waited for (``READY_WAIT_S``),
    then refused with SegmentNotReadyError.
    """
    validate_name(name)
    shm = _open_object(name)
    try:
        st = os.fstat(shm.fd)
        if st.st_uid != os.geteuid() and not allow_other_owner:
            raise SegmentPermissionError(
                f"segment {name!r} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): "
                "attach as its owner, or pass allow_other_owner=True if you trust that user"
            )
        if stat.S_IMODE(st.st_mode) & 0o022:
            raise SegmentPermissionError(
                f"segment {name!r} has mode {stat.S_IMODE(st.st_mode):04o}, writable by other users, "
                "who could corrupt it: remove it with shmcache.unlink(name) and recreate it with a safe mode"
            )
        header = _initialised_header(shm.fd)
        if header is None:
            header = _await_creator(name, shm.fd)
        st = os.fstat(shm.fd)
        geometry = validate_header(header, st.st_size, name)
        woff = geometry.wregion_offset
        if writable:
            m = _map(shm.fd, geometry.total_bytes, 0, writable=True, populate=True)
            words = _words(m)
            return Mapping(name, geometry, words[: woff // 8], words[woff // 8 :], [m], os.dup(shm.fd))
        ro = _map(shm.fd, woff, 0, writable=False)
        rw = _map(shm.fd, geometry.total_bytes - woff, woff, writable=True)
        return Mapping(name, geometry, _words(ro), _words(rw), [ro, rw], os.dup(shm.fd))
    finally:
        shm.close_fd()


def exists(name: str) -> bool:
    """Whether a segment object exists under ``name``."""
    return os.path.exists("/dev/shm/" + PREFIX + validate_name(name))


def state_path(name: str) -> str:
    """Where a daemon that stops keeping the segment saves its KV-event
    sources' state (``shmcache.ingest``), next to the segment."""
    return f"/dev/shm/{PREFIX}{name}.kvevents"


def unlink(name: str, only: int | None = None) -> bool:
    """Remove the segment, its writer semaphore and any saved KV-event
    state; True if anything was removed.

    Processes that have it mapped keep their mapping until they close it,
    but it is first marked retired (when it is a valid segment) so their
    readers stop answering from it. Use it to clean up after a crashed
    creator, never under a live writer. With ``only`` (a descriptor of a
    segment object), nothing is removed unless ``name`` still names that
    very object: a writer removing its own segment never removes a newer
    one created under the same name.
    """
    validate_name(name)
    if only is not None and not _names(name, only):
        return False
    retire(name)
    removed = False
    for fn, path in ((posix_ipc.unlink_shared_memory, shm_path(name)), (posix_ipc.unlink_semaphore, sem_path(name))):
        try:
            fn(path)
            removed = True
        except posix_ipc.ExistentialError:
            pass
    try:
        os.unlink(state_path(name))
    except FileNotFoundError:
        pass
    return removed


def _names(name: str, fd: int) -> bool:
    """Whether the object named ``name`` is the one ``fd`` refers to."""
    try:
        shm = posix_ipc.SharedMemory(shm_path(name))
    except posix_ipc.ExistentialError:
        return False
    try:
        a, b = os.fstat(shm.fd), os.fstat(fd)
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    finally:
        shm.close_fd()


def retire(name: str) -> None:
    """Mark segment ``name`` retired, if it is one whose header can be trusted."""
    try:
        shm = posix_ipc.SharedMemory(shm_path(name))
    except posix_ipc.ExistentialError:
        return
    try:
        st = os.fstat(shm.fd)
        if st.st_uid != os.geteuid() or st.st_size < HEADER_BYTES:
            return
        m = _map(shm.fd, HEADER_BYTES, 0, writable=True)
        try:
            words = _words(m)
            if int(words[H_MAGIC]) == MAGIC:
                publish_word(words, H_RETIRED, np.uint64(1))
            del words
        finally:
            m.close()
    except OSError:
        return
    finally:
        shm.close_fd()


def resized_error(name: str) -> IncompatibleSegmentError:
    return IncompatibleSegmentError(
        f"segment {name!r} was truncated or resized while mapped here (only its owner can do that; "
        "shmcache never does): stop using it, then remove and recreate it"
    )


def check_mode(mode: object) -> int:
    """Validate a creation mode: owner read-write, nobody else may write."""
    if isinstance(mode, bool) or not isinstance(mode, int) or mode & ~0o777 or (mode & 0o600) != 0o600 or mode & 0o022:
        raise InvalidInputError(
            f"mode must give the owner read-write and nobody else write access (e.g. 0o600, 0o640), got {mode!r}"
        )
    return mode
