"""PhaseClock: exclusive seconds per phase (a nested phase's time is its own, not its parent's)."""

from __future__ import annotations

from types import SimpleNamespace

from lightning_attr import phases
from lightning_attr.phases import PhaseClock


def test_nested_phases_are_charged_exclusively(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(phases, "time", SimpleNamespace(perf_counter=lambda: now[0], process_time=lambda: now[0] / 2))
    clock = PhaseClock()
    with clock("other"):
        now[0] += 1.0
        with clock("eigenspace algebra"):
            now[0] += 2.0
            with clock("curvature products"):
                now[0] += 4.0
            now[0] += 8.0
        with clock("curvature products"):
            now[0] += 16.0
    now[0] += 32.0  # outside every phase: not charged
    assert clock.to_json() == {
        "curvature products": {"seconds": 20.0, "cpu_seconds": 10.0},
        "eigenspace algebra": {"seconds": 10.0, "cpu_seconds": 5.0},
        "other": {"seconds": 1.0, "cpu_seconds": 0.5},
    }
