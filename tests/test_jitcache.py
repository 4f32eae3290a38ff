"""Numba's kernel cache is dropped when any source the kernels depend on changes."""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import pytest

import shmcache
from shmcache import jitcache
from shmcache.hashing import chain16

PACKAGE = Path(shmcache.__file__).parent


def package_imports(module: str) -> set[str]:
    """The shmcache modules ``module`` imports, relatively or by absolute name."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                name = node.module
            elif node.level == 0 and (node.module == "shmcache" or node.module.startswith("shmcache.")):
                name = node.module.removeprefix("shmcache").lstrip(".")
            else:
                continue
            found.update([name.split(".")[0]] if name else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("shmcache."))
    return found


def defines_cached_kernel(module: str) -> bool:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    return any(
        isinstance(kw.value, ast.Constant) and kw.arg == "cache" and kw.value.value is True
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for kw in node.keywords
    )


def test_kernel_modules_are_the_kernels_and_everything_they_import():
    todo = [p.stem for p in PACKAGE.glob("*.py") if defines_cached_kernel(p.stem)]
    closure: set[str] = set()
    while todo:
        module = todo.pop()
        if module not in closure:
            closure.add(module)
            todo.extend(package_imports(module))
    assert closure == set(jitcache.KERNEL_MODULES)


def touch(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).write_bytes(b"x")


def test_a_new_digest_drops_the_packages_kernels_and_nothing_else(tmp_path):
    ours = [
        "hashing.chain16-379.py311.nbi",
        "hashing.chain16-379.py311.1.nbc",
        "matcher.walk-9.py311.nbi",
    ]
    theirs = ["other.f-1.py311.nbi", "hashing.cpython-311.pyc", "layoutx.g-2.py311.nbc"]
    touch(tmp_path, *ours, *theirs)
    (tmp_path / jitcache.STAMP).write_text("old")

    assert sorted(jitcache.sync_dir(tmp_path, "new")) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*theirs, jitcache.STAMP])
    assert (tmp_path / jitcache.STAMP).read_text() == "new"

    touch(tmp_path, ours[0])  # compiled from the "new" sources
    assert jitcache.sync_dir(tmp_path, "new") == []
    assert (tmp_path / ours[0]).exists()


def test_is_cached_reads_numbas_index_files(tmp_path, monkeypatch):
    touch(tmp_path, "mutate.insert_kernel-337.py311.nbi", "mutate.remove_kernel-9.py311.1.nbc")
    monkeypatch.setattr(jitcache, "cache_dir", lambda: str(tmp_path))
    assert jitcache.is_cached("mutate", "insert_kernel")
    assert not jitcache.is_cached("mutate", "remove_kernel"), "an object file without its index is no kernel"
    assert not jitcache.is_cached("mutate", "insert"), "the whole name, not a prefix of it"
    monkeypatch.setattr(jitcache, "cache_dir", lambda: None)
    assert not jitcache.is_cached("mutate", "insert_kernel"), "caching off: nothing is cached"


@pytest.mark.parametrize("cold, helper", [(True, True), (False, True), (True, False)],
                         ids=["cold", "warm", "cold-alone"])
def test_a_daemons_warm_up_compiles_in_a_helper_only_when_the_cache_is_cold(cold, helper, monkeypatch):
    """Cold: a child process runs the removals' warm-up (and ends well)
    while this one warms the insert; warm, or told to compile alone
    (``serve --compile-alone``): no child is started."""
    from shmcache import warmup

    before = set(os.listdir("/dev/shm"))
    children = []

    def in_child(function, *args):
        child = real(function, *args)
        children.append((function, args, child))
        return child

    real = warmup._in_child
    monkeypatch.setattr(warmup, "_in_child", in_child)
    monkeypatch.setattr(jitcache, "is_cached", lambda module, function: not cold)
    warmup.warm_writer(16, events=True, helper=helper)
    if not (cold and helper):
        assert children == []
        return
    assert [(f, a) for f, a, _ in children] == [("warm_removals", (16, True))]
    child = children[0][2]
    if child is not None:  # None: this process may run on one CPU only
        assert child.returncode == 0, "the helper warmed the removals and ended well"
    assert set(os.listdir("/dev/shm")) == before, "the helper's throwaway segment is gone"


def test_an_unstamped_directory_is_treated_as_stale(tmp_path):
    touch(tmp_path, "pins.pin_path_kernel-40.py311.nbi")
    assert jitcache.sync_dir(tmp_path, "d") == ["pins.pin_path_kernel-40.py311.nbi"]
    assert (tmp_path / jitcache.STAMP).read_text() == "d"


def test_a_missing_directory_is_created_and_stamped(tmp_path):
    cache_dir = tmp_path / "a" / "b"
    assert jitcache.sync_dir(cache_dir, "d") == []
    assert (cache_dir / jitcache.STAMP).read_text() == "d"


def test_the_digest_changes_with_any_kernel_modules_source(tmp_path):
    for name in jitcache.KERNEL_MODULES:
        shutil.copy(PACKAGE / f"{name}.py", tmp_path)
    before = jitcache.source_digest(tmp_path)
    assert before == jitcache.source_digest()
    layout = tmp_path / "layout.py"
    layout.write_text(layout.read_text() + "\n")
    assert jitcache.source_digest(tmp_path) != before


def test_a_kernel_that_cannot_be_deleted_keeps_the_old_stamp_and_warns(tmp_path, monkeypatch):
    touch(tmp_path, "mutate.insert_kernel-7.py311.nbi", "mutate.insert_kernel-7.py311.1.nbc")
    (tmp_path / jitcache.STAMP).write_text("old")
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if str(path).endswith(".nbc"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.warns(RuntimeWarning, match="could not delete 1 cached kernels.*NUMBA_CACHE_DIR"):
        assert jitcache.sync_dir(tmp_path, "new") == ["mutate.insert_kernel-7.py311.nbi"]
    assert (tmp_path / jitcache.STAMP).read_text() == "old"


def test_a_frozen_application_without_sources_is_left_alone(tmp_path):
    assert jitcache.source_digest(tmp_path) is None
    assert jitcache.sync(None) == []


def test_importing_shmcache_stamped_numbas_cache_directory():
    stamp = Path(chain16._cache.cache_path) / jitcache.STAMP
    assert stamp.read_text() == jitcache.source_digest()


FRESH_READER = r"""
import sys
import numpy as np
import shmcache
from shmcache.hashing import chain16, chain_any
r = shmcache.Reader.attach(sys.argv[1])
assert r.match_prefix(np.arange(64, dtype=np.int64)).values.tolist() == [1, 2, 3, 4]
print(len(chain16.signatures), len(chain_any.signatures))
"""


def test_a_fresh_reader_of_16_token_blocks_compiles_only_its_own_chain(shm_name, tmp_path):
    """With an empty Numba cache, attaching and matching compiles the
    16-token chain and never the general XXH3 (a minute of compiling)."""
    import subprocess
    import sys

    with shmcache.Writer.create(shm_name, capacity=64, block_size=16) as w:
        w.insert(list(range(64)), [1, 2, 3, 4])
        out = subprocess.run([sys.executable, "-c", FRESH_READER, shm_name], capture_output=True, text=True,
                             timeout=300, env=dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "0"]
    cached = {p.name.split("-")[0] for p in tmp_path.rglob("*.nbi")}
    assert "matcher.match_tokens16" in cached and "hashing.chain16" in cached
    assert not any("_any" in name or "mutate." in name for name in cached), sorted(cached)


def test_shmcache_compile_fills_the_cache_it_names(tmp_path):
    """``shmcache compile`` reports each step and where the kernels went;
    here the cache already holds them (the session warm-up), so it loads."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "shmcache.cli", "compile", "--block-size", "16"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    where = jitcache.cache_dir()
    assert f"kernels cached in {where}" in out.stdout
    for step in ("writer kernels, block size 16", "reader kernels, block size 16", "KV-event parser"):
        assert step in out.stdout
    names = {p.name.split("-")[0] for p in Path(where).glob("*.nbi")}
    assert {"matcher.match_tokens16", "matcher.match_owners16", "mutate.insert_kernel",
            "wire_tokens.parse_tokens"} <= names


def kernel_module_functions() -> list:
    """``(module, name, dispatcher)`` of every Numba function the kernel
    modules define."""
    import importlib

    from numba.core.dispatcher import Dispatcher

    return [(m, name, f) for m in jitcache.KERNEL_MODULES
            for name, f in vars(importlib.import_module(f"shmcache.{m}")).items()
            if isinstance(f, Dispatcher) and f.__module__ == f"shmcache.{m}"]


def test_every_compiled_function_of_the_kernel_modules_is_cached_or_inlined():
    """A function Numba compiles as a function of its own is cached on disk,
    so that a process compiling a new kernel that calls it loads what
    another process compiled (the writer's helpers above all); only
    functions inlined into their callers are not."""
    from numba.core.caching import NullCache

    compiled = kernel_module_functions()
    assert len(compiled) > 100
    uncached = [f"{m}.{name}" for m, name, f in compiled
                if isinstance(f._cache, NullCache) and f.targetoptions.get("inline") != "always"]
    assert uncached == []


def test_no_compiled_function_has_an_int_literal_argument():
    """Numba compiles a function again for each Python int literal passed to
    it, 1-2 s each on a fresh machine, so kernels pass helpers NumPy scalars
    (``jitcache.helper``). The session's ``compile_all`` has loaded every
    kernel: none has such a signature. On an empty cache (CI's fresh
    install) it also compiled, in this process, every helper the kernels
    call, so they are all checked; a kernel loaded from the cache brings
    its helpers' code without their signatures."""
    from numba.core import types

    signatures = [(f"{m}.{name}", sig) for m, name, f in kernel_module_functions() for sig in f.signatures]
    assert len(signatures) > 20
    literal = [f"{name}{sig}" for name, sig in signatures if any(isinstance(a, types.IntegerLiteral) for a in sig)]
    assert literal == []


def test_numbas_cache_saves_hold_the_save_lock_one_process_at_a_time(tmp_path, monkeypatch):
    """Two processes saving different signatures of one function at once
    could give both the same data file (wrong code for one of them): every
    save holds an exclusive lock that no other open file can take meanwhile."""
    import fcntl

    from numba.core import caching

    assert jitcache.lock_saves() and jitcache.lock_saves(), "installed at import; a second call wraps nothing"
    saved, save_data = [], caching.IndexDataCacheFile._save_data

    def probe(self, name, data):
        fd = os.open(tmp_path / jitcache.SAVE_LOCK, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        saved.append(name)
        save_data(self, name, data)

    monkeypatch.setattr(caching.IndexDataCacheFile, "_save_data", probe)
    cache = caching.IndexDataCacheFile(str(tmp_path), "probe-1.py311", (1.0, 2))
    cache.save(("a signature", "a target"), {"code": 1})
    cache.save(("another", "a target"), {"code": 2})
    assert saved == ["probe-1.py311.1.nbc", "probe-1.py311.2.nbc"]
    assert cache.load(("a signature", "a target")) == {"code": 1} and cache.load(("another", "a target")) == {"code": 2}
    fd = os.open(tmp_path / jitcache.SAVE_LOCK, os.O_RDWR)  # released after each save
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
