"""The callback's default store location (versioned, never overwritten; Hydra's run directory) and its
simulation progress (a bar with a total, log lines that agree with the manifest)."""

from __future__ import annotations

import json
import logging
import os
import re
from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import AttributionCallback, IndexedDataset
from lightning_attr.store import ResponseStore

from conftest import blobs, fit, small_mlp


def _products(dirpath) -> int:
    return ResponseStore.load(dirpath).checkpoint_info("final")["curvature_products"]


def test_a_second_fit_in_the_same_folder_gets_a_new_versioned_store(tmp_path):
    x, y = blobs(64)
    stores = []
    for _ in range(3):
        cb = AttributionCallback(horizon=3, mode="end", curvature_batch_size=32)
        fit(small_mlp(6, 3), x, y, [cb], epochs=1, default_root_dir=tmp_path)
        stores.append(cb.dirpath)
    assert stores == [os.path.join(tmp_path, name) for name in ("responses", "responses_v1", "responses_v2")]
    first = (tmp_path / "responses" / "manifest.json").read_text()
    cb = AttributionCallback(horizon=3, mode="end", curvature_batch_size=32, overwrite=True)
    fit(small_mlp(6, 3), x, y, [cb], epochs=1, default_root_dir=tmp_path)
    assert cb.dirpath == os.path.join(tmp_path, "responses")  # overwrite=True replaces the unversioned one
    assert (tmp_path / "responses" / "manifest.json").read_text() != first
    explicit = AttributionCallback(dirpath=tmp_path / "responses_v1", horizon=3, mode="end")
    with pytest.raises(Exception, match="already holds a response store"):  # an explicit dirpath is never versioned
        fit(small_mlp(6, 3), x, y, [explicit], epochs=1)


@pytest.mark.parametrize("mode", ["end", "online"])
def test_progress_is_logged_and_agrees_with_the_manifest(tmp_path, caplog, mode):
    x, y = blobs(64)
    cb = AttributionCallback(tmp_path / "r", horizon=4, mode=mode, curvature_batch_size=32, propagation="heavy_ball", checkpoint_epochs=None)
    with caplog.at_level(logging.INFO, logger="lightning_attr"):
        fit(small_mlp(6, 3), x, y, [cb], epochs=3, batch_size=16)
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_attr"]
    assert lines[0] == "attribution (final): 256 curvature-vector products to do"  # 64 sources x horizon 4
    tenths = [line for line in lines if re.fullmatch(r"attribution \(final\): \d0%, .* s left", line)]
    assert len(tenths) >= 2  # no bar: every tenth reached is logged, with an estimate of the time left
    done = [line for line in lines if ": done, " in line]
    assert done == [f"attribution (final): done, {_products(tmp_path / 'r'):,} products in " + done[0].split(" in ")[-1]]


def test_a_tqdm_bar_shows_the_total(tmp_path, capsys):
    """End mode's default propagation 'spectral', rank="auto": 163 eigenspace products (P = 163: the Krylov space is all
    of R^P before its budget of max(2k, k + 256) products is spent; the trace comes from its first block)."""
    x, y = blobs(64)
    cb = AttributionCallback(tmp_path / "r", horizon=4, mode="end", curvature_batch_size=32)
    trainer = L.Trainer(max_epochs=1, callbacks=[cb, TQDMProgressBar()], logger=False, enable_checkpointing=False,
                        enable_model_summary=False)
    trainer.fit(small_mlp(6, 3), DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=32))
    out = capsys.readouterr().out
    assert "attribution (final)" in out and "163/163" in out and _products(tmp_path / "r") == 163


def test_a_bar_whose_work_stops_early_ends_full(capsys):
    """rank="auto" opens its bar at the eigenspace's cap and usually stops before it: closing sets the total to the
    products done (the bar ends full, not at 2,304 of 3,529)."""
    from lightning_attr.progress import SimulationProgress

    trainer = SimpleNamespace(is_global_zero=True, progress_bar_callback=TQDMProgressBar())
    progress = SimulationProgress(trainer, "attribution (final)", 3529)
    progress.advance(2000)
    progress.advance(304)
    progress.close()
    assert (progress.done, progress.total) == (2304, 2304)
    assert "2.30k/2.30k" in capsys.readouterr().out


def test_inside_a_hydra_app_the_store_lands_in_the_run_directory(tmp_path):
    """A user's own Hydra app (examples/hydra_project composes `callbacks: [attribution]`)."""
    import subprocess
    import sys
    from pathlib import Path

    project = Path(__file__).parents[1] / "examples" / "hydra_project"
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(project / "train.py"), f"hydra.run.dir={run_dir}",
                           "trainer.max_epochs=2", "n_train=300", "callbacks.attribution.horizon=20"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "responses" / "manifest.json").is_file() and not (tmp_path / "lightning_logs").exists()
    assert json.loads((run_dir / "responses" / "manifest.json").read_text())["n_sources"] == 300
