"""Data: the 2-D toy sets (with the exact denoiser of the Gaussian mixture), Fashion-MNIST
and CIFAR-10, and a resumable batch stream that every training loop draws from.

`gaussians8` is defined exactly so that anyone can evaluate samples against it: 8 equally
weighted isotropic Gaussians, standard deviation 0.08, centres at radius 1 at angles
2 pi k / 8, label k.
"""

from __future__ import annotations

import gzip
import math
import pickle
from pathlib import Path

import numpy as np
import torch

from common import alpha_sigma, bcast
from plumbing.config import image_size
from plumbing.distributed import check_batch, shard
from plumbing.errors import UserError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
OFFLINE_HINT = ("offline alternatives: --preset toy (2-D data, no files needed), or --preset fmnist "
                "with Debian's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")


# ----------------------------------------------------------------------------------------
# Toy data
# ----------------------------------------------------------------------------------------


class GaussianMixture:
    """Equally weighted isotropic Gaussians in R^d; label k = component k.

    Its exact denoiser E[x | z_t, c] is a closed form, so it serves as a perfect teacher.
    """

    def __init__(self, means: torch.Tensor, std: float):
        self.means = means.float()  # (K, d)
        self.std = float(std)
        self.num_classes = means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None, labels=None):
        """n points and their component labels."""
        if labels is None:
            labels = torch.randint(self.num_classes, (n,), generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator)
        return self.means[labels] + self.std * noise, labels

    def denoiser(self, z_t: torch.Tensor, t, labels: torch.Tensor) -> torch.Tensor:
        """E[x | z_t, c] for z_t = alpha_t x + sigma_t eps; labels == K (null) means unconditional.

        Given component k, z_t ~ N(alpha_t m_k, (alpha_t^2 s^2 + sigma_t^2) I) and
        E[x | z_t, k] = m_k + alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2) (z_t - alpha_t m_k).
        Unconditionally the component posteriors p(k | z_t) weight these means.
        """
        means = self.means.to(z_t.device)
        alpha_t, sigma_t = alpha_sigma(torch.as_tensor(t, dtype=torch.float32, device=z_t.device))
        alpha_t, sigma_t = bcast(alpha_t.expand(z_t.shape[0]), z_t), bcast(sigma_t.expand(z_t.shape[0]), z_t)
        var = alpha_t**2 * self.std**2 + sigma_t**2  # (B, 1)
        diff = z_t[:, None, :] - alpha_t[:, None] * means[None]  # (B, K, d)
        logits = -0.5 * diff.pow(2).sum(-1) / var  # (B, K)
        known = labels < self.num_classes
        onehot = torch.nn.functional.one_hot(labels.clamp(max=self.num_classes - 1), self.num_classes).bool()
        logits = torch.where(known[:, None] & ~onehot, torch.full_like(logits, -math.inf), logits)
        post = torch.softmax(logits, dim=1)  # p(k | z_t, c), (B, K)
        x_k = means[None] + (alpha_t * self.std**2 / var)[:, None] * diff  # (B, K, d)
        return (post[..., None] * x_k).sum(1)  # (B, d)


def gaussians8() -> GaussianMixture:
    angles = 2 * math.pi * torch.arange(8) / 8
    return GaussianMixture(torch.stack([torch.cos(angles), torch.sin(angles)], dim=1), std=0.08)


class TwoMoons:
    """Two interleaved half circles with Gaussian jitter (no separated modes); label = moon."""

    num_classes = 2

    def __init__(self, noise: float = 0.05):
        self.noise = noise

    def sample(self, n: int, generator: torch.Generator | None = None, labels=None):
        if labels is None:
            labels = torch.randint(2, (n,), generator=generator)
        u = math.pi * torch.rand(n, generator=generator)
        upper = torch.stack([torch.cos(u), torch.sin(u)], 1)
        lower = torch.stack([1 - torch.cos(u), 0.5 - torch.sin(u)], 1)
        x = torch.where(labels[:, None] == 0, upper, lower) - torch.tensor([0.5, 0.25])
        x = x / 1.2 + self.noise * torch.randn(n, 2, generator=generator)
        return x, labels


TOY_DATASETS = {"gaussians8": gaussians8, "moons": TwoMoons}


def toy_dataset(name: str):
    if name not in TOY_DATASETS:
        raise UserError(f"unknown toy data set {name!r}; choose one of {', '.join(TOY_DATASETS)}")
    return TOY_DATASETS[name]()


# ----------------------------------------------------------------------------------------
# Images: uint8 tensors (N, C, H, W) and int64 labels, held in memory
# ----------------------------------------------------------------------------------------


def load_images(config: dict, train: bool = True):
    """The config's image data set at its `image_size`: (N, C, S, S) uint8 and (N,) labels.

    Both data sets are stored at 32x32; another size is made by area averaging (16x16: the mean
    of each 2x2 block), rounded back to uint8."""
    loader = {"fmnist": load_fashion_mnist, "cifar10": load_cifar10}[config["data"]]
    x, labels = loader(config.get("data_dir"), train=train)
    size = image_size(config)
    if size != x.shape[-1]:
        mode = "area" if size < x.shape[-1] else "bilinear"
        x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode=mode)  # (N, C, size, size)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x, labels


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """The MNIST 'idx' format (optionally gzipped): big-endian dims after a 4-byte magic (0, 0, 8 = uint8, ndim).
    A file that is not one (not gzip, cut short, another layout) is one line that names it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path} cannot be read ({e}); download it again or delete it") from None
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if data[:4] != bytes([0, 0, 8, ndim]) or len(data) != 4 + 4 * ndim + math.prod(dims):
        raise UserError(f"{path} is not an idx file of {ndim}-dimensional uint8 data of the size its header says "
                        "(cut short, or another file); download it again or delete it")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        for sub in ("", "FashionMNIST/raw"):
            if (folder / sub / name).is_file():
                return folder / sub / name
    return None


def load_fashion_mnist(data_dir: str | None, train: bool = True, download: bool = True):
    """Fashion-MNIST padded to 32x32: (N, 1, 32, 32) uint8 and (N,) labels.

    Looked for at `data_dir`, then Debian's /usr/share/datasets/fashion-mnist, then
    downloaded by torchvision into `data_dir`.
    """
    prefix = "train" if train else "t10k"
    folders = [Path(data_dir)] if data_dir else []
    folders.append(DEBIAN_FASHION_MNIST)
    for folder in folders:
        images = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            if data_dir and folder != folders[0]:  # the folder the user named did not have it: say which one did
                print(f"note: no Fashion-MNIST in --data-dir {data_dir}; using {folder}")
            x = torch.from_numpy(_read_idx(images, 3).copy())[:, None]  # (N, 1, 28, 28)
            y = _read_idx(labels, 1).astype(np.int64)
            if len(x) != len(y) or x.shape[2:] != (28, 28) or y.max(initial=0) > 9:
                raise UserError(f"{images} and {labels} do not make a Fashion-MNIST set ({len(x)} images of "
                                f"{tuple(x.shape[2:])} pixels, {len(y)} labels up to {y.max(initial=0)}); "
                                "download them again")
            x = torch.nn.functional.pad(x, (2, 2, 2, 2))  # (N, 1, 32, 32), background 0 = black
            return x, torch.from_numpy(y)
    if download and data_dir:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(data_dir, train=train, download=True)
            return load_fashion_mnist(data_dir, train, download=False)
        except Exception:
            pass
    raise UserError(f"Fashion-MNIST not found in {', '.join(map(str, folders))} and could not be "
                    f"downloaded; {OFFLINE_HINT}")


def load_cifar10(data_dir: str | None, train: bool = True, download: bool = True):
    """CIFAR-10 from torchvision's on-disk format (cifar-10-batches-py/ pickles):
    (N, 3, 32, 32) uint8 and (N,) labels. Downloaded by torchvision when missing."""
    root = Path(data_dir or "data")
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if not all((folder / n).is_file() for n in names):
        if download:
            try:
                from torchvision.datasets import CIFAR10

                CIFAR10(str(root), train=train, download=True)
            except Exception:
                pass
        if not all((folder / n).is_file() for n in names):
            raise UserError(f"CIFAR-10 not found in {folder} and could not be downloaded; "
                            f"put torchvision's cifar-10-batches-py there, or {OFFLINE_HINT}")
    xs, ys = [], []
    for n in names:
        with open(folder / n, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


# ----------------------------------------------------------------------------------------
# One resumable stream of training batches for every loop
# ----------------------------------------------------------------------------------------


class BatchStream:
    """Training batches (x, labels) on `device`, resumable exactly.

    Toy data: fresh samples from a generator seeded once. Images: an epoch-wise permutation
    seeded by (seed, epoch), random horizontal flips when asked, scaled to [-1, 1].
    `state_dict()` / `load_state_dict()` put a resumed run on the same batches.
    """

    def __init__(self, config: dict, device: torch.device, seed: int):
        self.batch_size, self.device, self.seed = config["batch_size"], device, seed  # the global batch
        check_batch(self.batch_size)
        self.flip = config.get("hflip", False)
        self.toy = config["net"] == "mlp"
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.pos = 0, 0
        if self.toy:
            self.dataset = toy_dataset(config["data"])
        else:
            self.images, self.labels = load_images(config)
            self.perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        epoch_generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(len(self.labels), generator=epoch_generator)

    def next(self):
        """The next batch: under torchrun this rank's slice of the global batch, which every rank draws
        alike (plumbing/distributed.py), so N processes see the data one process would."""
        if self.toy:
            x, labels = self.dataset.sample(self.batch_size, self.generator)
            return shard(x).to(self.device), shard(labels).to(self.device)
        if self.pos + self.batch_size > len(self.perm):
            self.epoch, self.pos = self.epoch + 1, 0
            self.perm = self._permutation()
        idx = self.perm[self.pos: self.pos + self.batch_size]
        self.pos += self.batch_size
        flip = torch.rand(len(idx), generator=self.generator) < 0.5 if self.flip else None
        idx = shard(idx)
        x = self.images[idx].to(self.device).float() / 127.5 - 1.0  # (B / world, C, H, W) in [-1, 1]
        if flip is not None:
            x = torch.where(shard(flip).to(self.device)[:, None, None, None], x.flip(3), x)
        return x, self.labels[idx].to(self.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.epoch, self.pos = state["epoch"], state["pos"]
        if not self.toy:
            self.perm = self._permutation()
