"""Toy-data metrics: exact Wasserstein-2 (POT), unbiased multi-bandwidth MMD, and for
`gaussians8` the off-mode rate and the share of samples in each mode.

Every number comes with its data-vs-data floor at the same sample size: a sampler is
judged by how far above the floor it lands, not by the raw value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ot
import torch

from plumbing.data import GaussianMixture

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
    from plumbing import distributed

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


IMAGE_BATCH = 250  # images sampled at once for a measurement


def in_batches(sample, z: torch.Tensor, labels: torch.Tensor, device, batch: int = IMAGE_BATCH,
               desc: str = "sampling") -> torch.Tensor:
    """`sample(z, labels) -> x` over `batch`-sized slices on `device` (a progress bar when there are
    several); the samples in fp32 on the CPU."""
    from plumbing import distributed
    from plumbing.training import progress

    start, end = distributed.chunk(len(z))  # under torchrun each rank draws its share, then all are gathered
    starts = range(start, end, batch)
    parts = [sample(z[i:min(i + batch, end)].to(device), labels[i:min(i + batch, end)].to(device)).float().cpu()
             for i in (progress(starts, desc, leave=False) if len(starts) > 1 else starts)]
    return distributed.gather(torch.cat(parts) if parts else torch.empty(0, *z.shape[1:]))


def evaluate_sampler(sample, config: dict, out_dir, steps_list, device, title: str = "") -> dict:
    """Sample with `sample(z, labels, steps) -> x` at each step count, on the noise every
    script shares (seeded by `eval_seed`; any noise the sampler draws itself is seeded too), and measure.

    Toy data: `eval_samples` unconditional samples (null label), `toy_metrics`, `samples_<steps>.npz`,
    and one scatter picture `samples.png`. Images: `fd_samples` class-balanced samples in batches,
    `plumbing.image_metrics.ImageQuality` (Frechet distance, class accuracy), and a grid
    `samples_<steps>.png` of the first `eval_samples`, one column per class; a sampler of more than
    `fd_max_steps` steps gets the grid only. Returns {steps: metrics}.
    """
    from common import save_image_grid, save_scatter
    from plumbing.data import toy_dataset
    from plumbing.training import seeded_rng

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    toy = config["net"] == "mlp"
    results, panels = {}, {}
    for steps in steps_list:
        measured = toy or (config["fd_samples"] > 0 and steps <= config["fd_max_steps"])
        n = config["eval_samples"] if toy else max(config["eval_samples"], config["fd_samples"] if measured else 0)
        g = torch.Generator().manual_seed(config["eval_seed"])
        z = torch.randn((n, 2) if toy else (n, config["in_ch"], 32, 32), generator=g)
        labels = torch.full((n,), config["num_classes"]) if toy else torch.arange(n) % config["num_classes"]
        # (toy: unconditional, the null label; images: every class equally often)
        # Samplers that draw fresh noise between steps (DMD2's multi-step generator) draw it from the
        # global RNG: seed it here, and give it back afterwards, so the numbers do not depend on the caller.
        with seeded_rng(config["eval_seed"] + steps, device):
            x = in_batches(lambda z_b, c_b, n_steps=steps: sample(z_b, c_b, n_steps), z, labels, device,
                           n if toy else IMAGE_BATCH, desc=f"{title}{steps}-step samples")
        if toy:
            dataset = toy_dataset(config["data"])
            results[steps] = toy_metrics(x.numpy(), dataset)
            save_samples(out_dir / f"samples_{steps}.npz", x.numpy(), labels.numpy())
            off = results[steps].get("off_mode")
            panels[f"{title}{steps} step{'s' * (steps > 1)}" + (f"\noff-mode {off:.1%}" if off is not None else "")] = x
        else:
            from plumbing.image_metrics import image_quality

            save_image_grid(x[:config["eval_samples"]], out_dir / f"samples_{steps}.png", nrow=config["num_classes"])
            results[steps] = image_quality(config, device)(x, labels) if measured else {}
    if toy:
        reference = toy_dataset(config["data"]).sample(config["eval_samples"], torch.Generator().manual_seed(0))[0]
        save_scatter(panels, out_dir / "samples.png", reference=reference.numpy())
    return results
