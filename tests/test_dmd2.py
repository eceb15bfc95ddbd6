"""DMD2's additions (dmd2.py): the GAN losses' signs and gradients on cases with a known answer, the head
on every network's bottleneck, the recipe switch, GAN off = DMD bit for bit, and short runs with the
head that resume exactly."""

import pytest
import torch
import torch.nn.functional as F

import dmd
import dmd2
from common import Denoiser, MLPDenoiserNet, UNet
from conftest import die_on_call, log_records, with_teacher
from plumbing.errors import UserError
from plumbing.folders import dmd_dir


class Identity(torch.nn.Module):
    """A 'fake score' whose bottleneck is the noised point itself: the classifier sees F(x, t) directly."""

    def bottleneck(self, z_t, t, labels, w=None):
        return z_t


def test_classifier_loss_is_small_when_it_separates_and_large_when_it_is_fooled():
    confident = torch.full((8,), 10.0)
    assert dmd2.gan_classifier_loss(confident, -confident).item() < 1e-4  # real -> +, fake -> -: right
    assert dmd2.gan_classifier_loss(-confident, confident).item() > 19.9  # both wrong: -log(1 - D) twice
    assert dmd2.gan_classifier_loss(torch.zeros(8), torch.zeros(8)).item() == pytest.approx(2 * 0.6931, abs=1e-4)


def test_generator_loss_is_non_saturating():
    # -log D(fake): where the classifier is sure a sample is fake (logit -10) the gradient is still about -1,
    # not the saturating log(1 - D)'s sigmoid(-10) ~ 5e-5; its sign raises the logit.
    logits = torch.tensor([-10.0, 0.0, 10.0], requires_grad=True)
    dmd2.gan_generator_loss(logits).backward()
    assert torch.allclose(logits.grad, -torch.sigmoid(-logits.detach()) / 3, atol=1e-7)
    assert logits.grad[0] < -0.33 and (logits.grad < 0).all()


def test_a_generator_step_moves_generated_features_toward_the_real_ones():
    # Real points at (1, 0), generated ones at (-1, 0). A classifier trained on them with the classifier loss
    # separates them; the generator's GAN gradient then points from the generated points toward the real ones.
    torch.manual_seed(0)  # the head's initial weights and the diffusion noise
    g = torch.Generator().manual_seed(0)
    real = torch.tensor([1.0, 0.0]) + 0.1 * torch.randn(256, 2, generator=g)
    fake = torch.tensor([-1.0, 0.0]) + 0.1 * torch.randn(256, 2, generator=g)
    labels = torch.zeros(256, dtype=torch.long)
    head, score = dmd2.PointHead(2), Identity()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    t_low = torch.full((256,), 0.1)  # little noise, so the classes stay apart
    for _ in range(200):
        loss = dmd2.gan_classifier_loss(dmd2.gan_logits(score, head, real, labels, t_low),
                                        dmd2.gan_logits(score, head, fake, labels, t_low))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2  # chance: 2 log 2 = 1.39
    x = fake.clone().requires_grad_(True)
    head.requires_grad_(False)
    dmd2.gan_generator_loss(dmd2.gan_logits(score, head, x, labels, t_low)).backward()
    step = -x.grad  # gradient descent's direction
    assert (step[:, 0] > 0).float().mean() > 0.95  # toward real (+x), for nearly every sample
    assert step[:, 0].mean() > 5 * step[:, 1].abs().mean()


def test_the_generator_term_reaches_only_the_generator(tmp_path):
    config = dmd.DMDConfig.from_preset("toy", recipe="dmd2", out_dir=str(tmp_path))
    fake_score = Denoiser(MLPDenoiserNet(8, hidden=32, depth=2))
    gan = dmd2.GAN(fake_score, config, torch.device("cpu"))
    x = torch.randn(16, 2, requires_grad=True)
    gan.generator_loss(x, torch.full((16,), 8)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in gan.critic.parameters())  # the fake score and the head are frozen for it
    assert all(p.requires_grad for p in gan.critic.parameters())  # and trainable again afterwards
    before = x.grad.clone()
    gan.classifier_loss(x, torch.full((16,), 8)).backward()
    assert all(p.grad is not None for p in gan.head.parameters())  # the classifier's loss trains the head
    assert torch.equal(x.grad, before)  # ... and never reaches the generator's samples


@pytest.mark.parametrize("size,ch_mult", [(16, (1, 2)), (32, (1, 2, 2, 2)), (32, (1, 2, 2))])
def test_the_image_head_reads_the_unets_bottleneck_at_any_size(size, ch_mult):
    net = UNet(10, in_ch=1, channels=16, ch_mult=ch_mult, num_res_blocks=1, attn_res=(), resolution=size)
    denoiser = Denoiser(net)
    z, t, labels = torch.randn(3, 1, size, size), torch.rand(3), torch.tensor([0, 1, 10])
    h = denoiser.bottleneck(z, t, labels)
    r = size // 2 ** (len(ch_mult) - 1)
    assert h.shape == (3, 16 * ch_mult[-1], r, r)
    head = dmd2.ImageHead(h.shape[1], r)
    assert head.body(h).shape == (3, 1, 1, 1) and head(h).shape == (3,)  # one logit, DMD2's 1x1 map
    # the bottleneck is what the forward pass carries through the middle block
    caught = []
    net.mid[-1].register_forward_hook(lambda module, args, out: caught.append(out))
    net(z, t, labels)
    assert torch.equal(caught[0], h)


def test_recipes_set_dmd2s_values_and_flags_still_win():
    dmd_cfg = dmd.DMDConfig.from_preset("fmnist16", recipe="dmd")
    dmd2_cfg = dmd.DMDConfig.from_preset("fmnist16", recipe="dmd2")
    assert dmd_cfg.reg_weight > 0 and dmd_cfg.gen_gan_weight == 0 and not dmd.uses_gan(dmd_cfg)
    assert dmd2_cfg.reg_weight == 0 and dmd2_cfg.fake_updates == 5 and dmd.uses_gan(dmd2_cfg)
    assert (dmd2_cfg.gen_gan_weight, dmd2_cfg.cls_gan_weight) == (3e-3, 1e-2)
    mine = dmd.DMDConfig.from_preset("fmnist16", recipe="dmd2", fake_updates=3, gen_gan_weight=0.0)
    assert mine.fake_updates == 3 and mine.gen_gan_weight == 0.0 and mine.reg_weight == 0
    with pytest.raises(UserError, match="unknown --recipe 'dmd3'; choose one of dmd, dmd2"):
        dmd.DMDConfig.from_preset("toy", recipe="dmd3")
    with pytest.raises(UserError, match="--dm-weight 0 the generator needs another loss"):
        dmd.DMDConfig.from_preset("toy", recipe="dmd", dm_weight=0.0, reg_weight=0.0)
    with pytest.raises(UserError, match="--gen-gan-weight must be >= 0"):
        dmd.DMDConfig.from_preset("toy", gen_gan_weight=-1e-3)


def toy_config(folder, teacher_folder, **overrides):
    folder = with_teacher(folder, teacher_folder)
    return dmd.DMDConfig.from_preset("toy", **{
        "out_dir": str(folder), "device": "cpu", "iterations": 1500, "eval_samples": 500, "eval_steps": [1, 4, 256],
        "log_every": 5, "ckpt_every": 10, "dmd_iterations": 20, "eval_every": 10, "gen_lr": 1e-3, "fake_lr": 1e-3,
        "reg_pairs": 512, "reg_steps": 16, **overrides})


def test_gan_weights_of_zero_are_dmd_bit_for_bit(tmp_path, toy_teacher, monkeypatch):
    # DMD2's recipe brought back to DMD's values by flags runs DMD's code path: no classifier, no real data
    # (building either now fails), the same networks and log to the bit.
    plain = dmd.train_dmd(toy_config(tmp_path / "dmd", toy_teacher, recipe="dmd", fake_updates=2))
    monkeypatch.setattr(dmd, "GAN", None)  # calling it would raise
    back = toy_config(tmp_path / "dmd2", toy_teacher, recipe="dmd2", fake_updates=2, reg_weight=4.0,
                      gen_gan_weight=0.0, cls_gan_weight=0.0)
    same = dmd.train_dmd(back)
    a = torch.load(tmp_path / "dmd" / "dmd_1step" / "checkpoint.pt", weights_only=False)
    b = torch.load(dmd_dir(back) / "checkpoint.pt", weights_only=False)
    for key in ("generator", "fake_score"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert "gan_head" not in b and same["final"]["mmd"] == plain["final"]["mmd"]
    assert log_records(dmd_dir(back)) == log_records(tmp_path / "dmd" / "dmd_1step")


def test_runs_with_the_gan_resume_exactly(tmp_path, toy_teacher, monkeypatch, steps=1):
    whole = toy_config(tmp_path / "whole", toy_teacher, recipe="dmd2", steps=steps, fake_updates=2)
    metrics = dmd.train_dmd(whole)
    saved = torch.load(dmd_dir(whole) / "checkpoint.pt", weights_only=False)
    assert {"gan_head", "real_data"} <= set(saved)
    assert {"loss_gan", "loss_cls", "loss_dm", "loss_fake"} <= set(log_records(dmd_dir(whole))[-1])
    assert "loss_reg" not in log_records(dmd_dir(whole))[-1]  # DMD2: no regression

    part = toy_config(tmp_path / "part", toy_teacher, recipe="dmd2", steps=steps, fake_updates=2)
    die_on_call(monkeypatch, dmd2, "gan_generator_loss", 17)  # after the checkpoint at 10 and the log line at 15
    with pytest.raises(KeyboardInterrupt):
        dmd.train_dmd(part)
    monkeypatch.undo()
    torch.manual_seed(3)
    resumed = dmd.train_dmd(part, resume=True)
    b = torch.load(dmd_dir(part) / "checkpoint.pt", weights_only=False)
    for key in ("generator", "fake_score", "gan_head"):
        assert all(torch.equal(saved[key][k], b[key][k]) for k in saved[key]), key
    assert resumed["final"]["mmd"] == metrics["final"]["mmd"]
    assert log_records(dmd_dir(part)) == log_records(dmd_dir(whole))


def test_gan_alone_trains_the_generator_without_distribution_matching(tmp_path, toy_teacher):
    config = toy_config(tmp_path, toy_teacher, recipe="dmd2", dm_weight=0.0, dmd_iterations=10, fake_updates=1)
    dmd.train_dmd(config)
    last = log_records(dmd_dir(config))[-1]
    assert "loss_dm" not in last and "loss_gan" in last


def test_non_saturating_means_softplus():
    # The two losses are the binary cross-entropy of the classifier with targets real = 1, fake = 0.
    real, fake = torch.randn(32), torch.randn(32)
    bce = (F.binary_cross_entropy_with_logits(real, torch.ones(32))
           + F.binary_cross_entropy_with_logits(fake, torch.zeros(32)))
    assert torch.allclose(dmd2.gan_classifier_loss(real, fake), bce, atol=1e-6)
    assert torch.allclose(dmd2.gan_generator_loss(fake), F.binary_cross_entropy_with_logits(fake, torch.ones(32)))


def test_missing_real_data_is_one_line_that_names_the_way_out(tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise UserError("CIFAR-10 not found in data and could not be downloaded")

    monkeypatch.setattr(dmd2, "BatchStream", missing)
    config = dmd.DMDConfig.from_preset("toy", recipe="dmd2", out_dir=str(tmp_path))
    with pytest.raises(UserError) as refused:
        dmd2.GAN(Denoiser(MLPDenoiserNet(8, hidden=16, depth=1)), config, torch.device("cpu"))
    message = str(refused.value)
    assert "\n" not in message and "needs real images" in message and "CIFAR-10 not found" in message
    assert "--recipe dmd" in message


def test_gan_noise_levels_are_dmd2s_karras_grid():
    # DMD2's code draws a uniform index into EDM's 1000 Karras sigmas (0.002 to 80, rho 7); as this schedule's t,
    # tan(pi t / 2) is that sigma. A fifth of the draws lie below sigma 0.1, two fifths below 1 (uniform t: 6%, 50%).
    torch.manual_seed(0)
    sigma = torch.tan(torch.pi * dmd2.gan_times(40_000, "cpu").double() / 2)
    ramp = torch.linspace(0, 1, 1000, dtype=torch.float64)
    grid = (0.002 ** (1 / 7) + ramp * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    nearest = (sigma[:, None].log() - grid[None].log()).abs().min(1).values
    assert nearest.max() < 1e-4  # every draw is a grid point (fp32 rounding aside)
    assert abs((sigma < 0.1).double().mean() - (grid < 0.1).double().mean()) < 0.01
    assert abs((sigma < 1).double().mean() - (grid < 1).double().mean()) < 0.01
    assert sigma.min() < 0.0021 and sigma.max() > 79
