"""The README quickstart, verbatim (tests/test_readme.py checks that the two agree).

Run it twice in the same folder: the second store goes to ./responses_v1, nothing is overwritten.
"""

import lightning as L, torch
from torch.utils.data import DataLoader, TensorDataset
from lightning_attr import AttributionCallback, IndexedDataset
from lightning_attr.data import load_digits
from lightning_attr.models import Classifier, mlp   # or your own: class Net(AttributionMixin, L.LightningModule)

digits = load_digits(n_train=1400)                  # 1,400 train / 397 test, 64 features
train = IndexedDataset(TensorDataset(digits.x_train, digits.y_train))  # items (x, y, index)
net = Classifier(mlp(64, [64], 10), lr=0.05, momentum=0.9, weight_decay=1e-3)
cb = AttributionCallback()                          # end mode: the GGN's damped inverse after 10%, 20% and 100% of the fit
trainer = L.Trainer(max_epochs=20, callbacks=[cb], logger=False, enable_checkpointing=False)
trainer.fit(net, DataLoader(train, batch_size=64, shuffle=True))

queries = (digits.x_test[:8], digits.y_test[:8])
scores = net.attribute(queries, responses=cb.dirpath)          # Tensor[8, 1400]
top = net.attribute(queries, responses=cb.dirpath, top_k=5)    # proponents and opponents
print(scores.shape, top.proponent_indices[0], top.opponent_scores[0])
flagged = net.self_influence((digits.x_train, digits.y_train, torch.arange(1400)), responses=cb.dirpath)
print("most self-influential (suspicious) examples:", flagged.topk(5).indices.tolist())
