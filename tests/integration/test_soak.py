"""A short soak (bench/soak.py runs the long one with every fault): the real stack at
saturation, the database locked mid-way for 20 s (longer than the recorder's three tries).
Every request is answered or refused with 503 and Retry-After, and every answer the clients
saw is in the store once the spill has been replayed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import soak

pytestmark = pytest.mark.slow

SHED = "503 overloaded (Retry-After)"


def test_at_saturation_and_through_a_database_lock_nothing_answered_goes_unrecorded(
    tmp_path: Path,
):
    report = soak.main(
        ["--duration-s", "60", "--clients", "6", "--max-concurrency", "2",
         "--fault", "db@20:20", "--state-dir", str(tmp_path / "state")]
    )  # fmt: skip

    seen = report["seen_by_clients"]
    assert set(seen) <= {"200 answered", SHED}, seen  # nothing else: no 5xx, no broken stream
    assert seen.get("200 answered", 0) > 0 and seen.get(SHED, 0) > 0  # saturated
    [locked] = report["faults"]
    assert locked["spilled_while_locked"] > 0  # the lock was felt, and the spill took it
    assert report["drained_s"] is not None
    assert report["answered_not_recorded_ok"] == 0
    assert report["recorded_ok_not_seen"] == 0
    assert report["stack_alive"]
