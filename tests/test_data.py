"""Data loading: CIFAR-10 from torchvision's on-disk format, Fashion-MNIST from Debian's package."""

import pickle

import numpy as np
import pytest
import torch

from plumbing.errors import UserError
from plumbing.data import DEBIAN_FASHION_MNIST, BatchStream, TwoMoons, gaussians8, load_cifar10, load_fashion_mnist
from train_teacher import TeacherConfig


def write_fake_cifar(root, n_per_batch=6):
    """A tiny data set in torchvision's cifar-10-batches-py layout (pickled dicts, bytes keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        batches[name] = (data, labels)
    return batches


def test_cifar10_reads_torchvision_layout(tmp_path):
    batches = write_fake_cifar(tmp_path)
    x, y = load_cifar10(str(tmp_path), download=False)
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (30,)
    first = batches["data_batch_1"][0][0]
    # channel-major rows: the first 1024 bytes are the red plane
    assert torch.equal(x[0, 0].flatten(), torch.from_numpy(first[:1024].copy()))
    assert torch.equal(x[0, 2].flatten(), torch.from_numpy(first[2048:].copy()))
    assert y[:6].tolist() == batches["data_batch_1"][1]
    xt, _ = load_cifar10(str(tmp_path), train=False, download=False)
    assert xt.shape == (6, 3, 32, 32)


def test_cifar10_missing_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="offline alternatives: --preset toy"):
        load_cifar10(str(tmp_path), download=False)


def test_image_stream_is_resumable(tmp_path):
    write_fake_cifar(tmp_path)
    config = TeacherConfig.from_preset("cifar10", data_dir=str(tmp_path), batch_size=4)
    a = BatchStream(config, torch.device("cpu"), seed=3)
    for _ in range(5):
        a.next()
    b = BatchStream(config, torch.device("cpu"), seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(12):  # crosses epoch boundaries
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.min() >= -1 and xa.max() <= 1 and xa.dtype == torch.float32


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian(tmp_path, capsys):
    x, y = load_fashion_mnist(None, train=False, download=False)
    assert not capsys.readouterr().out
    load_fashion_mnist(str(tmp_path), train=False, download=False)  # a --data-dir without it: which folder is used
    assert capsys.readouterr().out == f"note: no Fashion-MNIST in --data-dir {tmp_path}; using {DEBIAN_FASHION_MNIST}\n"
    assert x.shape == (10_000, 1, 32, 32) and x.dtype == torch.uint8
    assert y.min() == 0 and y.max() == 9 and torch.bincount(y).tolist() == [1000] * 10
    assert x[:, :, :2].max() == 0 and x[:, :, :, -2:].max() == 0  # zero padding around 28x28
    assert x.float().mean() > 40  # real images, not blank


def test_fashion_mnist_missing_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr("plumbing.data.DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path), download=False)


def test_gaussians8_definition():
    mix = gaussians8()
    x, labels = mix.sample(80_000, torch.Generator().manual_seed(0))
    angles = 2 * torch.pi * labels / 8
    centres = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    assert abs((x - centres).std().item() - 0.08) < 0.002
    assert torch.allclose(torch.bincount(labels).float() / len(labels), torch.full((8,), 1 / 8), atol=0.01)


def test_moons_labels_separate_the_halves():
    x, labels = TwoMoons().sample(2000, torch.Generator().manual_seed(0))
    assert x[labels == 0, 1].mean() > x[labels == 1, 1].mean() + 0.3
