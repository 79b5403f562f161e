"""DDP through Lightning's strategy: 2 CPU processes (gloo), each simulating its own block of sources.

The fits are in ``tests/ddp_fit.py``: on one process here, on two in a script of their own (Lightning's
``ddp_fork`` launcher forks the processes from it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from operator import itemgetter

import lightning as L
import pytest
import torch

from ddp_fit import UNTRAINED, fit_stores
from lightning_attr import AttributionCallback
from lightning_attr.callback import _Weights
from lightning_attr.engine import checkpoint_owners
from lightning_attr.parameters import ParameterSpace
from lightning_attr.store import ResponseStore, StoreError

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_fit.py")


def _run(out, *args: str) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(SCRIPT))  # this checkout first, as the tests import it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, SCRIPT, str(out), *args], env=env, capture_output=True, text=True, timeout=180
    )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"{SCRIPT} {args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same fits (online, end mode, end mode with a step rule, online with 10 groups; a checkpoint after epoch 2 and the final one) on 1
    and 2 processes, and
    on 2 where process 1 fails at step 20, inside the final window (``two/crashed``)."""
    out = tmp_path_factory.mktemp("ddp")
    fit_stores(str(out / "one"), 1)
    done = _run(out / "two", "--devices", "2", "--crash-at", "20")
    assert "the crashed fit failed as planned" in done.stdout
    (out / "two.log").write_text(done.stdout + done.stderr)
    return out


# end mode: which processes simulated each checkpoint (the callback's checkpoint_owners); online: both, every window
WRITERS = {
    "online": {"epoch=2": (0, 1), "final": (0, 1)}, "groups": {"epoch=2": (0, 1), "final": (0, 1)},
    "end": {"epoch=2": (0,), "final": (1,)}, "end_steps": {"epoch=2": (0,), "final": (1,)}, "subset": {"final": (0, 1)},
    "eigen": {"epoch=2": (0,), "epoch=4": (1,), "final": (0, 1)}, "factored": {"epoch=2": (0,), "epoch=4": (1,), "final": (0, 1)},
    "untrained": {"epoch=2": (0,), "epoch=4": (1,), "final": (0, 1)},
}


def _same_products(one: ResponseStore, two: ResponseStore, name: str) -> None:
    """A checkpoint's eigenspace spent the same products on 2 processes as on one, and so did the fit up to the
    checkpoint (its ``curvature_products``: every process's products summed, a shared product counted once; in end mode
    the checkpoints are committed after the fit, so only the final one's count is the whole fit's on both)."""
    a, b = one.checkpoint_info(name), two.checkpoint_info(name)
    for record, key in (("step_rule", "eigenspace_products"), ("spectral", "curvature_products")):
        if isinstance(a.get(record), dict) and key in a[record]:
            assert b[record][key] == a[record][key]
    if name == "final" or a["mode"] == "online":
        assert b["curvature_products"] == a["curvature_products"]


@pytest.mark.parametrize("mode", ["online", "end", "end_steps", "groups", "subset"])
def test_two_processes_write_the_single_process_store(stores, mode):
    """Online, each process simulates and writes its half of the sources of every window. End mode, after the fit, a
    trajectory ensemble's checkpoints go to one process each (every source, no collective), the rest are shared (each
    process its half of the sources); rank zero lists them. The store equals the single-process one within float
    tolerance (the same examples per optimizer step, pooled in another order)."""
    one, two = ResponseStore.load(stores / "one" / mode), ResponseStore.load(stores / "two" / mode)
    assert one.checkpoints == two.checkpoints == list(WRITERS[mode])
    for name in two.checkpoints:
        info = two.checkpoint_info(name)
        assert info["processes"] == 2 and two.n_sources == {"groups": 10, "subset": 160}.get(mode, 192)  # subset: its members
        assert {s["file"].split("/")[1][:13] for s in info["shards"]} == {f"responses-r{r}-" for r in WRITERS[mode][name]}
        if mode in ("end", "end_steps") and name != "final":  # simulated after the fit, at the weights of its epoch
            assert (info["epoch"], info["global_step"]) == (1, 12) == itemgetter("epoch", "global_step")(one.checkpoint_info(name))
            torch.testing.assert_close(two.theta(name), one.theta(name))
            assert not torch.allclose(two.theta(name), two.theta("final"), rtol=1e-2)
        _same_products(one, two, name)
        a, b = one.responses(name), two.responses(name)
        assert torch.isfinite(a).all() and bool(two.scorable(name).all())
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
        assert not any(p.name.startswith("part-") for p in (two.path / name).iterdir())  # merged, then removed


def test_examples_no_process_trained_on_score_nan_and_the_rest_as_on_one_process(stores):
    """Each process's batches hold its half of examples 0-159 (160-191: none). The processes sum their records of the
    examples trained on before the end-mode simulation: the last 32 sources score NaN (``missing_examples``) on 2
    processes as on one, every other example counts as trained on (without the sum each process would take the other's
    half for untrained), and the responses of the 160 equal the single-process store's, alone or shared."""
    one, two = ResponseStore.load(stores / "one" / "untrained"), ResponseStore.load(stores / "two" / "untrained")
    assert one.checkpoints == two.checkpoints == list(WRITERS["untrained"])
    trained = torch.arange(192) < 192 - UNTRAINED
    for name in two.checkpoints:
        info = two.checkpoint_info(name)
        assert {s["file"].split("/")[1][:13] for s in info["shards"]} == {f"responses-r{r}-" for r in WRITERS["untrained"][name]}
        assert info["untrained"] == one.checkpoint_info(name)["untrained"] == {
            "examples": UNTRAINED, "sources": UNTRAINED, "partly_trained_sources": 0, "trained_examples": 192 - UNTRAINED
        }  # fmt: skip
        assert torch.equal(two.scorable(name), trained) and torch.equal(one.scorable(name), trained)
        a, b = one.responses(name), two.responses(name)
        assert a[~trained].isnan().all() and b[~trained].isnan().all() and b[trained].isfinite().all()
        torch.testing.assert_close(b[trained], a[trained], rtol=1e-4, atol=1e-5 * float(a[trained].abs().max()))
    assert len(re.findall(r"32 of 192 sources were never trained on", (stores / "two.log").read_text())) == 1


@pytest.mark.parametrize("codec", ["eigen", "factored"])
def test_two_processes_share_the_compressed_codecs(stores, codec):
    """Codecs "eigen" / "factored", three checkpoints: the first two go to one process each, the final one is shared
    (both find the eigenspace together, their halves of the examples and of the Krylov space's columns, each fills its
    own sources' rows, and rank zero writes their sum). The responses equal the single-process store's within float
    tolerance, with the same products; every process lists its costs."""
    one, two = ResponseStore.load(stores / "one" / codec), ResponseStore.load(stores / "two" / codec)
    assert one.checkpoints == two.checkpoints == list(WRITERS[codec])
    for name in two.checkpoints:
        info = two.checkpoint_info(name)
        assert info["codec"] == codec and info["processes"] == 2 and info["rank"] == 24 and len(info["process_costs"]) == 2
        _same_products(one, two, name)
        if codec == "eigen":
            assert info["spectral"]["curvature_examples"] == one.checkpoint_info(name)["spectral"]["curvature_examples"] == 192
        else:
            assert info["factored"]
        a, b = one.block(name).to_dense(), two.block(name).to_dense()
        assert torch.isfinite(a).all() and bool(two.scorable(name).all())
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * float(a.abs().max()))


@pytest.mark.parametrize("mode", ["online", "factored"])
def test_each_process_records_its_costs_per_phase(stores, mode):
    """The manifest lists each process's costs; its phases add up to its simulation time, and the checkpoint's
    ``simulation_seconds`` is the slowest process's. End mode: both processes simulated a checkpoint alone and shared
    the final one (its eigenspace's products, its split Krylov algebra and their collectives)."""
    info = ResponseStore.load(stores / "two" / mode).checkpoint_info("final")
    costs = info["process_costs"]
    assert len(costs) == 2 and info["simulation_seconds"] == max(c["simulation_seconds"] for c in costs)
    for process in costs:
        phases = process["phases"]
        # two clocks (the engine's and the phases'), started microseconds apart at each of the many online steps
        assert sum(p["seconds"] for p in phases.values()) == pytest.approx(process["simulation_seconds"], rel=0.02, abs=0.01)
        assert {"curvature products", "collectives", "gradients"} <= set(phases)
        if mode == "factored":  # no inverse applied: the eigen coordinates, not stored, are derived when the store is read
            assert {"eigenspace algebra", "write"} <= set(phases) and "inverse" not in phases


def test_the_end_of_fit_line_counts_every_processs_products(stores):
    """The callback's closing log line on 2 processes counts the products of both (a shared checkpoint's once): the
    one-process fit's total, its last checkpoint's cumulative ``curvature_products``."""
    lines = re.findall(r"lightning_attr: \d+ sources, (\d+) curvature-vector products in [\d.]+s on 2 processes .*?-> \S+/two/(\w+)",
                       (stores / "two.log").read_text())  # fmt: skip
    assert sorted(mode for _, mode in lines) == sorted(WRITERS)
    for products, mode in lines:
        one = ResponseStore.load(stores / "one" / mode)
        assert int(products) == one.checkpoint_info(one.checkpoints[-1])["curvature_products"], mode


def test_a_crashed_process_leaves_no_corrupt_store(stores):
    """Process 1 fails inside the final window: the checkpoint committed before the crash stays readable, the
    final one is never listed (its shards are orphans), and listing it is refused with the missing part named."""
    store = ResponseStore.load(stores / "two" / "crashed" / "online")
    assert store.checkpoints == ["epoch=2"] and torch.isfinite(store.responses("epoch=2")).all()
    with pytest.raises(StoreError, match="did not finish checkpoint 'final'"):
        store.commit("final", store.theta("epoch=2"), info={}, parts=2)
    assert ResponseStore.load(store.path).checkpoints == ["epoch=2"]


def test_resuming_inside_a_window_on_several_processes_is_refused(tmp_path):
    """A Lightning checkpoint holds rank zero's callback state only: inside a window the other processes' live
    sources are not in it, so a multi-process resume there is refused with what to do (nothing is written)."""
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from conftest import small_mlp
    from lightning_attr import AttributionCallback

    cb = AttributionCallback(tmp_path / "r", num_examples=8, mode="online")
    cb.load_state_dict({"dirpath": None, "products": 5, "seconds": 1.0, "windows": {"final": {"simulation": {}}}})
    with pytest.raises(MisconfigurationException, match=r"cannot resume there .* or on one process"):
        cb.on_train_start(SimpleNamespace(global_rank=0, world_size=2), small_mlp(6, 3))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "count, world_size, owners",
    [(1, 1, [None]), (3, 1, [None] * 3), (1, 2, [None]), (2, 2, [0, 1]), (3, 2, [0, 1, None]), (5, 2, [0, 1, 0, 1, None]),
     (4, 3, [0, 1, 2, None]), (2, 3, [None, None])],
)  # fmt: skip
def test_checkpoint_owners_give_each_process_whole_checkpoints_while_it_can(count, world_size, owners):
    """End mode's checkpoints after the fit: one process each while every process gets one (no collective), the last
    ``count mod W`` shared by all (None)."""
    assert checkpoint_owners(count, world_size) == owners


class _KeepWeights(L.Callback):
    """Keeps the weights after epoch 2 as the callback defers them on several processes (parameters and buffers)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.kept = _Weights.now(trainer, pl_module, ParameterSpace.of(pl_module), "epoch=2")


def test_a_deferred_checkpoint_resumed_from_the_callback_state_is_simulated_at_its_own_weights(tmp_path):
    """A checkpoint deferred to the end of a multi-process fit rides in the callback's state (a Lightning checkpoint,
    read with weights_only=True); a fit resumed with it simulates it at its own parameters and buffers (BatchNorm's
    running statistics, which move on until the end): the store equals one whose checkpoint was simulated on time."""
    from conftest import blobs, fit
    from test_no_side_effects import dropout_bn_model as model

    x, y = blobs(n=96, d=6, classes=3)
    keep = _KeepWeights()
    settings = {"horizon": 4, "curvature_batch_size": 48, "rank": 24, "codec": "dense"}
    on_time = AttributionCallback(tmp_path / "on_time", checkpoint_epochs=[2], **settings)
    L.seed_everything(0, verbose=False)
    fit(model(), x, y, [on_time, keep], epochs=4, batch_size=16)
    deferred = AttributionCallback(tmp_path / "deferred", checkpoint_epochs=None, **settings)
    state = {"dirpath": None, "products": 0, "seconds": 0.0, "windows": {}, "deferred": [vars(keep.kept)]}
    torch.save(state, tmp_path / "state.pt")
    deferred.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    L.seed_everything(0, verbose=False)
    fit(model(), x, y, [deferred], epochs=4, batch_size=16)
    a, b = ResponseStore.load(tmp_path / "on_time"), ResponseStore.load(tmp_path / "deferred")
    assert a.checkpoints == b.checkpoints == ["epoch=2", "final"]
    for name in b.checkpoints:
        assert itemgetter("epoch", "global_step", "weights_digest")(b.checkpoint_info(name)) == itemgetter(
            "epoch", "global_step", "weights_digest"
        )(a.checkpoint_info(name))
        torch.testing.assert_close(b.responses(name), a.responses(name))
    assert not torch.allclose(b.responses("epoch=2"), b.responses("final"), rtol=0.1)
