"""Bounded memory: end mode in blocks of sources, online sources retired to shards as they finish, a readout
that streams the shards, and a checkpoint that is listed only when every process wrote its part."""

from __future__ import annotations

import pytest
import torch

from lightning_attr import AttributionCallback
from lightning_attr import simulation
from lightning_attr.attributor import Attributor
from lightning_attr.settings import AttributionSettings
from lightning_attr.parameters import ParameterSpace
from lightning_attr.simulation import OnlineSimulation, propagate, resolve_step_rule
from lightning_attr.curvature import Spectrum
from lightning_attr.sources import SourceMap
from lightning_attr.store import ResponseStore, ShardWriter, StoreError, write_part

from conftest import blobs, fit, small_mlp

P = 163  # small_mlp(6, 3): 6*16 + 16 + 16*3 + 3
BLOCK = 32
BUDGET_MB = BLOCK * 28 * P / 2**20 + 1e-6  # AttributionSettings.block_size: floor(budget / (28 P)) = 32 sources


@pytest.fixture(scope="module")
def end_mode_stores(tmp_path_factory):
    """The same end-mode fit (160 sources, a checkpoint after epoch 3) simulated in one block and in blocks of 32."""
    x, y = blobs(n=160, d=6, classes=3)
    out = {}
    for name, budget in (("whole", 1024.0), ("blocks", BUDGET_MB)):
        torch.manual_seed(0)  # the same initial weights
        model = small_mlp(6, 3)
        cb = AttributionCallback(
            tmp_path_factory.mktemp(name) / "r", mode="end", horizon=10, checkpoint_epochs=[3], memory_budget_mb=budget
        )
        fit(model, x, y, [cb], epochs=5)
        out[name] = (model, ResponseStore.load(cb.dirpath))
    return out


def test_block_size_follows_the_memory_budget():
    assert AttributionSettings(memory_budget_mb=BUDGET_MB).block_size(P) == BLOCK
    assert AttributionSettings(memory_budget_mb=1e-9).block_size(P) == 1
    with pytest.raises(Exception, match="memory_budget_mb must be a number > 0"):
        AttributionCallback(memory_budget_mb=0, mode="online")


def test_end_mode_in_blocks_equals_one_block(end_mode_stores):
    """Each block of 32 sources is simulated and written as its own shard; the responses are the one-block ones."""
    _, whole = end_mode_stores["whole"]
    _, blocks = end_mode_stores["blocks"]
    for name in ("epoch=3", "final"):
        shards = blocks.checkpoint_info(name)["shards"]
        assert [s["rows"] for s in shards] == [BLOCK] * 5 and len(whole.checkpoint_info(name)["shards"]) == 1
        assert blocks.checkpoint_info(name)["simulation_seconds"] > 0
        a, b = whole.responses(name), blocks.responses(name)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * float(a.abs().max()))


def test_streamed_readout_never_builds_s_by_p(end_mode_stores, monkeypatch):
    """Over its memory budget, a member is read shard by shard at every query (the ensemble of both checkpoints
    and self-influence too), with the scores of the in-memory readout."""
    model, store = end_mode_stores["blocks"]
    xq, yq = blobs(n=12, d=6, classes=3, seed=1)
    x, y = blobs(n=160, d=6, classes=3)
    in_memory = model.attribute((xq, yq), responses=store.path)
    self_in_memory = model.self_influence((x[:20], y[:20], torch.arange(20)), responses=store.path)

    def refuse(*args, **kwargs):
        raise AssertionError("ResponseStore.responses builds S x P")

    monkeypatch.setattr(ResponseStore, "responses", refuse)
    streamed = model.attribute((xq, yq), responses=store.path, memory_budget_mb=0.05)
    torch.testing.assert_close(streamed, in_memory, rtol=1e-5, atol=1e-7)
    self_streamed = Attributor(model, store.path, memory_budget_mb=0.05).self_influence((x[:20], y[:20], torch.arange(20)))
    torch.testing.assert_close(self_streamed, self_in_memory, rtol=1e-5, atol=1e-7)


def test_online_sources_are_retired_to_shards_during_the_fit(tmp_path, monkeypatch):
    """Online, a per-example source leaves memory when its horizon is spent: the live rows stay far below S and
    most sources are in shards before the fit ends; every source is written once."""
    live_rows, emitted_before_finish = [], []
    step, finish = OnlineSimulation.step, OnlineSimulation.finish
    monkeypatch.setattr(OnlineSimulation, "step", lambda self, op: (live_rows.append(self.solution.shape[0]), step(self, op))[1])
    monkeypatch.setattr(
        OnlineSimulation, "finish", lambda self, **kw: (emitted_before_finish.append(int(self.emitted.sum())), finish(self, **kw))[1]
    )
    x, y = blobs(n=160, d=6, classes=3)
    cb = AttributionCallback(tmp_path / "r", horizon=3, curvature_batch_size=16, memory_budget_mb=BUDGET_MB, mode="online")
    fit(small_mlp(6, 3), x, y, [cb], epochs=6, batch_size=16)
    store = ResponseStore.load(cb.dirpath)
    assert max(live_rows) <= 4 * 16 < 160  # (horizon + 1) pools of 16 examples
    assert emitted_before_finish[0] >= 160 - 4 * 16
    shards = store.checkpoint_info("final")["shards"]
    assert len(shards) >= 5 and all(s["rows"] <= BLOCK for s in shards)
    responses = store.responses("final")
    assert torch.isfinite(responses).all() and bool(store.scorable("final").all())


def test_group_is_parked_until_its_last_member(monkeypatch):
    """A group whose horizon runs out before its last member arrives keeps its solution (parked, not written) and
    continues from it: its response is the sum of each member's propagated gradient, written once."""
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    a = ((basis * torch.logspace(-2, 0, 8, dtype=torch.float64)) @ basis.T).float()
    op = lambda v: v @ a  # noqa: E731
    rule = resolve_step_rule(Spectrum(1.0, 0.2), propagation="heavy_ball")
    grads = torch.randn(2, 8, generator=g)
    # the "batch" is the member's gradient itself: one example per injection
    monkeypatch.setattr(simulation, "source_gradients", lambda model, theta, batch, rows, num_rows, losses=None: batch)
    monkeypatch.setattr(simulation, "batch_losses", lambda model, theta, batch: torch.zeros(len(batch)))  # all finite
    written = []
    sink = lambda sources, rows: written.append((sources, rows))  # noqa: E731
    online = OnlineSimulation(torch.tensor([0, 0]), 1, 8, 3, rule, torch.device("cpu"), sink=sink, num_examples=1)
    online.inject(None, None, grads[:1], torch.tensor([0]))
    for _ in range(5):
        online.step(op)
    assert online.num_live == 0 and online.parked_sources.tolist() == [0] and not written
    online.inject(None, None, grads[1:], torch.tensor([1]))
    for _ in range(5):
        online.step(op)
    assert len(written) == 1 and written[0][0].tolist() == [0]
    expected = propagate(grads[:1], [op] * 3, rule) + propagate(grads[1:], [op] * 3, rule)
    torch.testing.assert_close(written[0][1], expected, rtol=1e-5, atol=1e-6)


def test_checkpoint_is_listed_only_when_every_part_is_written(tmp_path):
    """Two processes' shares of one checkpoint: with one part missing (a process crashed) the commit is refused
    and the manifest is unchanged; with both, every source reads back from the shards."""
    space = ParameterSpace(("w",), ((3,),), ("torch.float32",))
    source_map = SourceMap.build(None, 4)
    store = ResponseStore.create(tmp_path / "s", space, source_map, {})
    responses = torch.arange(12.0).reshape(4, 3)
    stats = {"valid": torch.ones(4, dtype=torch.bool), "shortfall": torch.zeros(4), "missing_examples": torch.zeros(4)}
    for rank, owned in ((0, torch.tensor([0, 1])), (1, torch.tensor([2, 3]))):
        writer = ShardWriter(store.path, "final", space, prefix=f"r{rank}-", rows_per_shard=1)
        writer.add(owned.flip(0), responses[owned.flip(0)])
        writer.flush()
        write_part(store.path, "final", rank, writer.shards, owned, {k: v[owned] for k, v in stats.items()}, {})
        if rank == 0:
            with pytest.raises(StoreError, match="part-00001.safetensors is missing: process 1 did not finish"):
                store.commit("final", torch.zeros(3), info={}, parts=2)
            assert ResponseStore.load(store.path).checkpoints == []
    store.commit("final", torch.zeros(3), info={}, parts=2)
    reopened = ResponseStore.load(store.path)
    assert len(reopened.checkpoint_info("final")["shards"]) == 4
    torch.testing.assert_close(reopened.responses("final"), responses)
