"""Keeps Numba's on-disk kernel cache consistent with shmcache's sources.

Numba keys a cached kernel on its own source file only. A kernel that calls
a kernel of another module (the matcher and the writer call
``hashing.chain_into``) or reads another module's constants (every kernel
reads ``layout``'s offsets) keeps the old code, loaded from the cache, after
that other module changes: Numba documents that its cache invalidation
"fails to recognize changes in symbols defined in a different file". Stale
code would read a segment with old field offsets, or hash with an old key
chain.

So at import, ``sync`` hashes the sources of every module the kernels are
built from (``KERNEL_MODULES``). Where that digest differs from the one
stamped in Numba's cache directory, it deletes the package's cached kernels
there and stamps the new digest; Numba then compiles them afresh. A wheel
install writes every file anew, which invalidates every kernel anyway: this
is for editable installs and source checkouts.

Best effort: a cache directory that cannot be listed or written is left as
it is (Numba does not cache there either). A process still running the old
code that compiles a kernel after the stamp changed can write a stale entry
again; restart such processes when the sources change.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .hashing import chain_into

#: The modules whose source the compiled kernels depend on: those that
#: define cached kernels, and the shmcache modules they import
#: (``tests/test_jitcache.py`` checks this list against the imports).
KERNEL_MODULES = ("atomics", "dump", "errors", "hashing", "identity", "layout", "matcher", "mutate", "pins")

#: Name of the stamp file, in the cache directory: the digest of the sources
#: its cached kernels were compiled from.
STAMP = "shmcache-kernels.sha256"

_PACKAGE_DIR = Path(__file__).parent


def source_digest(package_dir: Path = _PACKAGE_DIR, modules: tuple[str, ...] = KERNEL_MODULES) -> str:
    """SHA-256 (hex) over the names and contents of the kernel modules' sources."""
    h = hashlib.sha256()
    for name in modules:
        h.update(name.encode() + b"\0")
        h.update((package_dir / f"{name}.py").read_bytes())
    return h.hexdigest()


def sync_dir(cache_dir: Path, digest: str, modules: tuple[str, ...] = KERNEL_MODULES) -> list[str]:
    """Make ``cache_dir`` hold only kernels compiled from sources with ``digest``.

    If its stamp says otherwise (or it has none), deletes the cached kernels
    (index ``.nbi`` and object ``.nbc`` files) of ``modules`` and writes the
    stamp. Returns the names of the files it deleted. Files of other modules
    or packages are never touched.
    """
    stamp = cache_dir / STAMP
    try:
        if stamp.read_text() == digest:
            return []
    except OSError:
        pass
    removed = []
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)  # else the first kernels cached there go unstamped
        for entry in os.scandir(cache_dir):
            module, _, rest = entry.name.partition(".")
            if module in modules and rest.endswith((".nbi", ".nbc")):
                try:
                    os.unlink(entry.path)
                    removed.append(entry.name)
                except FileNotFoundError:  # another process got there first
                    pass
        tmp = cache_dir / f"{STAMP}.{os.getpid()}.tmp"
        tmp.write_text(digest)
        os.replace(tmp, stamp)
    except OSError:
        pass
    return removed


def sync() -> list[str]:
    """Run ``sync_dir`` on the cache directory Numba uses for shmcache's
    kernels, before any of them is loaded; returns the deleted file names."""
    cache_path = getattr(getattr(chain_into, "_cache", None), "cache_path", None)
    if cache_path is None:  # caching disabled, or a Numba without the attribute
        return []
    return sync_dir(Path(cache_path), source_digest())
