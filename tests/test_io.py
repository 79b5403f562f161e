"""Atomic writes: a failed write leaves the old file and no temporary behind."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lightning_attr._io import atomic_save_tensors, atomic_write, atomic_write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "manifest.json"
    atomic_write_json(target, {"version": 1})

    def crash(tmp):
        tmp.write_text("half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_text() == '{\n  "version": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_tensors_round_trip_with_size_and_parents_created(tmp_path):
    target = tmp_path / "a" / "b" / "block.safetensors"
    tensors = {"x": torch.arange(6.0).reshape(2, 3).t()}  # non-contiguous on purpose
    size = atomic_save_tensors(target, tensors, metadata={"codec": "dense"})
    assert size == target.stat().st_size > 0
    assert torch.equal(load_file(target)["x"], tensors["x"])
