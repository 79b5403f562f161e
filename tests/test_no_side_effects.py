"""The simulation must not change training: final weights are bit-identical with and without it."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import blobs, fit
from torch import nn

from lightning_attr import AttributionCallback
from lightning_attr.models import Classifier


def dropout_bn_model() -> Classifier:
    net = nn.Sequential(
        nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3)
    )
    return Classifier(net, lr=0.05, momentum=0.9, weight_decay=1e-3)


def final_state(callbacks, **kwargs) -> dict[str, torch.Tensor]:
    x, y = blobs(n=200, d=6, classes=3)
    L.seed_everything(0, verbose=False)
    model = dropout_bn_model()
    fit(model, x, y, callbacks, epochs=6, batch_size=16, **kwargs)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "make_callback",
    [
        lambda d: AttributionCallback(d, mode="online", horizon=10),
        lambda d: AttributionCallback(d, mode="end", horizon=5, checkpoint_epochs=[3], curvature_batch_size=64),
    ],
    ids=["online", "end+checkpoints"],
)
def test_weights_bit_identical_with_dropout_batchnorm_and_accumulation(tmp_path, make_callback):
    plain = final_state([], accumulate_grad_batches=2)
    cb = make_callback(tmp_path / "r")
    attributed = final_state([cb], accumulate_grad_batches=2)
    assert plain.keys() == attributed.keys()
    for key in plain:  # parameters and BatchNorm running statistics
        assert torch.equal(plain[key], attributed[key]), key
    assert cb.dirpath is not None and (tmp_path / "r" / "manifest.json").exists()


def test_global_rng_stream_is_untouched(tmp_path):
    """After the fit, the global generator is where it would be without the callback."""
    final_state([])
    plain_next = torch.rand(3)
    final_state([AttributionCallback(tmp_path / "r", mode="online", horizon=10)])
    assert torch.equal(plain_next, torch.rand(3))


class _GradSnapshot(L.Callback):
    """Records parameter gradients in on_before_optimizer_step (before or after the simulation runs)."""

    def __init__(self) -> None:
        self.seen: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append([p.grad.clone() for p in pl_module.parameters()])


def test_simulation_leaves_gradients_untouched(tmp_path):
    x, y = blobs(n=64, d=6, classes=3)
    model = dropout_bn_model()
    before, after = _GradSnapshot(), _GradSnapshot()
    cb = AttributionCallback(tmp_path / "r", mode="online", horizon=4)
    fit(model, x, y, [before, cb, after], epochs=3, batch_size=16)  # callbacks run in list order
    assert cb._products > 0 and len(before.seen) == len(after.seen) == 12
    for grads_before, grads_after in zip(before.seen, after.seen):
        assert all(torch.equal(a, b) for a, b in zip(grads_before, grads_after))
    model.zero_grad(set_to_none=True)
    model.attribute((x[:4], y[:4]), responses=cb.dirpath)
    assert all(p.grad is None for p in model.parameters())
