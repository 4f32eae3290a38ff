"""Issue 4's CI soak: 60 seconds of churn with checking readers."""

from __future__ import annotations

import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

import soak  # noqa: E402


def test_one_minute_soak_has_no_violation_and_no_reader_leak(tmp_path):
    s = soak.soak(minutes=1.0, readers=2, rate=2000, capacity=300, out_dir=str(tmp_path))
    assert s["violations"] == 0
    assert s["ops"] > 50_000 and s["matches"] > 100_000
    assert all(g <= 8.0 for k, g in s["uss_growth_after_warmup_mib"].items() if k.startswith("reader")), s
    assert all(start == end for start, end in s["fds_start_end"].values()), s
    assert s["evicted_blocks"] > 1000 and s["removed_blocks"] > 1000, "the soak must keep evicting and removing"
    with open(tmp_path / "soak.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 50 and float(rows[-1]["t_s"]) >= 55
