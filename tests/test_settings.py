"""One settings object: the callback's signature, the Hydra group, the manifest and README's options table
all say what AttributionSettings says."""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf

from lightning_attr import AttributionCallback
from lightning_attr.settings import AttributionSettings
from lightning_attr.store import ResponseStore

from conftest import blobs, fit, small_mlp

ROOT = Path(__file__).resolve().parents[1]


def test_callback_takes_exactly_the_settings_with_their_defaults():
    parameters = inspect.signature(AttributionCallback.__init__).parameters
    signature = {name: p.default for name, p in parameters.items() if name != "self"}
    assert signature == AttributionSettings.defaults()


def test_hydra_group_lists_every_setting_with_its_default():
    config = OmegaConf.to_container(OmegaConf.load(ROOT / "lightning_attr" / "conf" / "callbacks" / "attribution.yaml"))
    options = config["attribution"]
    assert options.pop("_target_") == "lightning_attr.AttributionCallback"
    assert options == AttributionSettings.defaults()


def test_readme_options_table_has_one_row_per_setting_with_its_default():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## `AttributionCallback` options", 1)[1].split("\n\n", 2)[1]
    rows = [re.match(r"\| `(\w+)` \| (.+?) \|", line).groups() for line in table.splitlines()[2:]]
    defaults = AttributionSettings.defaults()
    names = [name for name, _ in rows]
    assert sorted(names) == sorted(defaults) and len(set(names)) == len(names)
    for name, cell in rows:
        if name == "dirpath":  # resolved at fit time, described in words
            continue
        literal = cell.strip("`")
        assert ast.literal_eval(literal) == defaults[name], (name, cell)


def test_invalid_setting_is_refused_by_name():
    with pytest.raises(ValueError, match="memory_budget_mb must be a number > 0"):
        AttributionSettings(memory_budget_mb=-1)
    with pytest.raises(MisconfigurationException, match="horizon must be a positive int, got 0"):
        AttributionCallback(horizon=0, mode="online")


def test_manifest_records_the_settings(tmp_path):
    x, y = blobs(n=64, d=6, classes=3)
    cb = AttributionCallback(tmp_path / "r", mode="end", horizon=3, checkpoint_epochs=[1], memory_budget_mb=8)
    fit(small_mlp(6, 3), x, y, [cb], epochs=2)
    recorded = ResponseStore.load(cb.dirpath).manifest["settings"]
    assert recorded == json.loads(json.dumps(cb.settings.to_manifest()))
    assert recorded["memory_budget_mb"] == 8.0 and recorded["checkpoint_epochs"] == [1]
    assert set(recorded) == set(AttributionSettings.defaults()) - {"dirpath", "sources", "overwrite"}
