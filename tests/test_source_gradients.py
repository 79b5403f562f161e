"""Per-source loss gradients (simulation.source_gradients): the per-example vmap and its whole-batch fallback give
autograd's numbers, summed by group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_attr import simulation
from lightning_attr.functional import FunctionalModel, eval_mode
from lightning_attr.models import Classifier, mlp


class _SqueezingNet(nn.Module):
    """Squeezes away the batch dimension, so a batch of one loses it: its per-example losses differ on batches of one."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(5, 3)

    def forward(self, x):
        return self.layer(x).squeeze()


class _ValueBranchNet(nn.Module):
    """Branches on a tensor's value in Python: vmap refuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(5, 3)

    def forward(self, x):
        out = self.layer(x)
        return out * 2 if bool(out.sum() > -1e9) else out


def _autograd(module: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``Tensor[R, P]``: each group's summed loss gradient, one ``torch.autograd.grad`` per example."""
    params = [p for p in module.parameters() if p.requires_grad]
    out = torch.zeros(num_rows, sum(p.numel() for p in params))
    losses = nn.functional.cross_entropy(module(x).reshape(len(x), -1), y, reduction="none")
    for i in range(len(x)):
        g = torch.autograd.grad(losses[i], params, retain_graph=True)
        out[rows[i]] += torch.cat([t.flatten() for t in g])
    return out


@pytest.mark.parametrize("net", [lambda: mlp(5, [7], 3), _SqueezingNet, _ValueBranchNet], ids=["mlp", "squeezing", "value-branch"])
@pytest.mark.parametrize("layout", ["per-example", "many-groups", "few-groups"])
def test_source_gradients_equal_autograd(net, layout, monkeypatch):
    torch.manual_seed(0)
    module = Classifier(net())
    n = 24
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    rows = {"per-example": torch.arange(n), "many-groups": torch.arange(n) % 20, "few-groups": torch.arange(n) % 3}[layout]
    num_rows = int(rows.max()) + 1
    calls = {"per_example": 0, "fallback": 0}
    original = simulation._per_example_gradients

    def counted(*args):
        result = original(*args)
        calls["per_example" if result is not None else "fallback"] += 1
        return result

    monkeypatch.setattr(simulation, "_per_example_gradients", counted)
    with eval_mode(module):
        model = FunctionalModel(module)
        theta = torch.cat([p.detach().flatten() for p in module.parameters()])
        got = simulation.source_gradients(model, theta, (x, y), rows, num_rows)
        expected = _autograd(module.net, x, y, rows, num_rows)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if layout == "few-groups":  # at most WHOLE_BATCH_MAX_ROWS rows: the whole batch's vjps, no per-example attempt
        assert num_rows <= simulation.WHOLE_BATCH_MAX_ROWS and calls == {"per_example": 0, "fallback": 0}
    elif net in (_SqueezingNet, _ValueBranchNet):  # tried, refused, the whole batch's vjps
        assert calls == {"per_example": 0, "fallback": 1}
    else:
        assert num_rows > simulation.WHOLE_BATCH_MAX_ROWS and calls == {"per_example": 1, "fallback": 0}


def test_finite_rows_flags_nan_and_infinite_entries_but_not_a_sum_that_overflows():
    rows = torch.randn(6, 1000)
    rows[1, 17], rows[3, 999], rows[4, 0] = float("nan"), float("inf"), -float("inf")
    rows[5] = 3e38  # every entry finite, the row's sum is not
    assert simulation.finite_rows(rows).tolist() == [True, False, True, False, False, True]
    assert simulation.finite_rows(rows[:0]).shape == (0,)
