"""Image metrics, for every script while it trains and for evaluate.py: a Frechet distance that
works offline, and Inception FID where its weights can be loaded.

- `FeatureClassifier`: a small CNN the project trains once per data set and caches. Its
  penultimate layer (128 features) stands in for Inception's: the Frechet distance in that
  space (reported as `fd_classifier`) is NOT comparable with published Inception FIDs, only
  between runs of this project. Its accuracy on class-conditional samples says whether a
  sampler draws the class it is asked for.
- Both distances go through torchmetrics' `FrechetInceptionDistance`, which takes a custom
  feature network; the real statistics are cached to disk, so they are computed once.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing import distributed
from plumbing.config import image_size
from plumbing.data import load_images
from plumbing.errors import UserError
from plumbing.training import load_checkpoint, progress, save_checkpoint


def _fid_class():
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise UserError("image metrics need torchmetrics: pip install torchmetrics") from None
    return FrechetInceptionDistance


# ----------------------------------------------------------------------------------------
# The offline feature network
# ----------------------------------------------------------------------------------------


class FeatureClassifier(nn.Module):
    """(B, C, H, W) in [-1, 1] -> class logits; `features` gives the 128-d penultimate layer.
    Any size of at least 4x4 (the shapes below are for 32x32; the last pooling averages what is left)."""

    num_features = 128

    def __init__(self, in_ch: int, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),  # (B, 32, 16, 16)
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),  # (B, 64, 8, 8)
            nn.Conv2d(64, 128, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 128)
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images or floats in [-1, 1] -> floats in [-1, 1]."""
    return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float().clamp(-1, 1)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int, device, seed: int = 0,
                     batch_size: int = 128) -> FeatureClassifier:
    """Adam, cross-entropy, random batches of the given (uint8 or [-1, 1]) images."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FeatureClassifier(images.shape[1], int(labels.max()) + 1).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in progress(range(steps), "feature classifier"):
        idx = torch.randint(len(labels), (batch_size,), generator=g)
        loss = F.cross_entropy(model(to_unit(images[idx]).to(device)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(model: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 500) -> float:
    device = next(model.parameters()).device
    correct = sum((model(to_unit(images[i:i + batch_size]).to(device)).argmax(1).cpu() ==
                   labels[i:i + batch_size]).sum().item() for i in range(0, len(labels), batch_size))
    return correct / len(labels)


def load_classifier(config: dict, device, steps: int) -> tuple[FeatureClassifier, dict]:
    """The preset's classifier, trained on the training set once and cached in out_dir."""
    path = Path(config["out_dir"]) / "feature_classifier.pt"
    size = image_size(config)
    distributed.barrier()  # under torchrun every rank looks at once, so that all take the same path
    state = load_checkpoint(path, "feature classifier") if path.exists() else None
    if state is not None and (state["info"]["steps"], state["info"].get("image_size", 32)) == (steps, size):
        model = FeatureClassifier(config["in_ch"], config["num_classes"])  # trained with these settings: reuse it
        model.load_state_dict(state["model"])
        return model.to(device).eval().requires_grad_(False), state["info"]
    x_train, y_train = load_images(config)
    x_test, y_test = load_images(config, train=False)
    model = train_classifier(x_train, y_train, steps, device, seed=config["seed"])
    info = {"steps": steps, "seed": config["seed"], "image_size": size,
            "test_accuracy": classifier_accuracy(model, x_test, y_test)}
    save_checkpoint(path, {"model": model.state_dict(), "info": info})
    return model, info


# ----------------------------------------------------------------------------------------
# Frechet distances through torchmetrics
# ----------------------------------------------------------------------------------------


class _Features(nn.Module):
    """A feature function wrapped for torchmetrics' FID (which reads `num_features`)."""

    def __init__(self, fn, num_features: int):
        super().__init__()
        self.fn, self.num_features = fn, num_features

    def forward(self, x):
        return self.fn(x)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets (N, d)."""
    metric = _fid_class()(feature=_Features(lambda f: f, a.shape[1]))
    metric.update(a.double(), real=True)
    metric.update(b.double(), real=False)
    return float(metric.compute())


class CachedFrechet:
    """FID-style distance of generated images to the real ones, the real statistics cached at `cache`.

    `feature`: "classifier" (the offline FeatureClassifier's 128 features) or "inception"
    (torchmetrics' Inception v3, 2048 features; needs torch-fidelity and its downloaded weights).
    """

    def __init__(self, feature: str, real_images, cache: Path, device, classifier: FeatureClassifier | None = None,
                 made_by: dict | None = None):
        FID = _fid_class()
        if feature == "classifier":
            extractor = _Features(lambda x: classifier.features(to_unit(x).to(device)).cpu(), 128)
            self.metric = FID(feature=extractor, reset_real_features=False)
        else:
            try:
                self.metric = FID(feature=2048, normalize=True, reset_real_features=False).to(device)
            except Exception as e:
                raise UserError(f"Inception FID is unavailable ({type(e).__name__}: {str(e)[:80]}); it needs "
                                "`pip install torch-fidelity` and a download of its weights. Pass "
                                "--no-inception: the offline classifier distance is always reported") from None
        self.feature, self.device = feature, device
        keys = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
        distributed.barrier()  # (as in load_classifier)
        saved = load_checkpoint(cache, "cached reference statistics") if cache.exists() else None
        if saved is not None and saved.get("made_by") == made_by:  # the same feature network, the same real set
            for k in keys:
                setattr(self.metric, k, saved[k].to(getattr(self.metric, k).device))
        else:
            for i in progress(range(0, len(real_images), 500), f"reference statistics ({feature})"):
                self.metric.update(self._prepare(real_images[i:i + 500]), real=True)
            save_checkpoint(cache, {"made_by": made_by, **{k: getattr(self.metric, k).cpu() for k in keys}})

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.feature == "inception":  # [0, 1], three channels, on the metric's device
            x = ((to_unit(images) + 1) / 2).to(self.device)
            return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return images

    def __call__(self, images: torch.Tensor) -> float:
        self.metric.reset()  # the fake statistics only (reset_real_features=False)
        for i in range(0, len(images), 500):
            self.metric.update(self._prepare(images[i:i + 500]), real=False)
        return float(self.metric.compute())


def load_lpips(config, device):
    """LPIPS through torchmetrics; its VGG weights must be downloadable or cached."""
    if config.net == "mlp":
        raise UserError("--reg-loss lpips needs images; use --reg-loss mse or pseudo-huber on toy data")
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    except ImportError:
        raise UserError("--reg-loss lpips needs torchmetrics (pip install torchmetrics); "
                        "or use --reg-loss pseudo-huber") from None
    try:
        metric = LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=False).to(device)
    except Exception as e:
        raise UserError(f"LPIPS weights cannot be loaded ({type(e).__name__}); "
                        "use --reg-loss pseudo-huber, which needs no download") from None

    def lpips(x, y):
        if x.shape[1] == 1:  # grey images: LPIPS's network wants three channels
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        with torch.autocast(x.device.type, enabled=False):  # the comparison in fp32
            return metric(x.float(), y.float())

    return lpips


# ==== Quality of a sampler's images ===================================================================================


class ImageQuality:
    """`quality(images, labels)` -> {"fd_classifier", "accuracy", and "fid_inception" where available}.

    The Frechet distance of class-conditional samples to the training set in the offline classifier's
    features (and Inception's), plus the classifier's accuracy on the classes the samples were asked
    for. `info` holds the classifier's own accuracy on the real test images, to judge the metric by.
    The classifier and the reference statistics are made once per run folder and cached there.
    `strict`: a missing Inception is an error (evaluate.py), otherwise a note and the classifier alone.
    """

    def __init__(self, config: dict, device, strict: bool = False):
        self.classifier, self.info = load_classifier(config, device, config["classifier_steps"])
        real = load_images(config)[0]
        out = Path(config["out_dir"])
        self.distances = {"fd_classifier": CachedFrechet("classifier", real, out / "reference_classifier.pt", device,
                                                         self.classifier, made_by={**self.info, "n_real": len(real)})}
        if config["inception"]:
            try:
                self.distances["fid_inception"] = CachedFrechet("inception", real, out / "reference_inception.pt",
                                                                device, made_by={"n_real": len(real)})
            except UserError as e:
                if strict:
                    raise
                print(f"note: no Inception FID while training: {str(e).split(';')[0]}")
        self.info = {**self.info, "n_real": len(real)}

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        images = images.float().clamp(-1, 1).cpu()
        result = {name: metric(images) for name, metric in self.distances.items()}
        result["accuracy"] = classifier_accuracy(self.classifier, images, labels.cpu())
        return {**result, "n": len(images)}


_QUALITY: dict = {}  # one ImageQuality per run folder and settings, within a process


def image_quality(config: dict, device, strict: bool = False) -> ImageQuality:
    key = (config["out_dir"], config["data"], config.get("data_dir"), config["classifier_steps"],
           config["inception"], str(device))  # (strict matters when it is made: evaluate.py makes it first)
    if key not in _QUALITY:
        _QUALITY[key] = ImageQuality(config, device, strict)
    return _QUALITY[key]
