"""``lightning-attr-train``: fit a model with the attribution callback on (Hydra app).

    lightning-attr-train experiment=demo hydra.run.dir=runs/demo
    lightning-attr-train data=digits model=cnn callbacks.attribution.horizon=50
    lightning-attr-train -m callbacks.attribution.horizon=50,100

The run directory receives ``config.yaml`` (the resolved config), ``model.pt`` (the trained
weights), ``responses/`` (the response store), ``run.json`` (timings, metrics, paths, the store's
simulation costs), ``train.log`` (everything logged, Lightning's messages included) and ``.hydra/``
(written only once the run is accepted: a refused run leaves an earlier run's files as they were),
which is all ``lightning-attr-attribute run_dir=...`` needs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from lightning_attr.app.io import atomic_write, write_json, write_text
from lightning_attr.app.logs import UsageError, cli_hints, exit_on_usage_error, route_logging_to_job_log


def _output_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ValueError(
            "output_dir is null and Hydra is not running (compose API): set cfg.output_dir to the run directory."
        )
    return Path(HydraConfig.get().runtime.output_dir)


def _is_attribution_callback(node: Any) -> bool:
    from lightning_attr import AttributionCallback

    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        return False
    try:
        cls = hydra.utils.get_class(target)
    except Exception:  # a callable target, not a class
        return False
    return isinstance(cls, type) and issubclass(cls, AttributionCallback)


def instantiate_callbacks(cfg: DictConfig, sources: Any, output_dir: Path) -> tuple[list, list[str]]:
    """Instantiate ``cfg.callbacks`` (a dict of named callback configs).

    The attribution callback(s) get ``sources`` from the ``sources`` group and, when their
    ``dirpath`` is null, ``<output_dir>/responses`` (``<output_dir>/responses_<name>`` for a second
    one). Returns ``(callbacks, names of the attribution callbacks)``.
    """
    callbacks, attribution_names = [], []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"callbacks.{name} must be a config with a _target_, got {node!r}.")
        kwargs: dict[str, Any] = {}
        detected = _is_attribution_callback(node)
        if detected:
            if node.get("sources") is not None and sources is not None:
                raise ValueError(
                    f"callbacks.{name}.sources is set and the sources group also defines sources; "
                    f"keep one (sources=per_example leaves callbacks.{name}.sources in charge)."
                )
            if sources is not None:
                kwargs["sources"] = sources
            if node.get("dirpath") is None:
                suffix = "" if not attribution_names else f"_{name}"
                kwargs["dirpath"] = str(output_dir / f"responses{suffix}")
            _refuse_existing_store(name, node.get("dirpath") or kwargs["dirpath"], bool(node.get("overwrite")))
        # kwargs go to the constructor, not through OmegaConf (a per-example list of ids can be long)
        try:
            callback = hydra.utils.instantiate(node, _partial_=True)(**kwargs) if detected else hydra.utils.instantiate(node)
        except Exception as err:  # name the override that fixes it (InstantiationException keeps the cause)
            cause = err.__cause__ or err
            raise UsageError(f"callbacks.{name}: {cause}") from err
        if _attr_instance(callback):
            if not detected:
                raise ValueError(
                    f"callbacks.{name} builds an AttributionCallback through {node._target_!r}, which the app "
                    f"cannot pass sources and dirpath to; target lightning_attr.AttributionCallback directly."
                )
            attribution_names.append(name)
        callbacks.append(callback)
    return callbacks, attribution_names


def _refuse_existing_store(name: str, dirpath: str, overwrite: bool) -> None:
    """Before anything is written: a store left by an earlier run in ``dirpath`` is replaced only when asked."""
    from lightning_attr.store import has_store

    if has_store(dirpath) and not overwrite:
        raise UsageError(
            f"{dirpath} already holds a response store from an earlier run. Pass callbacks.{name}.overwrite=true "
            "to replace it, or choose another run directory (hydra.run.dir=...). Nothing was changed."
        )


def _write_hydra_files(cfg: DictConfig, output_dir: Path) -> None:
    """What Hydra writes into ``<run>/.hydra`` before a job starts (the app sets ``hydra.output_subdir: null``
    and writes them here, once the run is accepted). Nothing when Hydra is not running (compose API)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = output_dir / ".hydra"
    write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    write_text(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))


def instantiate_loggers(cfg: DictConfig, output_dir: Path) -> list:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        kwargs = {"save_dir": str(output_dir)} if node.get("save_dir", "unset") is None else {}
        loggers.append(hydra.utils.instantiate(node, **kwargs))
    return loggers


def run_train(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured and write the run directory; returns the summary written to ``run.json``."""
    import lightning as L

    from lightning_attr.app.summary import print_train_summary
    from lightning_attr.app.timing import HookTimer

    timings: dict[str, float] = {}
    output_dir = _output_dir(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    start = time.perf_counter()
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    sources = hydra.utils.instantiate(cfg.sources)(datamodule) if cfg.get("sources") else None
    model = hydra.utils.instantiate(cfg.model)
    timings["setup_s"] = time.perf_counter() - start

    callbacks, attribution_names = instantiate_callbacks(cfg, sources, output_dir)
    _write_hydra_files(cfg, output_dir)
    loggers = instantiate_loggers(cfg, output_dir)
    trainer_kwargs: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False}
    if cfg.trainer.get("default_root_dir") is None:
        trainer_kwargs["default_root_dir"] = str(output_dir)
    trainer = hydra.utils.instantiate(cfg.trainer, **trainer_kwargs)

    attribution = [cb for cb in callbacks if _attr_instance(cb)]
    timers = [HookTimer(cb) for cb in attribution] if trainer.world_size == 1 else []

    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule)
    except MisconfigurationException as err:  # a setting that cannot work: say which override fixes it
        raise UsageError(cli_hints(str(err), f"callbacks.{attribution_names[0]}") if attribution_names else str(err)) from err
    timings["fit_s"] = time.perf_counter() - start
    if timers:
        timings["attribution_callback_s"] = sum(t.total for t in timers)
        timings["training_without_callback_s"] = timings["fit_s"] - timings["attribution_callback_s"]

    start = time.perf_counter()
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items()
        # the callback's running counters stop at the last batch; the store's own totals are below
        if torch.is_tensor(v) and v.numel() == 1 and not k.startswith("attribution/")
    }  # fmt: skip
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["output_dir"] = str(output_dir)
    if trainer.is_global_zero:
        atomic_write(output_dir / "model.pt", lambda p: torch.save(model.state_dict(), p))
        write_text(output_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    timings["save_s"] = time.perf_counter() - start

    summary = {
        "run_dir": str(output_dir),
        "model": str(output_dir / "model.pt"),
        "config": str(output_dir / "config.yaml"),
        # relative to the run directory when inside it, so a moved or copied run still works
        "responses": {name: _relative_to(cb.dirpath, output_dir) for name, cb in zip(attribution_names, attribution)},
        "simulation": {name: _simulation_costs(cb.dirpath) for name, cb in zip(attribution_names, attribution)},
        "n_train": datamodule.n_train,
        "n_sources": datamodule.n_train if sources is None else len(set(sources)),
        "global_step": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "metrics": metrics,
        "timings": timings,
    }
    if trainer.is_global_zero:
        write_json(output_dir / "run.json", summary)
        print_train_summary(summary)
    return summary


def _simulation_costs(dirpath: str) -> dict[str, dict[str, Any]]:
    """Per response checkpoint, the costs its manifest records (the one source of these numbers)."""
    from lightning_attr.store import ResponseStore, has_store

    if not has_store(dirpath):
        return {}
    keys = ("curvature_products", "simulation_seconds", "n_valid", "n_shortfall", "n_missing_examples", "epoch")
    manifest = ResponseStore.load(dirpath).manifest
    return {c["name"]: {k: c[k] for k in keys if k in c} for c in manifest["checkpoints"]}


def _relative_to(path: str, root: Path) -> str:
    p, root = Path(path).resolve(), root.resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def _attr_instance(cb: Any) -> bool:
    from lightning_attr import AttributionCallback

    return isinstance(cb, AttributionCallback)


@hydra.main(version_base="1.3", config_path="pkg://lightning_attr.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    route_logging_to_job_log()
    with exit_on_usage_error():
        summary = run_train(cfg)
    return summary["metrics"].get("val/acc")


if __name__ == "__main__":
    main()
