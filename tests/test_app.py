"""The two commands, run end to end in subprocesses as a user would, on small settings."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

BIN = Path(sys.executable).parent
SMALL = [
    "data=digits",
    "data.loader_kwargs.n_train=200",
    "data.label_noise=0.05",
    "data.batch_size=50",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def _script(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"console script {name} is not installed next to {sys.executable}; run `pip install -e .`")
    return str(path)


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    # one intra-op thread: on a small shared CPU more threads oversubscribe the cores (several-fold slower)
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A two-job multirun over the horizon (the issue's `-m callbacks.attribution.horizon=...`)."""
    root = tmp_path_factory.mktemp("app")
    _run([_script("lightning-attr-train"), "-m", "callbacks.attribution.horizon=5,10", *SMALL,
          f"hydra.sweep.dir={root / 'multirun'}"], cwd=root)
    return root / "multirun"


def test_multirun_trains_one_run_per_setting(sweep):
    for job, horizon in (("0", 5), ("1", 10)):
        run = sweep / job
        cfg = OmegaConf.load(run / "config.yaml")
        assert cfg.callbacks.attribution.horizon == horizon
        summary = json.loads((run / "run.json").read_text())
        assert summary["n_train"] == 200 and summary["n_sources"] == 200
        assert summary["responses"] == {"attribution": "responses"}  # relative: the run can be moved
        assert (run / "responses" / "manifest.json").is_file()
        assert summary["timings"]["fit_s"] > summary["timings"]["attribution_callback_s"] > 0
        assert (run / "model.pt").is_file()


def test_attribute_writes_the_report(sweep):
    run = sweep / "0"
    proc = _run([sys.executable, "-m", "lightning_attr", "attribute", f"run_dir={run}",
                 "max_queries=40", "n_drawn=2", "top_k=3"], cwd=sweep)
    assert str(run / "report.html") in proc.stdout and "mislabel detection AUC" in proc.stdout
    page = (run / "report.html").read_text()
    for figure in ("query_000.png", "query_001.png", "top_sources.png", "self_influence_top.png",
                   "self_influence_hist.png", "score_distribution.png"):
        assert (run / "figures" / figure).stat().st_size > 1000
        assert f"figures/{figure}" in page
    assert "Mislabel detection AUC" in page
    with open(run / "attributions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 40 * 2 * 3  # queries x {proponent, opponent} x top_k
    first = [r for r in rows if r["query"] == "0"]
    assert {r["ranked_by"] for r in rows} == {"relative"}  # the default; raw scores are in the table too
    pro = [float(r["relative_score"]) for r in first if r["kind"] == "proponent"]
    opp = [float(r["relative_score"]) for r in first if r["kind"] == "opponent"]
    assert pro == sorted(pro, reverse=True) and opp == sorted(opp) and pro[0] >= opp[0]
    # relative = score / sqrt(self-influence of the source): same sign as the raw score
    assert all((float(r["score"]) > 0) == (float(r["relative_score"]) > 0) for r in rows if float(r["score"]) != 0)
    table = json.loads((run / "attributions.json").read_text())
    assert table["top_k"] == 3 and len(table["rows"]) == len(rows)
    summary = json.loads((run / "attribution.json").read_text())
    assert summary["n_queries"] == 40 and 0.0 <= summary["mislabel_auc"] <= 1.0


def test_attribute_on_a_directory_that_is_not_a_run_fails_clearly(tmp_path):
    from lightning_attr.app.attribute import attribute_run

    cfg = OmegaConf.load(Path(__file__).parents[1] / "lightning_attr" / "conf" / "attribute.yaml")
    cfg.run_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a finished lightning-attr-train run"):
        attribute_run(cfg)


def test_lightning_attr_cli_usage(tmp_path, capsys):
    from lightning_attr.app.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "lightning-attr train" in out and "lightning-attr demo" in out
    bad = _run([_script("lightning-attr"), "fly"], cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "unknown command 'fly'" in bad.stderr and "lightning-attr demo" in bad.stderr


def test_attribute_ensembles_the_runs_of_a_multirun_folder_or_a_list(sweep, tmp_path):
    from lightning_attr.app.attribute import attribute_run

    cfg = OmegaConf.load(Path(__file__).parents[1] / "lightning_attr" / "conf" / "attribute.yaml")
    cfg.max_queries, cfg.n_drawn, cfg.self_influence, cfg.rank_by = 8, 1, False, "score"
    cfg.run_dir, cfg.out_dir = str(sweep), str(tmp_path / "folder")
    folder = attribute_run(cfg)
    assert folder["responses"] == [str(sweep / job / "responses") for job in ("0", "1")]
    cfg.run_dir, cfg.out_dir = [str(sweep / "1"), str(sweep / "0")], str(tmp_path / "list")
    listed = attribute_run(cfg)
    assert listed["responses"] == [str(sweep / job / "responses") for job in ("1", "0")]
    assert (tmp_path / "list" / "report.html").is_file()
    cfg.run_dir = []
    with pytest.raises(ValueError, match="empty list"):
        attribute_run(cfg)
