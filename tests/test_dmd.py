"""DMD: the distribution-matching gradient, multi-step sampling, short runs with resume, errors."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import die_on_call, log_records, with_teacher

import dmd
from common import diffuse
from plumbing.config import field_help
from plumbing.data import GaussianMixture, gaussians8
from plumbing.errors import UserError
from plumbing.folders import dmd_dir
from plumbing.image_metrics import load_lpips
from train_teacher import load_teacher

ROOT = Path(__file__).resolve().parent.parent


def test_dm_loss_gradient_is_the_formula():
    mix, wide = gaussians8(), GaussianMixture(gaussians8().means, std=0.2)
    g = torch.Generator().manual_seed(0)
    x = (wide.sample(64, g)[0]).requires_grad_(True)
    labels, t, eps = torch.full((64,), 8), torch.rand(64, generator=g) * 0.9 + 0.05, torch.randn(64, 2, generator=g)
    loss = dmd.dmd_generator_loss(x, mix.denoiser, wide.denoiser, labels, t=t, eps=eps)
    (autograd,) = torch.autograd.grad(loss, x)
    x_t = diffuse(x.detach(), t, eps)
    mu_real, mu_fake = mix.denoiser(x_t, t, labels), wide.denoiser(x_t, t, labels)
    by_hand = (mu_fake - mu_real) / (x.detach() - mu_real).abs().mean(1, keepdim=True)
    assert torch.allclose(autograd * x.numel(), by_hand, atol=1e-5)  # the loss is a mean over elements
    assert by_hand.abs().max() > 0.1


def test_dm_gradient_vanishes_when_fake_equals_real():
    mix = gaussians8()
    x = mix.sample(32)[0].requires_grad_(True)
    loss = dmd.dmd_generator_loss(x, mix.denoiser, mix.denoiser, torch.full((32,), 8))
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().max() == 0.0


def test_dm_gradient_is_zero_on_the_data_and_contracts_a_blurred_generator():
    # Both scores are exact Gaussian-mixture denoisers: the real one of the data, the fake one of the
    # generator's distribution. A generator that samples the data gets a zero expected gradient
    # (the fake score here is fitted to its samples, so it is not literally the real one); a
    # generator blurred to 2x the std is pushed back towards the centres.
    mix = gaussians8()
    g = torch.Generator().manual_seed(1)
    n = 20_000
    labels = torch.full((n,), 8)

    def mean_grad(samples, fake):
        x = samples.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(dmd.dmd_generator_loss(x, mix.denoiser, fake.denoiser, labels), x)
        return grad * x.numel(), x.detach()

    good = mix.sample(n, g)[0]
    fitted = GaussianMixture(mix.means, std=float((good - mix.means[torch.cdist(good, mix.means).argmin(1)]).std()))
    grad_good, _ = mean_grad(good, fitted)
    blurred_mix = GaussianMixture(mix.means, std=0.16)
    blurred = blurred_mix.sample(n, g)[0]
    grad_blur, x = mean_grad(blurred, blurred_mix)
    outward = x - mix.means[torch.cdist(x, mix.means).argmin(1)]  # from the nearest centre to x
    # gradient descent moves x by -grad: along -outward, i.e. towards the centre
    assert (grad_blur * outward).sum(1).mean() > 0
    radial_blur = (grad_blur * outward).sum(1).mean()
    radial_good = (grad_good * (good - mix.means[torch.cdist(good, mix.means).argmin(1)])).sum(1).mean()
    assert radial_good.abs() < 0.1 * radial_blur
    assert grad_good.mean(0).norm() < 3 * grad_good.std(0).norm() / n**0.5 + 1e-3  # zero within noise


def test_multi_step_sampling_uses_the_schedule_and_fresh_noise():
    calls = []

    def recording_generator(z_t, t, labels):
        calls.append((t[0].item(), z_t.clone()))
        return torch.ones_like(z_t)  # always predicts x = 1

    z = torch.randn(16, 2)
    dmd.generate(recording_generator, z, torch.zeros(16, dtype=torch.long), 4)
    assert [t for t, _ in calls] == [1.0, 0.75, 0.5, 0.25]
    assert torch.equal(calls[0][1], z)  # the first step starts from the pure noise
    first = [zt for _, zt in calls]
    calls.clear()
    dmd.generate(recording_generator, z, torch.zeros(16, dtype=torch.long), 4)
    assert not torch.equal(first[1], calls[1][1])  # re-noising draws fresh noise each time
    # z_{t_1} = alpha x + sigma eps with x = 1: its mean over many samples is alpha_{0.75}
    calls.clear()
    dmd.generate(recording_generator, torch.randn(20_000, 2), torch.zeros(20_000, dtype=torch.long), 4)
    alpha = torch.cos(torch.tensor(torch.pi * 0.75 / 2))
    assert torch.allclose(calls[1][1].mean(0), alpha.expand(2), atol=0.03)
    # K = 1: one call at the top time, t = 1
    calls.clear()
    x = dmd.generate(recording_generator, z, torch.zeros(16, dtype=torch.long), 1)
    assert [t for t, _ in calls] == [1.0] and torch.equal(x, torch.ones_like(z))
    assert dmd.generator_times(2) == [1.0, 0.5]


def test_backward_simulation_draws_each_samples_step():
    # k ~ U{0..K-1} per sample: one batch holds every step (a per-batch k makes the fake score chase one step at a
    # time, docs/results.md), and each latent is the sampler's z_{t_k} for its own k.
    def predicts_one(z_t, t, labels):
        return torch.ones_like(z_t)  # x = 1 at every step: z_{t_k} = alpha_{t_k} + sigma_{t_k} eps for k >= 1

    z = torch.randn(40_000, 2)
    z_k, t_k = dmd.backward_simulation(predicts_one, z, torch.zeros(40_000, dtype=torch.long), 4)
    assert z_k.shape == z.shape and t_k.shape == (40_000,)
    assert sorted(set(t_k.tolist())) == [0.25, 0.5, 0.75, 1.0]
    shares = torch.stack([(t_k == t).float().mean() for t in (1.0, 0.75, 0.5, 0.25)])
    assert torch.allclose(shares, torch.full((4,), 0.25), atol=0.01), shares
    top = t_k == 1.0
    assert torch.equal(z_k[top], z[top])  # k = 0 starts from the pure noise itself
    for t in (0.75, 0.5, 0.25):
        alpha, sigma = torch.cos(torch.tensor(torch.pi * t / 2)), torch.sin(torch.tensor(torch.pi * t / 2))
        sel = z_k[t_k == t]
        assert torch.allclose(sel.mean(0), alpha.expand(2), atol=0.03), (t, sel.mean(0))
        assert torch.allclose(sel.std(0), sigma.expand(2), atol=0.03), (t, sel.std(0))
    z_1, t_1 = dmd.backward_simulation(predicts_one, z[:8], torch.zeros(8, dtype=torch.long), 1)
    assert torch.equal(z_1, z[:8]) and torch.equal(t_1, torch.ones(8))  # K = 1: the noise at t = 1


@pytest.mark.parametrize("knows", [True, False])
def test_a_k_step_fake_score_told_the_step_learns_each_steps_samples(knows):
    # A 2-step generator whose first step makes the point (2, 2) and whose second makes (-2, -2). Told the step, the
    # fake score learns each step's own samples: its x prediction from a fully noised input is each step's mean.
    # Not told, it learns their mix (mean 0), and distribution matching could only pull the mix to the data:
    # the steps could drift apart as long as they average out (docs/results.md, "DMD2's 4-step generator").
    from common import Denoiser, MLPDenoiserNet

    def generator(z_t, t, labels):
        return torch.where(t[:, None] == 1.0, 2.0, -2.0).expand_as(z_t)

    torch.manual_seed(0)
    config = dmd.DMDConfig.from_preset("toy", steps=2, fake_knows_step=knows, grad_clip=10.0, dmd_batch_size=256)
    fake_score = Denoiser(MLPDenoiserNet(8, hidden=32, depth=2))
    if dmd.knows_step(config):
        fake_score.net.enable_w_embedding()
    assert dmd.knows_step(config) == knows
    opt = dmd.adamw(fake_score, 1e-2)
    for _ in range(300):
        z, labels = torch.randn(256, 2), torch.full((256,), 8)
        dmd.fake_score_update(fake_score, opt, generator, z, labels, config)
    z_t, labels = torch.randn(512, 2), torch.full((512,), 8)
    with torch.no_grad():
        first, second = (dmd.at_step(fake_score, torch.full((1,), t_k), config)(z_t, 0.98, labels).mean(0)
                         for t_k in (1.0, 0.5))
    if knows:
        assert (first > 1.5).all() and (second < -1.5).all(), (first, second)
    else:
        assert torch.allclose(first, second) and first.abs().max() < 0.5, (first, second)


def test_the_step_embedding_starts_at_zero_and_one_step_runs_have_none():
    # The fake score told the step starts as the teacher exactly (the embedding's output layer is zero), and a
    # one-step run never has one: its fake score is the teacher's network as it was.
    from common import Denoiser, MLPDenoiserNet

    torch.manual_seed(0)
    net = Denoiser(MLPDenoiserNet(8, hidden=16, depth=1))
    z_t, labels = torch.randn(8, 2), torch.full((8,), 8)
    plain = net(z_t, 0.5, labels)
    net.net.enable_w_embedding()
    told = dmd.at_step(net, torch.rand(8), dmd.DMDConfig.from_preset("toy", steps=4))
    assert isinstance(told, dmd.StepAware) and torch.equal(told(z_t, 0.5, labels), plain)
    assert dmd.at_step(net, torch.ones(8), dmd.DMDConfig.from_preset("toy", steps=1)) is net


def test_runs_saved_before_the_step_input_existed_resume_as_they_were_made():
    # A checkpoint without `fake_knows_step` had a fake score without the step input (DMDConfig.ADDED): a one-step
    # run resumes (there is no step to tell), a 4-step one is refused with the flag that makes it resumable.
    from plumbing.training import check_compatible

    one, four = (dmd.DMDConfig.from_preset("toy", steps=k) for k in (1, 4))
    assert not one.fake_knows_step and four.fake_knows_step
    for config in (one, four):
        saved = {k: v for k, v in config.as_dict().items() if k != "fake_knows_step"}
        if config.steps == 1:
            check_compatible(saved, config, dmd.RUN_KEYS, "DMD checkpoint", "x")
        else:
            with pytest.raises(UserError, match=r"fake_knows_step=False \(now True\); pass the values it was made "
                                                r"with \(--no-fake-knows-step\)"):
                check_compatible(saved, config, dmd.RUN_KEYS, "DMD checkpoint", "x")


def test_each_steps_prediction_is_the_one_the_sampler_makes():
    # tools/dmd_steps.py measures the k-th step's x prediction: k = K - 1 is the sample itself, and k = 0 the
    # generator at t = 1 on the pure noise
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import dmd_steps

    def generator(z_t, t, labels):
        return 0.5 * z_t + t[:, None]

    z, labels = torch.randn(64, 2), torch.zeros(64, dtype=torch.long)
    torch.manual_seed(1)
    last = dmd_steps.prediction_at(generator, z, labels, 4, 3)
    torch.manual_seed(1)
    assert torch.equal(last, dmd.generate(generator, z, labels, 4))
    assert torch.equal(dmd_steps.prediction_at(generator, z, labels, 4, 0), generator(z, torch.ones(64), labels))


def dmd_config(folder, teacher_folder, **overrides):
    folder = with_teacher(folder, teacher_folder)
    return dmd.DMDConfig.from_preset("toy", **{
        "out_dir": str(folder), "device": "cpu", "iterations": 1500, "eval_samples": 500, "eval_steps": [1, 4, 256],
        "log_every": 5, "ckpt_every": 10, "dmd_iterations": 20, "eval_every": 10, "fake_updates": 2,
        "gen_lr": 1e-3, "fake_lr": 1e-3, "reg_pairs": 512, "reg_steps": 16, **overrides})


@pytest.mark.parametrize("steps", [1, 4])
def test_short_runs_resume_exactly(tmp_path, toy_teacher, monkeypatch, steps):
    whole = dmd_config(tmp_path / "whole", toy_teacher, steps=steps)
    metrics = dmd.train_dmd(whole)
    out = dmd_dir(whole)
    assert [h["step"] for h in metrics["history"]] == [0, 10, 20]
    for name in ("metrics.json", "convergence.png", "loss.png", "eval_0000020/dm_view.png", "eval_0000020/samples.png"):
        assert (out / name).is_file(), name
    assert metrics["samples_per_s"]["speedup"] > 1

    part = dmd_config(tmp_path / "part", toy_teacher, steps=steps)
    die_on_call(monkeypatch, dmd, "dmd_generator_loss", 17)  # after the checkpoint at 10 and the log line at 15
    with pytest.raises(KeyboardInterrupt):
        dmd.train_dmd(part)
    monkeypatch.undo()
    with pytest.raises(UserError, match="pass --resume"):
        dmd.train_dmd(part)
    with pytest.raises(UserError, match="dmd_batch_size"):  # a checkpoint made with other settings
        dmd.train_dmd(part.replace(dmd_batch_size=64), resume=True)
    torch.manual_seed(3)
    resumed = dmd.train_dmd(part, resume=True)
    a = torch.load(out / "checkpoint.pt", weights_only=False)
    b = torch.load(dmd_dir(part) / "checkpoint.pt", weights_only=False)
    for key in ("generator", "fake_score"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert resumed["final"]["mmd"] == metrics["final"]["mmd"]
    assert log_records(dmd_dir(part)) == log_records(out)  # the line at 15 is not repeated


def test_regression_set_is_the_teachers_ddim_and_cached(tmp_path, toy_teacher):
    config = dmd_config(tmp_path, toy_teacher, reg_pairs=64, reg_steps=8)
    teacher = load_teacher(config, torch.device("cpu"), train_if_missing=False)
    pairs = dmd.regression_pairs(teacher, config, torch.device("cpu"))
    from common import ddim_sample

    assert torch.allclose(pairs["y"], ddim_sample(teacher, pairs["z"], 8, pairs["labels"]), atol=1e-6)
    assert (pairs["labels"] == 8).all()  # the toy preset distils the unconditional model
    again = dmd.regression_pairs(teacher, config, torch.device("cpu"))
    assert torch.equal(again["y"], pairs["y"])


def test_the_config_says_where_each_default_comes_from():
    # The defaults read as the paper's CIFAR-10 settings; each comment (its --help) names its source, and the
    # two that are not DMD's say so.
    helps = field_help(dmd.DMDConfig)
    sources = ("paper", "DMD", "this project", "re-implementation", "CIFAR-10")
    last = {name: re.search(r"\(([^()]*)\)$", helps[name]) for name in dmd.DMDConfig.own_fields() if name != "tag"}
    unsourced = [name for name, found in last.items() if not (found and any(s in found.group(1) for s in sources))]
    assert not unsourced, {name: helps[name] for name in unsourced}
    doc = " ".join(dmd.DMDConfig.__doc__.split())
    assert "`dmd_label_dropout` 0.1: DMD's CIFAR-10 generator is class-conditional" in doc
    assert "`grad_clip` 1.0 (inherited from TeacherConfig" in doc and "DMD2's code clips both at 10" in doc


def test_regression_losses():
    x, y = torch.zeros(4, 2), torch.ones(4, 2)
    assert dmd.regression_loss(x, y, "mse").item() == 1.0
    c = 0.00054 * 2**0.5
    assert abs(dmd.regression_loss(x, y, "pseudo-huber").item() - ((2 + c * c) ** 0.5 - c)) < 1e-6
    assert dmd.regression_loss(x, x, "pseudo-huber").item() == pytest.approx(0.0, abs=1e-7)


def test_lpips_unavailable_says_which_flag(monkeypatch):
    # Both ways LPIPS can be missing are made to happen (it loads where its weights are cached or downloadable).
    with pytest.raises(UserError, match="needs images"):
        load_lpips(dmd.DMDConfig.from_preset("toy"), "cpu")
    fmnist = dmd.DMDConfig.from_preset("fmnist")
    monkeypatch.setitem(sys.modules, "torchmetrics.image.lpip", None)  # torchmetrics (or its LPIPS) not installed
    with pytest.raises(UserError, match=r"needs torchmetrics \(pip install torchmetrics\); or use --reg-loss pseudo"):
        load_lpips(fmnist, "cpu")
    monkeypatch.undo()
    lpip = pytest.importorskip("torchmetrics.image.lpip")

    def no_weights(*args, **kwargs):
        raise OSError("the VGG weights cannot be downloaded")

    monkeypatch.setattr(lpip, "LearnedPerceptualImagePatchSimilarity", no_weights)
    with pytest.raises(UserError, match=r"LPIPS weights cannot be loaded \(OSError\); use --reg-loss pseudo-huber"):
        load_lpips(fmnist, "cpu")


def test_a_file_the_project_did_not_write_is_not_offered_for_deletion(tmp_path):
    foreign = tmp_path / "passwd"  # `dmd.py --teacher /etc/passwd`
    foreign.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(UserError) as refused:
        dmd.main(["--preset", "toy", "--out-dir", str(tmp_path / "run"), "--teacher", str(foreign), "--device", "cpu"])
    message = str(refused.value)
    assert f"teacher checkpoint at {foreign} cannot be read" in message and "check the path" in message, message
    assert "delete" not in message, message
    assert foreign.read_text().startswith("root:")


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--reg-loss", "l1"], "unknown --reg-loss 'l1'"),
    (["--real-guidance", "-1"], "--real-guidance must be >= 0"),
    (["--reg-loss", "lpips"], "--reg-loss lpips needs images"),
])
def test_bad_input_gives_one_line(args, message, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "dmd.py"), "--preset", "toy", "--out-dir", str(tmp_path),
                             *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_one_step_generator_learns_the_modes(tmp_path, toy_teacher):
    # 400 generator updates from the teacher's collapsed 1-step output (100% off-mode, all at the mean),
    # with the tests' weak 1500-iteration teacher: measured 67% off-mode, every mode holding 3.4-5.8%
    # (66% and 3.6-5.8% at the earlier batch 512).
    config = dmd_config(tmp_path, toy_teacher, dmd_iterations=400, eval_every=400, ckpt_every=400, log_every=100,
                        reg_pairs=4096, reg_steps=64, fake_updates=5)
    final = dmd.train_dmd(config)["final"]
    assert final["off_mode"] < 0.8, final
    assert min(final["mode_shares"]) > 0.025, final["mode_shares"]  # no mode dropped
