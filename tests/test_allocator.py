"""allocator.retain_freed_memory: glibc serves the simulation's megabyte temporaries from the heap, unless the user
tuned malloc. Each case runs in a fresh interpreter (the thresholds are process-wide and set once)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# Allocates and frees 8 MiB through the C library, then prints retain_freed_memory()'s result and how many blocks
# glibc holds as separate mappings (mallinfo2's hblks) while the 8 MiB block is live.
_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from lightning_attr.allocator import retain_freed_memory
    from lightning_attr.engine import SimulationEngine  # importing the engine must not change the thresholds

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Info
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)

    def mapped_while_live():
        before = libc.mallinfo2().hblks
        block = libc.malloc(8 * 2**20)
        mapped = libc.mallinfo2().hblks - before
        libc.free(block)
        return mapped

    first = mapped_while_live()
    applied = retain_freed_memory()
    print(first, applied, retain_freed_memory(), mapped_while_live())
    """
)


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_thresholds_move_megabyte_blocks_to_the_heap():
    first, applied, again, after = _probe()
    assert first == "1", "glibc maps an 8 MiB block by itself under its default threshold"
    assert (applied, again) == ("True", "True")
    assert after == "0", "with the thresholds set, the 8 MiB block comes from the heap"


def test_user_tuning_is_kept():
    first, applied, again, after = _probe(MALLOC_MMAP_THRESHOLD_="131072")
    assert (applied, again) == ("False", "False")
    assert (first, after) == ("1", "1"), "the user's threshold still maps the block"
