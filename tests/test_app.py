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
    assert "mislabel detection AUC" in (run / "attribute_logs" / "attribute.log").read_text()  # the summary, logged
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
    # the scale: each score as a share of its query's loss
    assert all(float(r["score_fraction_of_query_loss"]) == pytest.approx(float(r["score"]) / float(r["query_loss"]),
                                                                         rel=1e-4, abs=1e-12) for r in rows)
    assert "<h2>Per class</h2>" in page and "table class='sortable'" in page and "addEventListener('click'" in page
    assert page.count("<tr><td>") >= 40  # one sortable row per query
    summary = json.loads((run / "attribution.json").read_text())
    assert summary["n_queries"] == 40 and summary["n_flipped"] == 10  # 5% of 200 training labels
    # self-influence finds flipped labels better than chance even after 2 epochs (measured 0.69; chance 0.5)
    assert summary["mislabel_auc"] >= 0.6


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


def test_train_log_run_json_and_hydra_files(sweep):
    run = sweep / "0"
    log = (run / "train.log").read_text()
    assert "GPU available" in log  # Lightning's own messages
    assert "attribution (final): done" in log  # the simulation's progress
    assert "examples / sources: 200 / 200" in log  # the summary table, row by row
    summary = json.loads((run / "run.json").read_text())
    manifest = json.loads((run / "responses" / "manifest.json").read_text())
    final = next(c for c in manifest["checkpoints"] if c["name"] == "final")
    assert summary["simulation"]["attribution"]["final"]["curvature_products"] == final["curvature_products"] > 0
    assert not any(k.startswith("attribution/") for k in summary["metrics"])  # no stale running counters
    assert OmegaConf.load(run / ".hydra" / "config.yaml").callbacks.attribution.horizon == 5
    assert "callbacks.attribution.horizon=5" in (run / ".hydra" / "overrides.yaml").read_text()


def test_a_refused_run_names_the_override_and_changes_nothing(sweep):
    run = sweep / "1"
    before = {p: p.read_bytes() for p in (run / ".hydra").iterdir()} | {run / "run.json": (run / "run.json").read_bytes()}
    proc = _run([_script("lightning-attr-train"), *SMALL, f"hydra.run.dir={run}", "seed=3"], cwd=sweep, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert "already holds a response store" in proc.stdout + proc.stderr
    assert "callbacks.attribution.overwrite=true" in proc.stdout + proc.stderr  # the command-line form
    assert {p: p.read_bytes() for p in before} == before


def test_a_bad_callback_argument_names_its_override(tmp_path):
    from hydra import compose, initialize_config_module

    from lightning_attr.app.logs import UsageError
    from lightning_attr.app.train import instantiate_callbacks

    with initialize_config_module(config_module="lightning_attr.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["callbacks.attribution.horizon=0"])
    with pytest.raises(UsageError, match="callbacks.attribution: horizon must be a positive int"):
        instantiate_callbacks(cfg, None, tmp_path)


def _main_in_process(module, args, monkeypatch):
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.setattr(sys, "argv", [module.__name__, *args])
    GlobalHydra.instance().clear()
    try:
        module.main()
    except SystemExit as exit_:  # Hydra's --help ends with exit status 0
        if exit_.code:
            raise
    finally:
        GlobalHydra.instance().clear()


def test_attribute_without_run_dir_says_so(tmp_path, monkeypatch, capsys):
    from lightning_attr.app import attribute

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        _main_in_process(attribute, [], monkeypatch)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "run_dir= is missing" in err and "lightning-attr-attribute run_dir=" in err
    assert not any(tmp_path.iterdir())  # no log directory made for a command that did not run


def test_help_describes_the_options(tmp_path, monkeypatch, capsys):
    from lightning_attr.app import attribute, train

    monkeypatch.chdir(tmp_path)
    _main_in_process(attribute, ["--help"], monkeypatch)
    text = capsys.readouterr().out
    for option in ("run_dir=", "queries=", "draw=", "n_drawn=", "top_k=", "rank_by=", "readout=", "out_dir="):
        assert option in text
    assert "data:" not in text and "Configuration groups" not in text  # training groups do not apply
    _main_in_process(train, ["--help"], monkeypatch)
    text = capsys.readouterr().out
    assert "callbacks.attribution.horizon" in text and "experiment: " in text and "demo" in text


def test_draw_misclassified_and_the_top_sources_legend(sweep, tmp_path, monkeypatch):
    from lightning_attr.app import report
    from lightning_attr.app.attribute import attribute_run

    legends = {}
    save = report._save

    def keep_legend(fig, path):
        legend = fig.axes[0].get_legend() if fig.axes else None
        legends[path.name] = [t.get_text() for t in legend.get_texts()] if legend else []
        return save(fig, path)

    monkeypatch.setattr(report, "_save", keep_legend)
    cfg = OmegaConf.load(Path(__file__).parents[1] / "lightning_attr" / "conf" / "attribute.yaml")
    cfg.run_dir, cfg.out_dir, cfg.max_queries, cfg.draw, cfg.n_drawn = str(sweep / "0"), str(tmp_path), 60, "misclassified", 3
    attribute_run(cfg)
    rows = list(csv.DictReader(open(tmp_path / "attributions.csv")))
    wrong = sorted({int(r["query"]) for r in rows if r["query_label"] != r["prediction"]})
    assert wrong, "the 2-epoch model should misclassify some of 60 queries"
    drawn = sorted(p.name for p in (tmp_path / "figures").glob("query_*.png"))
    assert drawn == [f"query_{q:03d}.png" for q in wrong[:3]]
    assert legends["top_sources.png"] == ["mean |score|", "mean score > 0 (proponent)", "mean score < 0 (opponent)"]
    cfg.draw = "wrong"
    with pytest.raises(ValueError, match="draw must be 'first' or 'misclassified'"):
        attribute_run(cfg)


def test_the_callbacks_hints_come_in_command_line_form(tmp_path):
    from hydra import compose, initialize_config_module

    from lightning_attr.app.logs import UsageError, cli_hints
    from lightning_attr.app.train import run_train

    assert cli_hints("pass overwrite=True or use mode='end' (horizon=100)") == (
        "pass callbacks.attribution.overwrite=true or use callbacks.attribution.mode=end "
        "(callbacks.attribution.horizon=100)")
    # a fit the callback refuses (online mode cannot know when an endless fit ends)
    with initialize_config_module(config_module="lightning_attr.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*SMALL, "trainer.max_epochs=-1", "callbacks.attribution.mode=online",
                                                      f"output_dir={tmp_path}"])
    with pytest.raises(UsageError, match="or use callbacks.attribution.mode=end"):
        run_train(cfg)


def test_warnings_reach_the_job_log_with_command_line_hints():
    import logging

    from lightning_attr.app import logs

    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate, logging.getLogger(name).filters[:])
             for name in ("lightning.pytorch", "lightning.fabric", "lightning_attr", "py.warnings")}
    try:
        logs.route_logging_to_job_log()
        assert logging.getLogger("lightning.pytorch").propagate  # Lightning's messages reach the job log
        # what logging.captureWarnings logs for a warning, through the filter the app installs
        record = logging.LogRecord("py.warnings", logging.WARNING, __file__, 1, "%s", ("Train longer or use mode='end'.",), None)
        assert all(f.filter(record) for f in logging.getLogger("py.warnings").filters)
        assert record.getMessage() == "Train longer or use callbacks.attribution.mode=end."
    finally:
        logging.captureWarnings(False)
        for name, (handlers, propagate, filters) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:], logger.propagate, logger.filters[:] = handlers, propagate, filters
