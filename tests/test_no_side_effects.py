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


class _OwnTrain(nn.Linear):
    """A Linear layer whose ``train`` counts its calls (a module with its own ``train``)."""

    calls = 0

    def train(self, mode: bool = True):
        type(self).calls += 1
        return super().train(mode)


@pytest.mark.parametrize("start", ["training", "mixed", "eval", "eval, own train"])
def test_functional_view_puts_every_module_in_eval_mode_and_restores_each_flag(start):
    """Inside functional_view every submodule is in eval mode (``module.eval()`` called, so a module's own ``train``
    runs, even where every flag is already off); afterwards each module's own flag is back, also one the block
    changed."""
    from lightning_attr.functional import functional_view

    layer = _OwnTrain(6, 3) if start == "eval, own train" else nn.Linear(6, 3)
    model = Classifier(nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), layer))
    model.train(start in ("training", "mixed"))
    if start == "mixed":
        model.net[1].eval()
    before = [m.training for m in model.modules()]
    _OwnTrain.calls = 0
    with functional_view(model) as (fm, _):
        assert not any(m.training for m in model.modules())
        model.net[0].train()  # changed inside: restored too
    assert [m.training for m in model.modules()] == before
    assert _OwnTrain.calls == (1 if start == "eval, own train" else 0)


def test_functional_model_runs_its_own_module_and_flat_parameters_are_float32():
    """The method caller kept in the module's ``__dict__`` is the module's own: one found there that wraps another
    module (``copy.copy`` shares it) is replaced, so the outputs are this module's; the flat parameters of a module
    with float64 and float32 parameters equal each parameter cast to float32, in the space's order."""
    from lightning_attr.functional import FunctionalModel, functional_view

    torch.manual_seed(0)
    plain, squashed = Classifier(nn.Sequential(nn.Linear(4, 3))), Classifier(nn.Sequential(nn.Linear(4, 3), nn.Tanh()))
    x, y = blobs(n=5, d=4, classes=3)
    with functional_view(plain) as (fm, theta):
        assert FunctionalModel(plain)._caller is fm._caller  # kept
    squashed.__dict__["_attribution_caller"] = fm._caller  # another module's caller
    with functional_view(squashed) as (fm, theta):
        torch.testing.assert_close(fm.outputs(theta, (x, y)), squashed(x))
    mixed = nn.Sequential(nn.Linear(4, 3).double(), nn.Linear(3, 2))
    with functional_view(Classifier(mixed)) as (_, theta):
        expected = torch.cat([p.detach().float().reshape(-1) for p in mixed.parameters()])
    assert theta.dtype == torch.float32 and torch.equal(theta, expected)


def test_a_module_read_by_functional_view_still_deep_copies_saves_and_loads(tmp_path):
    """The method caller left in the module's ``__dict__`` does not leak: the module's state_dict and submodules are
    as before, ``copy.deepcopy`` (as Lightning's WeightAveraging / AveragedModel does) gives a copy whose caller runs
    the copy, and ``torch.save`` of the whole module loads back (``weights_only=False``: a pickled module, the user's
    own file) with the same outputs."""
    import copy

    from lightning_attr.functional import functional_view

    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    keys, children = list(model.state_dict()), [name for name, _ in model.named_modules()]
    x, y = blobs(n=5, d=4, classes=2)
    with functional_view(model) as (_, _theta):
        pass
    assert "_attribution_caller" in model.__dict__
    assert list(model.state_dict()) == keys and [name for name, _ in model.named_modules()] == children
    twin = copy.deepcopy(model)
    assert twin.__dict__["_attribution_caller"].inner is twin  # the copy's own caller, not the original's
    with torch.no_grad():
        twin.net[0].weight.add_(1.0)
    with functional_view(twin) as (fm, theta):
        torch.testing.assert_close(fm.outputs(theta, (x, y)), twin(x))
    assert not torch.allclose(twin(x), model(x))
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with functional_view(loaded) as (fm, theta):
        torch.testing.assert_close(fm.outputs(theta, (x, y)), model(x))
