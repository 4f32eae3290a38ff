"""Numba's kernel cache is dropped when any source the kernels depend on changes."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import shmcache
from shmcache import jitcache
from shmcache.hashing import chain_into

PACKAGE = Path(shmcache.__file__).parent


def package_imports(module: str) -> set[str]:
    """The shmcache modules ``module`` imports (``from .x import ...`` or ``from . import x``)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [a.name for a in node.names])
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
    ours = ["hashing.chain_into-379.py311.nbi", "hashing.chain_into-379.py311.1.nbc", "matcher.walk-9.py311.nbi"]
    theirs = ["other.f-1.py311.nbi", "hashing.cpython-311.pyc", "layoutx.g-2.py311.nbc"]
    touch(tmp_path, *ours, *theirs)
    (tmp_path / jitcache.STAMP).write_text("old")

    assert sorted(jitcache.sync_dir(tmp_path, "new")) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*theirs, jitcache.STAMP])
    assert (tmp_path / jitcache.STAMP).read_text() == "new"

    touch(tmp_path, ours[0])  # compiled from the "new" sources
    assert jitcache.sync_dir(tmp_path, "new") == []
    assert (tmp_path / ours[0]).exists()


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


def test_importing_shmcache_stamped_numbas_cache_directory():
    stamp = Path(chain_into._cache.cache_path) / jitcache.STAMP
    assert stamp.read_text() == jitcache.source_digest()
