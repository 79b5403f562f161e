"""Your own LightningModule, and attribution inside ``Trainer.predict``.

The network is yours (not ``lightning_attr.models``): mix in ``AttributionMixin``, implement the two
contract methods, keep your ``training_step``. At query time ``predict_step`` returns each query's
top-3 proponents and opponents; ``Trainer.predict`` collects them over batches.

Checks (asserted): most queries' strongest proponent is a training example of the query's own class
(chance: 1 in 10), and the top-k from ``predict`` equal the top-k of the full score matrix.
"""

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import AttributionCallback, AttributionMixin, IndexedDataset
from lightning_attr.data import load_digits


class DigitNet(AttributionMixin, L.LightningModule):
    def __init__(self, responses: str | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        self.responses = responses  # the store predict_step reads; set after training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    # The attribution contract. `batch` arrives here as (x, y): without the example index.
    def attribution_outputs(self, batch):
        return self(batch[0])

    def attribution_output_loss(self, outputs, batch):
        return F.cross_entropy(outputs, batch[1], reduction="none")  # per example: Tensor[B]

    def training_step(self, batch, batch_idx):
        x, y, _index = batch  # IndexedDataset appends the example index
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def predict_step(self, batch, batch_idx):
        return self.attribute(batch, responses=self.responses, top_k=3)  # a TopKAttribution; forward passes only

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def main() -> None:
    L.seed_everything(0, verbose=False)
    digits = load_digits(n_train=1000)
    train = IndexedDataset(TensorDataset(digits.x_train, digits.y_train))
    net = DigitNet()
    callback = AttributionCallback(horizon=50)
    trainer = L.Trainer(max_epochs=10, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_model_summary=False)
    trainer.fit(net, DataLoader(train, batch_size=64, shuffle=True))

    net.responses = callback.dirpath
    queries = DataLoader(TensorDataset(digits.x_test, digits.y_test), batch_size=100)
    batches = trainer.predict(net, queries)  # one TopKAttribution per batch
    proponents = torch.cat([top.proponent_indices for top in batches])  # [Q, 3] training-example positions
    with torch.no_grad():
        pred = net(digits.x_test).argmax(-1)

    same_class = (digits.y_train[proponents[:, 0]] == digits.y_test).float().mean().item()
    accuracy = (pred == digits.y_test).float().mean().item()
    print(f"{len(proponents)} test queries, accuracy {accuracy:.3f}; the strongest proponent shares the "
          f"query's label for {same_class:.0%} of them (chance 10%)")
    assert same_class > 0.5, same_class

    full = net.attribute((digits.x_test[:100], digits.y_test[:100]), responses=callback.dirpath)  # [100, 1000]
    assert torch.equal(full.topk(3).indices, proponents[:100]), "predict's top-k differ from the score matrix"
    print("predict_step's top-3 match attribute()'s full score matrix")


if __name__ == "__main__":
    main()
