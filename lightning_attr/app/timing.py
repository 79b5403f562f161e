"""Measure how long a callback's hooks take during fit (the attribution callback's overhead)."""

from __future__ import annotations

import functools
import time
from collections import defaultdict

from lightning.pytorch import Callback

# Hooks that run inside Trainer.fit; state_dict / load_state_dict are excluded (not computation).
_HOOK_PREFIXES = ("on_", "setup", "teardown")


class HookTimer:
    """Wraps the hook methods of one callback instance and accumulates their wall time.

    Lightning looks hooks up with ``getattr(callback, name)``, so instance attributes shadow the
    class methods; nothing about the callback's behaviour changes.
    """

    def __init__(self, callback: Callback) -> None:
        self.callback = callback
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        for name in dir(Callback):
            if name.startswith(_HOOK_PREFIXES) and callable(getattr(Callback, name)):
                # only hooks the callback overrides cost anything
                if getattr(type(callback), name) is not getattr(Callback, name):
                    setattr(callback, name, self._wrap(name, getattr(callback, name)))

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed

    @property
    def total(self) -> float:
        return float(sum(self.seconds.values()))
