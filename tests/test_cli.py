"""The shmcache command: demo end to end (short), dump text/JSON/check."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid

import numpy as np
import pytest

import shmcache
from shmcache import Writer
from shmcache.cli import main
from shmcache.demo import COMPILING_HINT, _start_daemon, wait_ready
from shmcache.dump import tree_arrays
from shmcache.layout import H_LIVE


def test_demo_runs_daemon_and_workers_end_to_end(capsys):
    def demo_objects() -> set[str]:  # only the demo's: other test runs may share /dev/shm
        return {e for e in os.listdir("/dev/shm") if "shmcache.demo-" in e}

    before = demo_objects()
    assert main(["demo", "--requests", "240", "--workers", "2", "--capacity", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "240 requests" in out and "check   ok" in out and "stopped the daemon and 2 workers" in out
    # Part 2: the same requests routed over 4 simulated ranks' KV events, three ways.
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"round-robin", "least-loaded", "cache-aware"} <= set(rows), out
    line = next(x for x in out.splitlines() if x.startswith("inserts:"))
    evicted, delivered = re.findall(r"evictions ([\d,]+), delivered to their owners ([\d,]+)", line)[0]
    assert evicted == delivered and int(evicted.replace(",", "")) > 0
    assert demo_objects() == before


def test_demo_daemon_imports_this_shmcache_not_one_in_the_working_directory(tmp_path, monkeypatch):
    decoy = tmp_path / "shmcache"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy in the working directory')\n")
    monkeypatch.chdir(tmp_path)
    name = f"t-demo-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    proc, line = _start_daemon(name, capacity=64, block_size=4)
    try:
        assert line.startswith(f"ready name={name}")
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    assert not shmcache.exists(name)


def fake_daemon(code: str) -> subprocess.Popen:
    """A child that runs ``code``, then waits for its stdin to close (the test's cue to end)."""
    return subprocess.Popen(
        [sys.executable, "-c", f"import sys\n{code}\nsys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
    )


def test_demo_waits_past_other_output_for_the_daemons_ready_line(capsys):
    # Two writes, so "ready" may arrive in the same read as the noise or after it.
    proc = fake_daemon(
        "print('[cache] index loaded', flush=True)\nprint('x' * 70000)\nprint('ready name=d', flush=True)"
    )
    try:
        assert wait_ready(proc, timeout=60) == "ready name=d"
        assert proc.poll() is None
        err = capsys.readouterr().err
        assert "daemon: [cache] index loaded" in err and COMPILING_HINT not in err
    finally:
        proc.stdin.close()
        proc.wait()


def test_demo_reports_a_daemon_that_exits_before_it_is_ready():
    proc = fake_daemon("print('no segment for you', flush=True)\nsys.exit(3)")
    with pytest.raises(RuntimeError, match="exited \\(status 3\\) before it was ready"):
        wait_ready(proc, timeout=60)
    assert proc.returncode == 3


def test_demo_kills_a_daemon_that_is_never_ready_and_says_why_it_may_be_slow(capsys):
    proc = fake_daemon("")
    try:
        with pytest.raises(RuntimeError, match="not ready after 1 s"):
            wait_ready(proc, timeout=1.0, hint_after=0.2)
        assert proc.returncode is not None  # killed and reaped
        assert COMPILING_HINT in capsys.readouterr().err
    finally:
        proc.stdin.close()


def test_dump_json_and_check_on_a_live_segment(shm_name, capsys):
    with Writer.create(shm_name, capacity=64, block_size=4) as w:
        w.insert(np.arange(16), [1, 2, 3, 4])
        w.insert(np.r_[np.arange(8), np.full(8, 99)], [1, 2, 7, 8], client=5)
        w.insert(np.arange(100, 108), [20, 21])
        w.pin(np.arange(8))
        assert main(["dump", shm_name, "--json", "--check", "--tree", "--depth", "3"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["occupancy"]["live_blocks"] == 8 and info["violations"] == []
        assert info["writer"]["alive"] is True and info["clients"] == {"0": 6, "5": 2}
        assert info["pinned_blocks"] == 2 and info["root_prefixes"] == 2
        widest = info["tree"][0]
        assert (widest["value"], widest["blocks"], widest["children"]) == (1, 6, 1)
        assert [n["value"] for n in widest["top"][0]["top"]] == [3, 7] or [n["value"] for n in widest["top"][0]["top"]] == [7, 3]
        assert main(["dump", shm_name, "--tree"]) == 0
        text = capsys.readouterr().out
        assert "6 blocks under value 1" in text and "clients  0: 6, 5: 2" in text


def test_dump_counts_every_subtree_exactly(shm_name):
    """``tree_arrays``' subtree sizes and child counts, against a walk of the
    parent links, on a segment of random prompts over three token values
    (shared prefixes, branches, evictions)."""
    rng = np.random.default_rng(7)
    with Writer.create(shm_name, capacity=300, block_size=2) as w:
        assert not tree_arrays(w._map.data, w.geometry.vector())[1].any()  # empty: no subtree
        for i in range(120):
            n = int(rng.integers(1, 12))
            w.insert(rng.integers(0, 3, size=2 * n), np.arange(n) + 100 * i)
        parent, size, children, _, _ = tree_arrays(w._map.data, w.geometry.vector())
        live = w.stats()["live_blocks"]
    valid = size > 0
    assert valid.sum() == live
    kids = {s: [t for t in np.flatnonzero(valid) if parent[t] == s] for s in np.flatnonzero(valid)}

    def subtree(s: int) -> int:
        return 1 + sum(subtree(t) for t in kids[s])

    assert max(len(k) for k in kids.values()) > 1  # the case a sort by depth is for: branches
    for s, k in kids.items():
        assert children[s] == len(k) and size[s] == subtree(s)


def test_dump_check_names_the_damage(shm_name, capsys):
    with Writer.create(shm_name, capacity=64, block_size=4) as w:
        w.insert(np.arange(16), [1, 2, 3, 4])
        w._map.data[H_LIVE] += 3
        assert main(["dump", shm_name, "--check"]) == 1
        out = capsys.readouterr().out
        assert "check   1 violation(s)" in out and "header says 7 live states, the table holds 4" in out


def test_dump_unknown_segment_is_a_clear_error(shm_name, capsys):
    assert main(["dump", shm_name]) == 2
    assert "no shmcache segment" in capsys.readouterr().err
