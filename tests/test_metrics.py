"""The toy metrics separate the failures they are meant to catch by at least 3x their own noise."""

import numpy as np
import pytest
import torch

from plumbing.data import gaussians8
from plumbing.metrics import mmd2, mode_shares, off_mode_rate, wasserstein2

N, SEEDS = 2000, 8


def _draws(kind: str, seed: int, mix):
    g = torch.Generator().manual_seed(seed)
    x, labels = mix.sample(N, g)
    if kind == "blurred":  # the same centres, standard deviation 1.25x
        x = mix.means[labels] + 1.25 * mix.std * torch.randn(N, 2, generator=g)
    if kind == "off_mode":  # 5% of the points moved between the modes
        k = N // 20
        x[:k] = 0.6 * (2 * torch.rand(k, 2, generator=g) - 1)
    return x.numpy()


@pytest.mark.slow
def test_metrics_separate_blur_and_off_mode_points():
    mix = gaussians8()
    refs = [mix.sample(N, torch.Generator().manual_seed(100 + s))[0].numpy() for s in range(SEEDS)]
    runs = {kind: [{"mmd": mmd2(_draws(kind, s, mix), refs[s]), "off_mode": off_mode_rate(_draws(kind, s, mix), mix)}
                   for s in range(SEEDS)] for kind in ("data", "blurred", "off_mode")}

    def stats(kind, key):
        v = np.array([m[key] for m in runs[kind]])
        return v.mean(), v.std(ddof=1)

    data_mmd, data_mmd_noise = stats("data", "mmd")
    blur_mmd, blur_mmd_noise = stats("blurred", "mmd")
    assert blur_mmd - data_mmd > 3 * max(data_mmd_noise, blur_mmd_noise)
    data_off, data_off_noise = stats("data", "off_mode")
    bad_off, bad_off_noise = stats("off_mode", "off_mode")
    noise = max(data_off_noise, bad_off_noise, np.sqrt(0.05 * 0.95 / N))  # binomial noise as a floor
    assert bad_off - data_off > 3 * noise
    assert abs(bad_off - 0.05) < 0.01 and data_off < 0.005


def test_off_mode_rate_and_shares_by_hand():
    mix = gaussians8()
    pts = np.array([[1.0, 0.0], [1.3, 0.0], [0.0, 0.0], [0.0, 1.05]])  # on, 3.75 std off (on), off, on
    assert off_mode_rate(pts, mix) == 0.25
    shares = mode_shares(pts, mix)
    assert shares[0] == 0.5 and shares[2] == 0.25 and sum(shares) == 0.75


def test_wasserstein_exact_on_a_shift():
    a = np.random.default_rng(0).normal(size=(300, 2))
    assert abs(wasserstein2(a, a + np.array([0.3, 0.4])) - 0.5) < 1e-9  # a translation costs its length
    assert wasserstein2(a, a) == 0.0


def test_data_floor_is_made_once_per_reference_draw_and_stays_right():
    # toy_metrics caches the data-vs-data floor by the exact reference draws: a second call, other
    # points, another data set or another size must each get the floor a fresh computation gives.
    from plumbing.data import TwoMoons
    from plumbing.metrics import sampler_floor, toy_metrics

    def fresh_floor(dataset, n, seed=12345):
        g = torch.Generator().manual_seed(seed)
        ref, ref2 = dataset.sample(n, g)[0].numpy(), dataset.sample(n, g)[0].numpy()
        return sampler_floor(ref, ref2)

    mix, moons = gaussians8(), TwoMoons()
    for dataset, n in ((mix, 300), (moons, 300), (mix, 200)):
        expected = fresh_floor(dataset, n)
        for seed in (0, 1):  # the second call is served from the cache
            points = dataset.sample(n, torch.Generator().manual_seed(seed))[0].numpy()
            m = toy_metrics(points, dataset)
            assert (m["w2_floor"], m["mmd_floor"]) == (expected["w2_floor"], expected["mmd_floor"])
    assert fresh_floor(mix, 300)["w2_floor"] != fresh_floor(moons, 300)["w2_floor"]


def test_an_image_evaluation_stays_within_its_share_of_training():
    from plumbing.metrics import within_share
    from train_teacher import TeacherConfig

    config = TeacherConfig.from_preset("fmnist16", eval_samples=2000, eval_share=0.5, eval_steps=[1, 4, 256])
    # 1 + 4 measured calls per sample (256 > fd_max_steps: a picture only); half of 60,000 calls buys 6000 samples
    assert within_share(config, config.eval_steps, 60_000)["eval_samples"] == 2000
    cut = within_share(config, config.eval_steps, 2_000)  # 1000 calls: 200 samples, 20 per class
    assert cut["eval_samples"] == 200 and config.eval_samples == 2000  # the config itself is left alone
    assert within_share(config, [64], 1_000)["eval_samples"] == 20  # never below two per class
    assert within_share(config.replace(eval_share=0), [64], 1_000)["eval_samples"] == 2000  # 0: no cap
    toy = TeacherConfig.from_preset("toy", eval_share=0.5)
    assert within_share(toy, [256], 10)["eval_samples"] == toy.eval_samples  # toy points are cheap


def test_one_rule_says_how_many_samples_a_step_count_draws():
    # evaluate_sampler, the guided evaluator and the teacher's cost note count alike: eval_samples where a
    # sampler is measured, a picture's worth above fd_max_steps.
    from plumbing.metrics import sample_count
    from train_teacher import TeacherConfig, evaluation_cost

    config = TeacherConfig.from_preset("fmnist16")  # 2000 samples up to 64 steps; 10 classes, 8 rows a picture
    assert [sample_count(config, s) for s in (1, 64, 256)] == [2000, 2000, 80]
    calls = sum(s * sample_count(config, s) for s in config.eval_steps)
    assert calls == (1 + 2 + 4 + 8 + 16 + 64) * 2000 + 256 * 80
    assert f"{calls:,} network calls" in evaluation_cost(config, 10**9)
    assert sample_count(TeacherConfig.from_preset("toy"), 256) == 2000  # toy data: always measured
