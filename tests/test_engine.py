"""The simulation engine on a bare nn.Module (no Lightning): the partition, the curvature operator and the
codec are inputs, and what it writes is the explicit damped-influence matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_attr import AttributionMixin, IndexedDataset
from lightning_attr.attributor import Attributor
from lightning_attr.curvature import curvature_operator, shared_operator
from lightning_attr.engine import SimulationEngine, SourcePartition, TrainingData
from lightning_attr.functional import functional_view
from lightning_attr.models import mlp
from lightning_attr.parameters import ParameterSpace
from lightning_attr.settings import AttributionSettings
from lightning_attr.sources import SourceMap
from lightning_attr.spectral import eigenspace_products
from lightning_attr.store import ResponseStore

from conftest import blobs, exact_influence, pearson


class Net(AttributionMixin, nn.Module):
    """A plain module with the attribution contract (no LightningModule)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(6, [16], 3)

    def forward(self, x):
        return self.net(x)

    def attribution_outputs(self, batch):
        return self.net(batch[0])

    def attribution_output_loss(self, outputs, batch):
        return F.cross_entropy(outputs, batch[1], reduction="none")


@pytest.mark.parametrize("propagation", ["chebyshev", "spectral"])
def test_engine_on_a_bare_module_writes_the_exact_damped_influence(tmp_path, propagation):
    """End mode with full-batch curvature (a step rule, or the spectral inverse), two partitions of the sources run one after the other as two processes
    would (each writing its part), a curvature operator passed in that counts its products: the committed store
    reads out as the explicit (1/n) grad f_q^T (G + lam I)^{-1} grad l_b."""
    x, y = blobs(n=120, d=6, classes=3)
    xq, yq = blobs(n=16, d=6, classes=3, seed=1)
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    for _ in range(150):  # near a minimum: the GGN target is what retraining would say
        optimizer.zero_grad()
        F.cross_entropy(model.attribution_outputs((x, y)), y).backward()
        optimizer.step()
    settings = AttributionSettings(mode="end", horizon=100, curvature_batch_size=512, propagation=propagation)
    space, source_map = ParameterSpace.of(model), SourceMap.build(None, 120)
    store = ResponseStore.create(tmp_path / "r", space, source_map, settings.to_manifest())
    calls = []

    def counting_ggn(model_, theta, batches):
        operator = curvature_operator("ggn", model_, theta, batches, chunk_size=64)
        return lambda block: (calls.append(block.shape[0]), operator(block))[1]

    engines = [
        SimulationEngine(settings, source_map, space, str(store.path), SourcePartition(rank, 2), curvature=counting_ggn)
        for rank in range(2)
    ]
    with functional_view(model, space) as (functional, theta):
        data = TrainingData(IndexedDataset(torch.utils.data.TensorDataset(x, y)), None, "index", theta.device)
        for engine in engines:
            engine.simulate_checkpoint(functional, theta, data, "final", step=0)
    engines[0].commit(store, "final", space.current(model).detach(), {"mode": "end"}, parts=2)
    assert engines[0].propagation() == propagation
    # a step rule: horizon products per source, split over the processes; spectral: each finds the eigenspace (rank="auto":
    # here all of R^P, trace(G) read from its first block, no Hutchinson probes of their own)
    expected = 120 * 100 if propagation == "chebyshev" else 2 * eigenspace_products(space.size, min(256, space.size))
    assert sum(e.products for e in engines) == expected
    assert sum(calls) >= expected  # every product went through the operator passed in

    damping = store.checkpoint_info("final")["step_rule"]["damping"]
    ours = Attributor(model, store.path).scores((xq, yq))
    exact = exact_influence(model, x, y, xq, yq, damping)
    assert pearson(ours, exact) >= 0.99
    assert abs(float((ours * exact).sum() / (exact * exact).sum()) - 1) <= 0.05  # least-squares slope


def test_the_training_data_reads_only_the_examples_asked_for():
    """A process reads its own examples alone (not the whole training set, filtered): on a ``random_split`` part of an
    IndexedDataset, the examples whose indices are asked for, in order, and nothing else is read."""
    x, y = blobs(n=60, d=6, classes=3)
    reads = []

    class Counted(torch.utils.data.TensorDataset):
        def __getitem__(self, i):
            reads.append(int(i))
            return super().__getitem__(i)

    part = torch.utils.data.random_split(IndexedDataset(Counted(x, y)), [40, 20], torch.Generator().manual_seed(0))[0]
    wanted = torch.zeros(60, dtype=torch.bool)
    wanted[torch.as_tensor(part.indices[::4])] = True
    batches = list(TrainingData(part, None, "index", torch.device("cpu")).in_order(3, wanted))
    index = torch.cat([i for _, i in batches])
    assert index.tolist() == part.indices[::4] and sorted(reads) == sorted(part.indices[::4])
    torch.testing.assert_close(torch.cat([d[0] for d, _ in batches]), x[index])


def test_the_curvature_shared_by_processes_is_the_full_data_curvature():
    """``shared_operator`` (propagation="spectral" on several processes): each process's curvature over its own
    block of examples (unequal blocks, one process with none), weighted by its share; the strategy's sum over the
    processes (here: adding the parts) is the curvature over all the examples."""
    x, y = blobs(n=90, d=6, classes=3)
    model = Net()
    space = ParameterSpace.of(model)
    block = torch.randn(5, space.size, generator=torch.Generator().manual_seed(0))
    with functional_view(model, space) as (functional, theta):
        full = curvature_operator("ggn", functional, theta, [(x[:64], y[:64]), (x[64:], y[64:])])(block)
        blocks = [(x[:70], y[:70]), (x[70:], y[70:]), None]  # 70, 20 and 0 examples
        counts = [70, 20, 0]
        parts = [
            shared_operator(curvature_operator("ggn", functional, theta, [b]) if b else None, c, 90, lambda t: t)(block)
            for b, c in zip(blocks, counts)
        ]
    torch.testing.assert_close(sum(parts), full, rtol=1e-5, atol=1e-7 * float(full.abs().max()))
    assert not bool(parts[2].any())


def test_the_engine_and_what_it_uses_do_not_import_lightning():
    """Only the callback translates Lightning's hooks: the engine's modules import no `lightning` package."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "lightning_attr"
    for name in ("engine", "settings", "simulation", "store", "curvature", "spectral", "codecs", "readout", "sources", "column_split", "phases"):
        tree = ast.parse((package / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in imported if m.split(".")[0] in ("lightning", "pytorch_lightning")}, name
