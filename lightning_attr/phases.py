"""Wall and CPU seconds per phase of one process's simulation, for the cost record of the store.

Phases nest (the curvature products inside the eigenspace finder, the all-reduce inside a product) and are
counted **exclusively**: time spent in a nested phase is charged to it alone, so the phases of a process add up to
its simulation time. The engine names them (``SimulationEngine``): ``"data"`` (reading the training set for the
curvature), ``"curvature products"`` (online: with the propagation's vector updates), ``"collectives"`` (all-reduces
and gathers, the wait for the other processes included), ``"eigenspace algebra"`` (the Krylov finder's work besides
its products), ``"gradients"`` (per-source gradients), ``"inverse"`` (the deflated inverse applied to them),
``"step rule"`` (online: a window's step size and averaged subspace), ``"write"`` (shards and parts) and ``"other"``.
The totals run over every checkpoint the process simulated so far, as ``simulation_seconds`` does (a resumed fit
counts from the resume).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseClock:
    """Exclusive wall / CPU seconds per named phase (``time.perf_counter`` / ``time.process_time``)."""

    def __init__(self) -> None:
        self._totals: dict[str, list[float]] = {}
        self._stack: list[str] = []
        self._since = (0.0, 0.0)

    def _charge(self) -> None:
        now = (time.perf_counter(), time.process_time())
        if self._stack:
            total = self._totals.setdefault(self._stack[-1], [0.0, 0.0])
            total[0] += now[0] - self._since[0]
            total[1] += now[1] - self._since[1]
        self._since = now

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Charges the block to ``name`` (and the phase it interrupts up to here to that phase)."""
        self._charge()
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()

    def to_json(self) -> dict[str, dict[str, float]]:
        """``{phase: {"seconds": wall, "cpu_seconds": cpu}}``, rounded to milliseconds, the phase running now included."""
        self._charge()
        return {
            name: {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3)} for name, (wall, cpu) in sorted(self._totals.items())
        }
