"""Keeps Numba's on-disk kernel cache consistent with shmcache's sources.

Numba keys a cached kernel on its own source file only. A kernel that calls
a kernel of another module (the matcher's calls ``hashing.chain16``,
the writer's call ``matcher.walk`` and ``find_state``, the pin kernels
``matcher.add_relaxed``) or reads another module's constants (the matcher,
writer and pin kernels read ``layout``'s offsets) keeps the old code, loaded
from the cache, after that other module changes: Numba documents that its
cache invalidation "fails to recognize changes in symbols defined in a
different file". Stale code would read a segment with old field offsets, or
hash with an old key chain. Cache files are not part of an installed
distribution, so this holds for upgrades of an installed package as much as
for an edited checkout.

So ``shmcache/__init__.py`` takes a digest of the sources of every module
the kernels are built from (``KERNEL_MODULES``) before it imports any of
them, and once they are imported (no kernel loads at import) calls
``sync``: where the digest stamped in Numba's cache directory differs, it
deletes the package's cached kernels there and stamps the new digest; Numba
then compiles them afresh.

Best effort: a frozen application without sources is left alone; a cached
kernel that cannot be deleted leaves the stamp as it was and raises a
warning saying what to delete. A process still running old code that
compiles a kernel after the stamp changed can write a stale entry again:
restart such processes when the sources change.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import tempfile
import warnings
from pathlib import Path

from numba import njit

#: The modules whose source the compiled kernels depend on: those that
#: define cached kernels, and the shmcache modules they import
#: (``tests/test_jitcache.py`` checks this list against the imports).
KERNEL_MODULES = (
    "atomics",
    "checks",
    "dump",
    "errors",
    "evwire",
    "hashing",
    "identity",
    "jitcache",
    "layout",
    "liveness",
    "matcher",
    "mutate",
    "owners",
    "pins",
    "pinsync",
    "presence",
    "recovery",
    "tables",
    "tree",
    "wire_tokens",
    "wstate",
)

#: Name of the stamp file, in the cache directory: the digest of the sources
#: its cached kernels were compiled from.
STAMP = "shmcache-kernels.sha256"

#: Name of the lock file, in each cache directory, that every Numba cache
#: save holds (``lock_saves``).
SAVE_LOCK = "shmcache-saves.lock"

_PACKAGE_DIR = Path(__file__).parent

#: Decorator of the functions kernels call (the writer's helpers over
#: ``wstate.Arrays``, the matcher's walk): each is compiled once per
#: signature as a function of its own, cached on disk like a kernel, and
#: linked into every kernel that calls it, where LLVM may inline it. Numba's
#: ``inline="always"`` instead copies the callee's IR into each call site
#: and types it again there, which is most of what a kernel's compile
#: spends beyond LLVM: with the matcher's walk as helpers, loading every
#: reader kernel on an empty cache (``warmup.warm_reader``) took 22.4 s
#: against 38.6-56.1 s, and the compiled match is the same code (LLVM
#: inlined every helper there). And a
#: process compiling a new kernel loads the helpers another process
#: compiled: the demo's process compiles the owners' release kernels while
#: its daemon compiles the insert's, sharing the dropping helpers.
#:
#: Helpers are compiled without Numba's reference counting (NRT): with it,
#: every field of the 13-array ``Arrays`` tuple a helper touches costs an
#: incref/decref call pair that LLVM cannot prune in branchy code (a
#: 128-block insert measured 5.6x slower per block). So a helper must
#: never allocate, and never create or return an array, when a kernel that
#: keeps NRT calls it: the array would come back without the reference the
#: caller later drops. The kernels own every reference; helpers borrow.
#: Such functions, and those that take a function as an argument (which
#: Numba cannot cache), stay ``inline="always"``.
#:
#: Call helpers with ints that are NumPy scalars or computed values, never
#: Python literals nor names bound only to one (``np.int64(0)``, not ``0``,
#: and not ``x = 0`` then ``x``): Numba compiles a separate copy of a
#: function for each literal value passed, 1-2 s each on a fresh machine.
#: A literal bool that selects a variant (the matcher's ``with_owners``) is
#: the exception: there the copy is the point. ``_nrt`` is a Numba compiler
#: option (``numba.core.options``); tests exercise every helper. This module
#: is one of ``KERNEL_MODULES``: changing these options invalidates what
#: was compiled with the old ones.
helper = njit(_nrt=False, cache=True)


def source_digest(package_dir: Path = _PACKAGE_DIR, modules: tuple[str, ...] = KERNEL_MODULES) -> str | None:
    """SHA-256 (hex) over the names and contents of the kernel modules'
    sources, or None when one cannot be read (a frozen application)."""
    h = hashlib.sha256()
    try:
        for name in modules:
            h.update(name.encode() + b"\0")
            h.update((package_dir / f"{name}.py").read_bytes())
    except OSError:
        return None
    return h.hexdigest()


def _read_stamp(stamp: Path) -> bytes | None:
    try:
        return stamp.read_bytes()
    except OSError:
        return None


def sync_dir(cache_dir: Path, digest: str, modules: tuple[str, ...] = KERNEL_MODULES) -> list[str]:
    """Make ``cache_dir`` hold only kernels compiled from sources with ``digest``.

    If its stamp says otherwise (or it has none), deletes the cached kernels
    (index ``.nbi`` and object ``.nbc`` files) of ``modules`` and writes the
    stamp. Returns the names of the files it deleted. Files of other modules
    or packages are never touched. Warns (RuntimeWarning), and leaves the
    stamp as it was, when a kernel file cannot be deleted.
    """
    stamp = cache_dir / STAMP
    if _read_stamp(stamp) == digest.encode():
        return []
    removed, kept = [], []
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)  # when called before Numba created it
        entries = list(os.scandir(cache_dir))
    except OSError as e:
        warnings.warn(f"shmcache: cannot check Numba's cache directory {cache_dir}: {e}", RuntimeWarning, 2)
        return removed
    for entry in entries:
        module, _, rest = entry.name.partition(".")
        if module in modules and rest.endswith((".nbi", ".nbc")):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except FileNotFoundError:  # another process got there first
                pass
            except OSError:
                kept.append(entry.name)
    if kept:
        warnings.warn(
            f"shmcache: could not delete {len(kept)} cached kernels compiled from older sources "
            f"in {cache_dir} (e.g. {kept[0]}); delete them, or set NUMBA_CACHE_DIR to a directory "
            "you own",
            RuntimeWarning,
            2,
        )
        return removed
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{STAMP}.")
        with os.fdopen(fd, "wb") as f:
            f.write(digest.encode())
        os.replace(tmp, stamp)
    except OSError:  # left unstamped: the next import checks again, so no stale kernel survives
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return removed


def cache_dir() -> str | None:
    """The directory Numba keeps shmcache's compiled kernels in, or None when
    caching is off (or the JIT is disabled)."""
    from .hashing import chain16

    return getattr(getattr(chain16, "_cache", None), "cache_path", None)


def is_cached(module: str, function: str) -> bool:
    """Whether Numba's cache directory holds kernels of ``function`` of
    shmcache's ``module`` (an index file, named as Numba names them), for
    any argument types: whether a process can expect to load it rather
    than compile it."""
    path = cache_dir()
    if path is None:
        return False
    prefix = f"{module}.{function}-"
    try:
        return any(n.startswith(prefix) and n.endswith(".nbi") for n in os.listdir(path))
    except OSError:
        return False


def sync(digest: str | None) -> list[str]:
    """Run ``sync_dir`` with ``digest`` (from ``source_digest``, taken before
    the kernel modules were imported) on the cache directory Numba uses for
    shmcache's kernels. Call it before any kernel is loaded (the import of
    ``hashing`` here comes after the digest); returns the deleted file names."""
    cache_path = cache_dir()
    if digest is None or cache_path is None:  # no sources, caching disabled, or JIT off
        return []
    return sync_dir(Path(cache_path), digest)


def lock_saves() -> bool:
    """Make every Numba cache save in this process hold an exclusive
    ``flock`` on ``SAVE_LOCK`` in the directory it saves to.

    Numba saves a new entry by reading the function's index, taking the
    first data-file number the index does not name, then writing the index
    and the data file. Two processes saving different signatures of one
    function at once (a router's int64 match and a worker's int32 match,
    started together in fresh containers that share ``NUMBA_CACHE_DIR``)
    can take the same number, and the index then names one signature's
    machine code for the other: wrong code, loaded by every later process
    (Numba does not check the key on load, and ``sync`` sees no source
    change). Held around the whole save, the lock makes saves one at a time;
    loads need none (Numba replaces each file whole). It serialises every
    package's saves in this process, which is its only effect on them.
    Returns whether it is in place (False where Numba's cache has no such
    save to wrap; called again, it wraps nothing twice).
    """
    try:
        from numba.core.caching import IndexDataCacheFile
    except ImportError:  # pragma: no cover - a Numba without this cache layout
        return False
    save = getattr(IndexDataCacheFile, "save", None)
    if save is None:  # pragma: no cover - a Numba without this cache layout
        return False
    if getattr(save, "_shmcache_locked", False):
        return True

    @functools.wraps(save)
    def locked_save(self, key, data):
        try:
            fd = os.open(os.path.join(self._cache_path, SAVE_LOCK), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # a directory it cannot write: Numba's own save fails or warns the same way
            return save(self, key, data)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return save(self, key, data)
        finally:
            os.close(fd)  # releases the lock

    locked_save._shmcache_locked = True
    IndexDataCacheFile.save = locked_save
    return True
