"""The C heap's thresholds for the simulation's temporaries (glibc on Linux).

glibc's ``malloc`` serves every block above ``M_MMAP_THRESHOLD`` (128 KiB until it adapts) with a fresh ``mmap``
and hands it back at ``free``, and it returns the top of the heap to the system above ``M_TRIM_THRESHOLD``. The
curvature products allocate and free activation-sized temporaries (megabytes each) thousands of times per
checkpoint, and every fresh mapping is page-faulted and zeroed again: on the MNIST-1D CNN a GGN product took
17.0 ms per 1,024 examples under glibc's own thresholds and 9.6 ms with the two below, the same arithmetic
(benchmarks/README.md, "The C heap"). glibc moves the mmap threshold up by itself only when a mapped block is
freed, so which of the two a process gets depended on what it had freed before.

:func:`retain_freed_memory` sets both thresholds once per process: blocks up to 32 MiB (glibc's own ceiling for
its adaptive threshold on 64-bit) come from the heap, and up to 128 MiB of freed heap stays with the process
instead of going back to the system. That is the memory a process may hold beyond what it uses. A process whose
environment sets any ``MALLOC_*_`` tuning variable (e.g. ``MALLOC_MMAP_THRESHOLD_=131072``, glibc's default) keeps
its own settings, as does any other C library.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 128 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_USER_TUNING = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")
_applied: bool | None = None  # this process's outcome, once tried


def retain_freed_memory() -> bool:
    """Sets glibc's ``M_MMAP_THRESHOLD`` to :data:`MMAP_THRESHOLD_BYTES` and ``M_TRIM_THRESHOLD`` to
    :data:`TRIM_THRESHOLD_BYTES` for this process (the first call; later calls return the first's outcome).

    Returns whether both were set: False on another platform or C library, or when the environment names one of
    glibc's tuning variables (the user's choice is kept)."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _USER_TUNING):
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "retain_freed_memory"]
