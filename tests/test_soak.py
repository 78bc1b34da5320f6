"""The chaos soak, short: a real stack under continuous load while every kind of fault strikes at
least twice, then every swarm checked against the invariants (`soak/invariants.py`)."""

from __future__ import annotations

from soak.driver import FAULT_KINDS, SoakConfig, run_soak


def test_a_short_soak_keeps_every_invariant_through_every_kind_of_fault() -> None:
    report = run_soak(SoakConfig(duration_s=75.0, clients=5, min_each_fault=2, settle_s=60.0))
    print("\n" + report.table())
    assert report.violations == []
    assert all(report.faults[kind] >= 2 for kind in FAULT_KINDS), report.faults
    assert report.swarms["started"] >= 50, report.swarms
    assert report.swarms.get("completed", 0) >= report.swarms["started"] * 0.8, report.swarms
    assert report.events_seen > 0
