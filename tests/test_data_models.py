"""The app's datamodule, corruptions, MNIST reader and networks."""

from __future__ import annotations

import gzip

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import AttributionCallback, IndexedDataset
from lightning_attr.data import ByColumn, ClassificationDataModule, flip_labels, load_mnist
from lightning_attr.models import CNN, CNN1d, Classifier, TinyTransformer, build_mlp


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small shared CPUs: more intra-op threads oversubscribe the cores
    yield
    torch.set_num_threads(before)


def test_flip_labels_changes_exactly_the_requested_fraction():
    y = torch.arange(1000) % 10
    noisy, flipped = flip_labels(y, 0.05, 10, seed=3)
    assert int(flipped.sum()) == 50
    assert bool((noisy[flipped] != y[flipped]).all()) and torch.equal(noisy[~flipped], y[~flipped])
    again, _ = flip_labels(y, 0.05, 10, seed=3)
    assert torch.equal(noisy, again)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        flip_labels(y, 1.0, 10)


def test_groups_are_balanced_and_the_poisoned_group_carries_trigger_and_target():
    dm = ClassificationDataModule("digits", input_shape=[64], num_classes=10, n_groups=10,
                                  poison={"group": 2, "target": 7, "size": 3, "value": 5.0})
    dm.setup()
    group, poisoned = dm.metadata["group"], dm.metadata["poisoned"]
    assert torch.bincount(group).tolist() == [140] * 10
    assert torch.equal(poisoned, group == 2)
    assert bool((dm.split.y_train[poisoned] == 7).all())
    assert bool((dm.split.x_train[poisoned][:, :3] == 5.0).all())
    assert not bool((dm.split.x_train[~poisoned][:, :3] == 5.0).all(dim=1).any())
    ids = ByColumn("group")(dm)
    assert len(ids) == 1400 and ids[0].startswith("group=")
    x, y = dm.query_dataset("triggered").tensors
    assert bool((x[:, :3] == 5.0).all()) and bool((y == 7).all())
    # the drawn digits are raw pixels (0..16), not standardized values
    assert float(dm.display_train.min()) == 0.0 and float(dm.display_train.max()) == 16.0


def test_datamodule_rejects_a_wrong_shape_and_bad_poison():
    with pytest.raises(ValueError, match="input_shape"):
        ClassificationDataModule("digits", input_shape=[40], num_classes=10).setup()
    with pytest.raises(ValueError, match="needs n_groups"):
        ClassificationDataModule("digits", input_shape=[64], poison={"group": 0, "target": 1})
    with pytest.raises(ValueError, match="unknown dataset"):
        ClassificationDataModule("cifar")
    with pytest.raises(ValueError, match="columns"):
        ByColumn("publisher")(ClassificationDataModule("digits", input_shape=[64]))


def _write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_load_mnist_reads_torchvision_files_and_fails_clearly_without_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)
    _write_idx(raw / "train-images-idx3-ubyte.gz", images, gz=True)
    _write_idx(raw / "train-labels-idx1-ubyte", labels, gz=False)
    _write_idx(raw / "t10k-images-idx3-ubyte", images[:4], gz=False)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", labels[:4], gz=True)
    split = load_mnist(tmp_path, n_train=10)
    assert split.x_train.shape == (10, 784) and split.x_test.shape == (4, 784)
    assert split.y_train.tolist() == labels[:10].tolist()
    # one global standardization: the order of pixel values is kept
    flat = images[:10].reshape(10, -1).astype(np.float32)
    assert np.array_equal(np.argsort(flat[0], kind="stable"), np.argsort(split.x_train[0].numpy(), kind="stable"))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(ValueError, match="truncated"):
        load_mnist(tmp_path)


NETS = [
    ("mlp", lambda: build_mlp([40], 10, hidden=[16])),
    ("cnn1d", lambda: CNN1d([40], 10, channels=[4, 8])),
    ("transformer", lambda: TinyTransformer([40], 10, dim=8, heads=2, depth=1)),
    ("cnn", lambda: CNN([64], 10, channels=[4, 8])),
]


@pytest.mark.parametrize(("name", "make"), NETS, ids=[n for n, _ in NETS])
def test_every_network_trains_with_the_callback_and_attributes(name, make, tmp_path):
    """torch.func has to run through each network: simulation (vmap, jvp) and forward readout."""
    g = torch.Generator().manual_seed(0)
    d = 64 if name == "cnn" else 40
    x, y = torch.randn(96, d, generator=g), torch.randint(0, 10, (96,), generator=g)
    L.seed_everything(0, verbose=False)
    net = Classifier(make())
    cb = AttributionCallback(dirpath=tmp_path / "r", horizon=3, seed=0, mode="online")
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(net, DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=32, shuffle=True))
    scores = net.eval().attribute((x[:5], y[:5]), responses=cb.dirpath)
    assert scores.shape == (5, 96) and bool(torch.isfinite(scores).all()) and float(scores.abs().max()) > 0


def test_relative_scores_divide_by_the_sources_self_influence():
    from lightning_attr.app.attribute import relative_scores

    scores = torch.tensor([[4.0, -2.0, 1.0]])
    # three sources; source 1 holds examples 1 and 2 (self-influence 1 + 3 = 4); source 2 has a
    # negative estimate and is floored at 1% of the median positive source self-influence
    si = torch.tensor([16.0, 1.0, 3.0, -5.0])
    e2s = torch.tensor([0, 1, 1, 2])
    rel = relative_scores(scores, si, e2s)
    floor = torch.tensor([16.0, 4.0]).median() * 1e-2
    assert torch.allclose(rel, torch.tensor([[4.0 / 4.0, -2.0 / 2.0, 1.0 / floor.sqrt()]]))
