"""Every config group composes and instantiates; the tree ships in the package; users can compose it."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

import lightning_attr.conf
from lightning_attr import AttributionCallback
from lightning_attr.data import ClassificationDataModule

REPO = Path(__file__).resolve().parents[1]
CONF = Path(lightning_attr.conf.__file__).parent


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(autouse=True)
def _clean_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def _compose(overrides=(), name="train"):
    with initialize_config_module(config_module="lightning_attr.conf", version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_repo_conf_is_the_packaged_tree():
    # conf/ is a symlink to lightning_attr/conf: one tree, nothing to keep in sync by hand
    top = REPO / "conf"
    assert top.is_symlink() and top.resolve() == CONF.resolve()
    cmp = filecmp.dircmp(top, CONF)
    assert not cmp.left_only and not cmp.right_only and not cmp.diff_files


def test_groups_have_the_documented_options():
    assert {"mnist1d", "digits", "mnist"} <= set(_options("data"))
    assert {"mlp", "cnn1d", "cnn", "transformer"} <= set(_options("model"))
    assert {"cpu", "gpu", "ddp_sim"} <= set(_options("trainer"))
    assert {"attribution", "model_checkpoint", "early_stopping", "default"} <= set(_options("callbacks"))
    assert {"per_example", "by_label", "by_column"} <= set(_options("sources"))
    assert "demo" in _options("experiment")


def test_default_train_config_instantiates_end_to_end(tmp_path):
    cfg = _compose()
    assert cfg.data.dataset == "mnist1d" and cfg.callbacks.attribution.horizon == 20
    dm = instantiate(cfg.data)
    assert isinstance(dm, ClassificationDataModule)
    model = instantiate(cfg.model)
    assert model(torch.zeros(3, *cfg.data.input_shape)).shape == (3, cfg.data.num_classes)
    cb = instantiate(cfg.callbacks.attribution, dirpath=str(tmp_path))
    assert isinstance(cb, AttributionCallback)


@pytest.mark.parametrize("data", _options("data"))
def test_every_data_option_instantiates(data, tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_ROOT", str(tmp_path))  # empty: mnist must fail clearly, not download
    cfg = _compose([f"data={data}"])
    dm = instantiate(cfg.data)
    if data == "mnist":
        with pytest.raises(FileNotFoundError, match="never downloads"):
            dm.setup("fit")
        return
    dm.setup("fit")
    x, y, idx = next(iter(dm.train_dataloader()))
    shape = (cfg.data.context,) if data == "stdlib_text" else tuple(cfg.data.input_shape)  # text: windows of tokens
    assert tuple(x.shape[1:]) == shape and idx.dtype == torch.int64


PAIRS = [(m, d) for m in _options("model") for d in ("mnist1d", "digits") if (m, d) != ("cnn", "mnist1d") and m != "causal_lm"]


@pytest.mark.parametrize(("model", "data"), PAIRS)
def test_every_model_option_instantiates_for_the_data(model, data):
    cfg = _compose([f"data={data}", f"model={model}"])
    net = instantiate(cfg.model)
    logits = net(torch.randn(5, *cfg.data.input_shape))
    assert logits.shape == (5, cfg.data.num_classes)


def test_image_cnn_on_signals_fails_clearly():
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="not a square image"):
        instantiate(_compose(["data=mnist1d", "model=cnn"]).model)


@pytest.mark.parametrize("trainer", _options("trainer"))
def test_every_trainer_option_instantiates(trainer, tmp_path):
    cfg = _compose([f"trainer={trainer}"])
    if trainer == "gpu" and not torch.cuda.is_available():
        from hydra.errors import InstantiationException

        with pytest.raises(InstantiationException, match="gpu"):
            instantiate(cfg.trainer, default_root_dir=str(tmp_path), logger=False)
        return
    t = instantiate(cfg.trainer, default_root_dir=str(tmp_path), logger=False)
    assert t.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("callbacks", _options("callbacks"))
def test_every_callbacks_option_instantiates(callbacks, tmp_path):
    cfg = _compose([f"callbacks={callbacks}"])
    made = [instantiate(node) for node in (cfg.callbacks or {}).values()]
    if callbacks in ("default", "attribution"):
        assert any(isinstance(c, AttributionCallback) for c in made)
    if callbacks == "none":
        assert made == []


def test_callbacks_compose_as_a_list():
    cfg = _compose(["callbacks=[attribution,model_checkpoint,early_stopping]", "trainer.enable_checkpointing=true"])
    assert set(cfg.callbacks) == {"attribution", "model_checkpoint", "early_stopping"}


@pytest.mark.parametrize("sources", _options("sources"))
def test_every_sources_option_instantiates(sources):
    cfg = _compose(["data=digits", "data.n_groups=7", f"sources={sources}"])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    ids = instantiate(cfg.sources)(dm)
    if sources == "per_example":
        assert ids is None
    else:
        assert len(ids) == dm.n_train
        assert len(set(ids)) == (7 if sources == "by_column" else 10)


def test_logger_option_instantiates(tmp_path):
    cfg = _compose(["logger=csv"])
    (node,) = cfg.logger.values()
    assert node.save_dir is None  # the app fills in the run directory
    logger = instantiate(node, save_dir=str(tmp_path))
    assert Path(logger.save_dir) == tmp_path


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_and_instantiates(experiment):
    cfg = _compose([f"experiment={experiment}"])
    assert cfg.task_name == experiment
    instantiate(cfg.data), instantiate(cfg.model), instantiate(cfg.sources)
    assert instantiate(cfg.callbacks.attribution).horizon == cfg.callbacks.attribution.horizon


def test_experiment_stdlib_lm_composes_a_language_model_with_module_sources():
    """`experiment=stdlib_lm`: the byte-level model reads the data's vocabulary and context; sources are module names."""
    cfg = _compose(["experiment=stdlib_lm", "data.n_modules=5", "data.windows_per_module=2"])
    assert cfg.callbacks.attribution.mode == "end" and cfg.sources.column == "module"
    dm = instantiate(cfg.data)
    dm.setup("fit")
    ids = instantiate(cfg.sources)(dm)
    assert len(ids) == 10 and ids[0] == ids[1] == dm.text.modules[0] and len(set(ids)) == 5
    model = instantiate(cfg.model)
    x, y, _ = next(iter(dm.train_dataloader()))
    assert model(x).shape == (len(x), cfg.data.context, cfg.data.vocab_size)
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="fix data.vocab_size"):
        instantiate(cfg.data, vocab_size=256)


def test_attribute_config_composes():
    cfg = _compose(["run_dir=runs/x"], name="attribute")
    assert cfg.run_dir == "runs/x" and cfg.top_k >= 1
    with pytest.raises(Exception, match="run_dir"):
        OmegaConf.to_container(_compose([], name="attribute"), throw_on_missing=True)


def _user_tree(tmp_path: Path, searchpath: str | None) -> Path:
    conf = tmp_path / "user_configs"
    (conf / "callbacks").mkdir(parents=True)
    lines = ["defaults:", "  - callbacks: [attribution, early_stopping]", "  - _self_"]
    if searchpath:
        lines += ["hydra:", "  searchpath:", f"    - {searchpath}"]
    lines += ["my_key: 1"]
    (conf / "train.yaml").write_text("\n".join(lines) + "\n")
    return conf


def test_search_path_plugin_lets_a_user_tree_compose_the_callback(tmp_path):
    """An installed user's own Hydra tree composes `callbacks: attribution` without copying files."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    names = [cls.__name__ for cls in Plugins.instance().discover(SearchPathPlugin)]
    assert "LightningAttrSearchPathPlugin" in names
    conf = _user_tree(tmp_path, searchpath=None)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train")
    assert cfg.my_key == 1
    assert cfg.callbacks.attribution._target_ == "lightning_attr.AttributionCallback"
    assert isinstance(instantiate(cfg.callbacks.attribution), AttributionCallback)


def test_pkg_searchpath_alternative(tmp_path):
    # without relying on the plugin: hydra.searchpath: [pkg://lightning_attr.conf]
    conf = _user_tree(tmp_path, searchpath="pkg://lightning_attr.conf")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train")
    assert set(cfg.callbacks) == {"attribution", "early_stopping"}


def test_user_file_overrides_the_packaged_one(tmp_path):
    conf = _user_tree(tmp_path, searchpath=None)
    (conf / "callbacks" / "attribution.yaml").write_text(
        "attribution:\n  _target_: lightning_attr.AttributionCallback\n  horizon: 7\n"
    )
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train")
    assert cfg.callbacks.attribution.horizon == 7


def test_the_app_hands_sources_and_dirpath_to_the_attribution_callback(tmp_path):
    from lightning_attr.app.train import instantiate_callbacks

    cfg = _compose(["data=digits", "sources=by_label", "callbacks=[attribution,early_stopping]"])
    dm = instantiate(cfg.data)
    ids = instantiate(cfg.sources)(dm)
    callbacks, names = instantiate_callbacks(cfg, ids, tmp_path)
    (cb,) = [c for c in callbacks if isinstance(c, AttributionCallback)]
    assert names == ["attribution"] and cb.sources == ids and cb.dirpath == str(tmp_path / "responses")
    assert len(callbacks) == 2
    # sources twice (the callback config and the sources group) is refused, not silently resolved
    clash = _compose(["data=digits", "sources=by_label", "callbacks.attribution.sources=[0,1]"])
    with pytest.raises(ValueError, match="sources group also defines sources"):
        instantiate_callbacks(clash, ids, tmp_path)
