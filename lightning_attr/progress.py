"""Progress of the response simulation: a bar with a total and an ETA, in the style of the fit's own bar.

The unit is the **curvature-vector product** (one source moved one step; a per-example source with
horizon ``K`` costs ``K`` of them). The bar follows the trainer's progress bar callback: Lightning's
``Tqdm`` beside a :class:`~lightning.pytorch.callbacks.TQDMProgressBar`, a task on the live
``rich`` display of a :class:`~lightning.pytorch.callbacks.RichProgressBar`, and no bar when the
trainer has none (``enable_progress_bar=False``). The start and the end are logged to
``logging.getLogger("lightning_attr")`` (which Hydra's job log receives), and each tenth too when no
bar shows it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("lightning_attr")


class SimulationProgress:
    """One bar for one simulation: ``advance(products)`` as products are done, ``close()`` at the end.

    Args:
        trainer: the running ``lightning.Trainer`` (its progress bar callback decides the bar's kind).
        description: e.g. ``"attribution (final)"``.
        total: the expected number of curvature-vector products; grows if the simulation needs more
            (grouped sources stay live from their first example to ``horizon`` steps after their last).
    """

    def __init__(self, trainer: Any, description: str, total: int) -> None:
        self.description, self.total, self.done = description, max(int(total), 1), 0
        self._start = time.perf_counter()
        self._logged_tenths = 0
        self._bar = self._task = self._progress = None
        self._own_progress = False
        if trainer.is_global_zero:
            self._open_bar(trainer.progress_bar_callback)
            log.info("%s: %s curvature-vector products to do", description, f"{self.total:,}")

    def _open_bar(self, callback: Any) -> None:
        from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

        if callback is None or callback.is_disabled:
            return
        if isinstance(callback, RichProgressBar):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            live = callback.progress is not None and not getattr(callback, "_progress_stopped", True)
            if live:  # one live display at a time: a task on the fit's own
                self._progress = callback.progress
            else:
                columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
                self._progress, self._own_progress = Progress(*columns), True
                self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total)
        elif isinstance(callback, TQDMProgressBar):
            from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

            # below the fit's bar (position 2p) and its validation bar (2p + 1)
            self._bar = Tqdm(
                desc=self.description, total=self.total, position=2 * callback.process_position + 2,
                leave=True, dynamic_ncols=True, file=sys.stdout, unit="products", unit_scale=True,
            )  # fmt: skip

    def advance(self, products: int) -> None:
        """Count ``products`` more curvature-vector products as done."""
        if products <= 0:
            return
        self.done += int(products)
        if self.done > self.total:
            self.total = self.done
            if self._bar is not None:
                self._bar.total = self.total
            if self._task is not None:
                self._progress.update(self._task, total=self.total)
        if self._bar is not None:
            self._bar.update(products)
        if self._task is not None:
            self._progress.update(self._task, advance=products)
        tenths = min(10 * self.done // self.total, 9)
        if tenths > self._logged_tenths:  # INFO (the job log, the console) where no bar shows it
            self._logged_tenths = tenths
            level = logging.DEBUG if self._bar is not None or self._task is not None else logging.INFO
            log.log(level, "%s: %d%%, %s", self.description, 10 * tenths, self.eta_text())

    def eta_text(self) -> str:
        elapsed = time.perf_counter() - self._start
        left = elapsed * (self.total - self.done) / max(self.done, 1)
        return f"{self.done:,}/{self.total:,} products in {elapsed:.1f} s, about {left:.0f} s left"

    def close(self) -> None:
        """The simulation is done. A total that was an upper bound (``rank="auto"``'s eigenspace stops at its
        criterion, before its cap) becomes what was done, so the bar ends full."""
        if self.done < self.total:
            self.total = max(self.done, 1)
            if self._bar is not None:
                self._bar.total = self.total
                self._bar.refresh()
            if self._task is not None:
                self._progress.update(self._task, total=self.total)
        if self._bar is not None:
            self._bar.close()
        if self._task is not None:
            if self._own_progress:
                self._progress.stop()
            else:
                self._progress.remove_task(self._task)
        self._bar = self._task = None
        log.info("%s: done, %s products in %.1f s", self.description, f"{self.done:,}",
                 time.perf_counter() - self._start)
