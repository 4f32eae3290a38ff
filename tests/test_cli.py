"""The shmcache command: demo end to end (short), dump text/JSON/check."""

from __future__ import annotations

import json

import numpy as np

from shmcache import Writer
from shmcache.cli import main
from shmcache.layout import H_LIVE


def test_demo_replays_and_prints_the_comparison(capsys):
    assert main(["demo", "--requests", "60", "--capacity", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "60 requests" in out and "LRU ref" in out
    row = out.strip().splitlines()[-1].split()
    assert row[1] == "60" and float(row[4]) >= 0.98  # hit-rate ratio vs the exact-LRU reference


def test_dump_json_and_check_on_a_live_segment(shm_name, capsys):
    with Writer.create(shm_name, capacity=64, block_size=4) as w:
        w.insert(np.arange(16), [1, 2, 3, 4])
        assert main(["dump", shm_name, "--json", "--check"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["live_blocks"] == 4 and info["violations"] == [] and info["writer_alive"] is True
        assert main(["dump", shm_name]) == 0
        assert "live_blocks" in capsys.readouterr().out


def test_dump_check_names_the_damage(shm_name, capsys):
    with Writer.create(shm_name, capacity=64, block_size=4) as w:
        w.insert(np.arange(16), [1, 2, 3, 4])
        w._map.data[H_LIVE] += 3
        assert main(["dump", shm_name, "--check"]) == 1
        assert "header says 7 live states, the table holds 4" in capsys.readouterr().out


def test_dump_unknown_segment_is_a_clear_error(shm_name, capsys):
    assert main(["dump", shm_name]) == 2
    assert "no shmcache segment" in capsys.readouterr().err
