"""Atomic file writes: every file the package writes appears whole or not at all.

A file is written under a temporary name in its destination folder, then renamed over the destination
(``os.replace`` is atomic on POSIX and Windows within one file system), so a crash or an exception in the
middle never leaves a partial file where a reader would find it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """Call ``write(tmp_path)``, then rename ``tmp_path`` to ``path`` (parent folders are created).

    Args:
        fsync: flush the file to the disk before the rename (for commit points such as a manifest).

    Returns:
        ``path`` as a ``Path``. On any exception the temporary file is removed and the exception re-raised;
        an existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: object, *, sort_keys: bool = True, indent: int = 2) -> Path:
    """JSON with a trailing newline; objects JSON cannot encode are written as ``str(obj)``."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> int:
    """safetensors file of ``tensors`` (moved to CPU, made contiguous); returns its size in bytes."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata)).stat().st_size
