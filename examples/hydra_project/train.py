"""A Hydra + Lightning project of your own that composes ``callbacks: [attribution]``.

    python examples/hydra_project/train.py                       # -> outputs/<date>/<time>/responses
    python examples/hydra_project/train.py callbacks.attribution.horizon=50 trainer.max_epochs=5

Only ``configs/train.yaml`` is yours; the callback's config comes from lightning_attr. Its ``dirpath``
is null, so the store lands in Hydra's run directory (``hydra.run.dir``), next to ``train.log``.

Checks (asserted): the store is in the run directory and most test queries' strongest proponent has
the query's label (chance: 1 in 10).
"""

from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import IndexedDataset
from lightning_attr.data import load_digits
from lightning_attr.models import Classifier, mlp


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    L.seed_everything(0, verbose=False)
    digits = load_digits(n_train=cfg.n_train)
    train = IndexedDataset(TensorDataset(digits.x_train, digits.y_train))
    net = Classifier(mlp(64, [64], 10), lr=cfg.lr)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks)
    trainer.fit(net, DataLoader(train, batch_size=cfg.batch_size, shuffle=True))

    store = Path(callbacks[0].dirpath)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    assert store == run_dir / "responses", (store, run_dir)
    top = net.attribute((digits.x_test, digits.y_test), responses=store, top_k=1)
    same = (digits.y_train[top.proponent_indices[:, 0]] == digits.y_test).float().mean().item()
    print(f"store: {store}\nthe strongest proponent shares the query's label for {same:.0%} of "
          f"{len(digits.y_test)} test queries (chance 10%)")
    assert same > 0.5, same


if __name__ == "__main__":
    main()
