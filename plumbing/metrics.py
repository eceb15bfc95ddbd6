"""Toy-data metrics: exact Wasserstein-2 (POT), unbiased multi-bandwidth MMD, and for
`gaussians8` the off-mode rate and the share of samples in each mode.

Every number comes with its data-vs-data floor at the same sample size: a sampler is
judged by how far above the floor it lands, not by the raw value.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import ot
import torch

from plumbing import distributed
from plumbing.config import sample_shape
from plumbing.data import GaussianMixture, toy_dataset
from plumbing.image_metrics import image_quality
from plumbing.training import progress, save_image_grid, save_scatter, seeded_rng, write_json

MMD_BANDWIDTHS = (0.02, 0.05, 0.1, 0.2)  # the scales of gaussians8 (std 0.08) and moons
OFF_MODE_STDS = 4.0


def wasserstein2(a: np.ndarray, b: np.ndarray) -> float:
    """Exact W2 between two equal-weight point clouds (network simplex, POT's emd2)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cost = ot.dist(a, b, metric="sqeuclidean")
    return float(np.sqrt(ot.emd2(ot.unif(len(a)), ot.unif(len(b)), cost, numItermax=10_000_000)))


def mmd2(a: np.ndarray, b: np.ndarray, bandwidths=MMD_BANDWIDTHS) -> float:
    """Unbiased MMD^2 with a sum of Gaussian kernels exp(-d^2 / (2 h^2)), one per bandwidth h.
    Its expectation is 0 when a and b come from the same distribution (so it can be < 0)."""
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64)

    def kernel(x, y):
        d2 = torch.cdist(x, y).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    m, n = len(a), len(b)
    k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
    term_aa = (k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1))
    term_bb = (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
    return float(term_aa + term_bb - 2 * k_ab.mean())


def nearest_mode(points: np.ndarray, mixture: GaussianMixture) -> tuple[np.ndarray, np.ndarray]:
    """Index of and distance to the nearest centre, per point."""
    d = torch.cdist(torch.as_tensor(np.asarray(points), dtype=torch.float32), mixture.means)  # (N, K)
    dist, idx = d.min(dim=1)
    return idx.numpy(), dist.numpy()


def off_mode_rate(points: np.ndarray, mixture: GaussianMixture) -> float:
    """Share of points farther than 4 standard deviations from every centre."""
    _, dist = nearest_mode(points, mixture)
    return float((dist > OFF_MODE_STDS * mixture.std).mean())


def mode_shares(points: np.ndarray, mixture: GaussianMixture) -> list[float]:
    """Share of all points within 4 standard deviations of each centre (1/8 each for data)."""
    idx, dist = nearest_mode(points, mixture)
    on = dist <= OFF_MODE_STDS * mixture.std
    return [float(((idx == k) & on).mean()) for k in range(mixture.num_classes)]


_DATA_FLOORS: dict[bytes, dict] = {}  # data-vs-data floors, keyed by the exact reference draws


def toy_metrics(points, dataset, seed: int = 12345) -> dict:
    """All metrics of `points` (N, 2) against fresh data of the same size, with floors.

    The two reference draws come from a fixed seed, so every script measures alike.
    """
    points = np.asarray(points, dtype=np.float64)
    assert points.ndim == 2 and points.shape[1] == 2, "toy samples are (N, 2)"
    n = len(points)
    g = torch.Generator().manual_seed(seed)
    ref = dataset.sample(n, g)[0].numpy()
    ref2 = dataset.sample(n, g)[0].numpy()
    mixture = dataset if isinstance(dataset, GaussianMixture) else None
    key = ref.tobytes() + ref2.tobytes()  # the floor depends only on the two draws: made once per size
    if key not in _DATA_FLOORS:
        _DATA_FLOORS[key] = sampler_floor(ref, ref2)
    out = reference_metrics(points, ref, _DATA_FLOORS[key], mixture)  # the data is the reference sampler
    if mixture is not None:
        out["off_mode_floor"] = off_mode_rate(ref2, dataset)
        out["mode_shares"] = mode_shares(points, dataset)
    return out


def sampler_floor(ref, ref2) -> dict:
    """The floor of W2 and MMD: a second draw `ref2` of the reference sampler against its draw `ref`."""
    ref, ref2 = (np.asarray(a, dtype=np.float64) for a in (ref, ref2))
    return {"w2_floor": wasserstein2(ref2, ref), "mmd_floor": mmd2(ref2, ref)}


def reference_metrics(points, ref, floor: dict, mixture: GaussianMixture | None = None) -> dict:
    """`points` against a reference sampler's draw `ref` (not the data: guided distillation is
    judged against the guided teacher), with that sampler's `floor` (`sampler_floor`)."""
    points, ref = (np.asarray(a, dtype=np.float64) for a in (points, ref))
    out = {"n": len(points), "w2": wasserstein2(points, ref), "w2_floor": floor["w2_floor"],
           "mmd": mmd2(points, ref), "mmd_floor": floor["mmd_floor"]}
    if mixture is not None:
        out["off_mode"] = off_mode_rate(points, mixture)
    return out


def save_samples(path, points, labels) -> None:
    """The exact samples a metric was computed on, so anyone can re-evaluate them."""
    if not distributed.is_main():
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, points=np.asarray(points, dtype=np.float32), labels=np.asarray(labels))


def quality_key(result: dict) -> str | None:
    """A measurement's headline number: off-mode (gaussians8), MMD (other toy data), or the offline
    classifier's Frechet distance (images); None for pictures only."""
    return next((k for k in ("off_mode", "mmd", "fd_classifier") if k in result), None)


def describe(result: dict) -> str:
    """One line of a measurement: 'off-mode 5.1%  MMD 0.0046' or 'FD 12.3  class accuracy 81.0%'."""
    if "off_mode" in result:
        return f"off-mode {result['off_mode']:.1%}  MMD {result['mmd']:.4f}"
    if "mmd" in result:
        return f"MMD {result['mmd']:.4f}"
    if "fd_classifier" in result:
        fid = f"  Inception FID {result['fid_inception']:.2f}" if "fid_inception" in result else ""
        return f"FD {result['fd_classifier']:.2f}  class accuracy {result['accuracy']:.1%}{fid}"
    return "pictures only"


def image_batch(device) -> int:
    """Images sampled at once for a measurement. On the 2-core CPU the 0.70M fmnist16 UNet draws
    1750 images/s in batches of 100 but 1360 in batches of 250 (its activations leave the cache)."""
    return 100 if torch.device(device).type == "cpu" else 250


PICTURE_ROWS = 8  # rows of the sample grids: one column per class


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """Class-conditional evaluation's labels: every class equally often, in turn (0, 1, ..., C - 1, 0, ...)."""
    return torch.arange(n) % num_classes


def picture_count(config: dict) -> int:
    """How many images a sample grid shows (the first ones of the evaluation noise)."""
    return min(config["eval_samples"], PICTURE_ROWS * config["num_classes"])


def within_share(config: dict, steps_list, training_calls: float) -> dict:
    """Images: `config` with `eval_samples` lowered so that measuring `steps_list` costs at most `eval_share`
    of `training_calls` network calls (a whole number of samples per class, at least two per class), with a
    note saying so. A short run's evaluation stays in proportion to it; toy data and `eval_share` 0 are
    left alone."""
    if config["net"] == "mlp" or not config["eval_share"]:
        return config
    per_sample = sum(s for s in steps_list if is_measured(config, s))  # network calls per measured sample
    allowed = int(config["eval_share"] * training_calls / max(per_sample, 1))
    if allowed >= config["eval_samples"]:
        return config
    classes = config["num_classes"]
    n = max(2 * classes, allowed - allowed % classes)
    print(f"note: measuring {n} samples instead of {config['eval_samples']}, so that the evaluation "
          f"({per_sample * n:,} network calls) stays near {config['eval_share']:.0%} of the training's "
          f"~{int(training_calls):,} (--eval-share 0 measures all)")
    return {**config, "eval_samples": n}


def measurement_key(config: dict, device, weights: str, steps: int, n: int) -> str:
    """What a stored image measurement must match: the weights and sampler, the steps, the noise and the
    sample count, and the metric (the feature classifier and the real images' count)."""
    info = image_quality(config, device).info
    metric = f"classifier {info['steps']}/{info['seed']}/{info['test_accuracy']:.6f}/{info['n_real']}"
    return f"{weights} steps {steps} n {n} seed {config['eval_seed']} {metric} inception {config['inception']}"


def stored_measurement(config: dict, device, weights: str, steps: int, n: int) -> tuple[str, dict | None]:
    """The key of this image measurement in the run folder's measurements.json, and the result stored
    under it (None when it has not been made)."""
    key = measurement_key(config, device, weights, steps, n)
    return key, read_measurements(config).get(key)


def read_measurements(config: dict) -> dict:
    path = Path(config["out_dir"]) / "measurements.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_measurement(config: dict, key: str, result: dict) -> None:
    write_json(Path(config["out_dir"]) / "measurements.json", {**read_measurements(config), key: result})


def is_measured(config: dict, steps: int) -> bool:
    """Whether a sampler of `steps` steps is measured (toy: always; images: up to `fd_max_steps` steps,
    above them it gets a picture only)."""
    return config["net"] == "mlp" or steps <= config["fd_max_steps"]


def sample_count(config: dict, steps: int) -> int:
    """How many samples a sampler of `steps` steps draws: `eval_samples` where it is measured, a picture's
    worth (`picture_count`) where it gets a picture only."""
    return config["eval_samples"] if is_measured(config, steps) else picture_count(config)


def in_batches(sample, z: torch.Tensor, labels: torch.Tensor, device, batch: int | None = None,
               desc: str = "sampling") -> torch.Tensor:
    """`sample(z, labels) -> x` over `batch`-sized slices on `device` (a progress bar when there are
    several); the samples in fp32 on the CPU."""
    batch = batch or image_batch(device)
    start, end = distributed.chunk(len(z))  # under torchrun each rank draws its share, then all are gathered
    starts = range(start, end, batch)
    parts = [sample(z[i:min(i + batch, end)].to(device), labels[i:min(i + batch, end)].to(device)).float().cpu()
             for i in (progress(starts, desc, leave=False) if len(starts) > 1 else starts)]
    return distributed.gather(torch.cat(parts) if parts else torch.empty(0, *z.shape[1:]))


def evaluate_sampler(sample, config: dict, out_dir, steps_list, device, title: str = "",
                     weights: str | None = None, balanced: bool = False) -> dict:
    """Sample with `sample(z, labels, steps) -> x` at each step count, on the noise every
    script shares (seeded by `eval_seed`; any noise the sampler draws itself is seeded too), and measure.

    Toy data: `eval_samples` unconditional samples (null label), `toy_metrics`, `samples_<steps>.npz`,
    and one scatter picture `samples.png`. Images: `eval_samples` class-balanced samples in batches,
    `plumbing.image_metrics.ImageQuality` (Frechet distance, class accuracy), and a grid
    `samples_<steps>.png` of the first `picture_count`, one column per class; a sampler of more than
    `fd_max_steps` steps gets the grid only. `balanced`: class-balanced labels on toy data too (guided
    students, which need a class). Returns {steps: metrics}.

    `weights` (images): what is sampled, e.g. "ddim:" and the `fingerprint` of the weights. A measurement
    of the same weights at the same steps, noise, sample count and metric is then kept in the run folder's
    `measurements.json` and read back instead of made again (evaluate.py re-uses the scripts' own); the
    grid is drawn anew.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    toy = config["net"] == "mlp"
    results, panels = {}, {}
    for steps in steps_list:
        measured, n = is_measured(config, steps), sample_count(config, steps)
        key, known = (None, None) if toy or not measured or weights is None else \
            stored_measurement(config, device, weights, steps, n)
        g = torch.Generator().manual_seed(config["eval_seed"])
        z = torch.randn((n, *sample_shape(config)), generator=g)
        if known is not None:  # measured before: only the picture is drawn
            z = z[:picture_count(config)]
        unconditional = toy and not balanced
        labels = torch.full((n,), config["num_classes"]) if unconditional else balanced_labels(n, config["num_classes"])
        # (toy: unconditional, the null label; images and `balanced`: every class equally often)
        # Samplers that draw fresh noise between steps (DMD2's multi-step generator) draw it from the
        # global RNG: seed it here, and give it back afterwards, so the numbers do not depend on the caller.
        with seeded_rng(config["eval_seed"] + steps, device):
            x = in_batches(lambda z_b, c_b, n_steps=steps: sample(z_b, c_b, n_steps), z, labels, device,
                           n if toy else None, desc=f"{title}{steps}-step samples")
        if toy:
            dataset = toy_dataset(config["data"])
            results[steps] = toy_metrics(x.numpy(), dataset)
            save_samples(out_dir / f"samples_{steps}.npz", x.numpy(), labels.numpy())
            off = results[steps].get("off_mode")
            panels[f"{title}{steps} step{'s' * (steps > 1)}" + (f"\noff-mode {off:.1%}" if off is not None else "")] = x
        else:
            save_image_grid(x[:picture_count(config)], out_dir / f"samples_{steps}.png", nrow=config["num_classes"])
            if known is not None:
                results[steps] = known
            else:
                results[steps] = image_quality(config, device)(x, labels) if measured else {}
                if key:
                    write_measurement(config, key, results[steps])
    if toy:
        reference = toy_dataset(config["data"]).sample(config["eval_samples"], torch.Generator().manual_seed(0))[0]
        save_scatter(panels, out_dir / "samples.png", reference=reference.numpy())
    return results
