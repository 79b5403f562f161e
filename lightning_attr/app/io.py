"""The app's file writes: all atomic (``lightning_attr._io``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_attr._io import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["atomic_write", "write_json", "write_text"]


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write_text(path, text)


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_json(path, obj, sort_keys=False)
