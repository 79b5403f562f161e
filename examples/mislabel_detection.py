"""Mislabel detection: flip 5% of the training labels, rank every example by its self-influence.

Self-influence is an example's score against its own source: how much its own loss would rise if it
were left out. An example the model fits only by memorizing it, as a flipped label, scores high.

Checks (asserted): the flipped labels are found far above chance (AUC and precision among the
highest-ranked examples).
"""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_auroc

from lightning_attr import AttributionCallback, IndexedDataset
from lightning_attr.data import load_digits
from lightning_attr.models import Classifier, mlp


def main() -> None:
    L.seed_everything(0, verbose=False)
    digits = load_digits(n_train=1400)
    n = len(digits.y_train)
    generator = torch.Generator().manual_seed(0)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=generator)[: n // 20]] = True  # 5%: 70 examples
    labels = digits.y_train.clone()
    offset = torch.randint(1, 10, (n,), generator=generator)
    labels[flipped] = (labels[flipped] + offset[flipped]) % 10  # a different class, never the true one

    train = IndexedDataset(TensorDataset(digits.x_train, labels))
    net = Classifier(mlp(64, [64], 10), lr=0.05, momentum=0.9, weight_decay=1e-3)
    callback = AttributionCallback()
    trainer = L.Trainer(max_epochs=15, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_model_summary=False)
    trainer.fit(net, DataLoader(train, batch_size=64, shuffle=True))

    everything = (digits.x_train, labels, torch.arange(n))  # training batches carry their index
    self_influence = net.self_influence(everything, responses=callback.dirpath)  # [n]
    auc = binary_auroc(self_influence, flipped.long()).item()
    top = self_influence.topk(int(flipped.sum())).indices
    precision = flipped[top].float().mean().item()
    print(f"{int(flipped.sum())} of {n} labels flipped; self-influence ranks them with AUC {auc:.3f}; "
          f"{precision:.0%} of the {len(top)} highest are flipped (chance {flipped.float().mean():.0%})")
    assert auc > 0.85 and precision > 0.5, (auc, precision)


if __name__ == "__main__":
    main()
