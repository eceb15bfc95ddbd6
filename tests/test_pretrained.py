"""A diffusers teacher (plumbing/pretrained.py), offline: a tiny UNet2DModel with random weights and a DDPM
schedule, written with save_pretrained to a temporary folder. The oracle is diffusers' own DDIMScheduler: the
project's DDIM through the wrapper must land where it lands, from the same noise. Then PD, DMD, DisBack and
evaluate.py run from the wrapped teacher on Fashion-MNIST at 16x16."""


import sys
from pathlib import Path

import pytest
import torch

import disback
import dmd
import evaluate
import guided_distill
import progressive_distill
import train_teacher
from common import ddim_sample, trainable_copy
from conftest import assert_finite, fashion_mnist_args, log_records
from plumbing.errors import UserError
from plumbing.networks import frozen_denoiser
from plumbing.pretrained import STUDENT_ALPHA_FLOOR, load_pretrained
from train_teacher import TeacherConfig

diffusers = pytest.importorskip("diffusers")


def save_tiny(folder, prediction_type="epsilon", seed=0):
    """A 1x16x16 UNet2DModel (0.18M parameters, random weights) beside DDPM's linear betas, as
    google/ddpm-cifar10-32 lays them out: config.json, weights and scheduler_config.json in one folder."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 attention_head_dim=8)
    unet.save_pretrained(folder)
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                            prediction_type=prediction_type).save_pretrained(folder)
    return unet.eval()


def wrapped(folder, **overrides):
    config = TeacherConfig.from_preset("fmnist16", teacher=f"diffusers:{folder}", device="cpu", **overrides)
    return load_pretrained(config, "cpu").requires_grad_(False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_ddpm")
    return folder, save_tiny(folder)


@pytest.mark.parametrize("prediction_type,steps", [("epsilon", 10), ("epsilon", 50), ("v_prediction", 10)])
def test_our_ddim_through_the_wrapper_matches_diffusers_ddim(tmp_path, prediction_type, steps):
    unet = save_tiny(tmp_path, prediction_type)
    teacher = wrapped(tmp_path)
    scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path, clip_sample=False)  # ours never clips
    scheduler.set_timesteps(steps)  # [900, 800, ..., 0] at 10 steps, the last one lands on alpha = 1
    z_1 = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    z = z_1.clone()
    with torch.no_grad():
        for k in scheduler.timesteps:
            z = scheduler.step(unet(z, k).sample, k, z).prev_sample
    # the same discrete steps in our time (same log-SNR), then t = 0 for diffusers' final alpha_bar = 1
    grid = [float(teacher.time_of_step(int(k))) for k in scheduler.timesteps] + [0.0]
    ours = ddim_sample(teacher, z_1, steps, torch.zeros(4, dtype=torch.long), grid=grid)
    scale = z.abs().max()  # a random network's x_hat is large (x = (z - sigma eps) / alpha near the top)
    assert scale > 1 and (ours - z).abs().max() <= 1e-4 * scale, ((ours - z).abs().max(), scale)
    wrong = [float(teacher.time_of_step(int(k) + 1)) for k in scheduler.timesteps] + [0.0]  # one step later
    missed = (ddim_sample(teacher, z_1, steps, torch.zeros(4, dtype=torch.long), grid=wrong) - z).abs().max()
    assert missed > 1e-3 * scale, (missed, scale)  # (measured: 8e-3 of the scale)


def test_the_network_sees_the_fractional_step_of_the_same_log_snr(tiny):
    folder, unet = tiny
    teacher = wrapped(folder)
    lam = teacher.lambdas
    # halfway in log-SNR between steps 400 and 401: tan(pi t / 2) = exp(-lambda / 2)
    t_half = 2 / torch.pi * torch.atan(torch.exp(-0.25 * (lam[400] + lam[401]))).float()
    tau, _ = teacher.step_of(torch.stack([teacher.time_of_step(0), teacher.time_of_step(400), t_half,
                                          teacher.time_of_step(999)]))
    assert torch.allclose(tau, torch.tensor([0.0, 400.0, 400.5, 999.0]), atol=2e-3), tau
    z = torch.randn(2, 1, 16, 16)
    alpha_bar = torch.sigmoid(0.5 * (lam[400] + lam[401])).float()
    with torch.no_grad():
        direct = (z - (1 - alpha_bar).sqrt() * unet(z, torch.full((2,), float(tau[2]))).sample) / alpha_bar.sqrt()
        assert torch.allclose(teacher(z, t_half.expand(2), None), direct, atol=1e-4)


def test_outside_the_trained_range_the_nearest_trained_level_is_used(tiny):
    folder, _ = tiny
    teacher = wrapped(folder)
    t_min, t_max = float(teacher.time_of_step(0)), float(teacher.time_of_step(999))
    assert 0.0063 < t_min < 0.0065 and 0.9959 < t_max < 0.9961  # DDPM's linear betas in our cosine time
    z = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        top, bottom = teacher(z, torch.ones(3), None), teacher(z, torch.zeros(3), None)
        assert torch.isfinite(top).all() and torch.isfinite(bottom).all()
        assert torch.equal(top, teacher(z, torch.full((3,), t_max), None))
        assert torch.equal(bottom, teacher(z, torch.full((3,), t_min), None))
        assert not torch.allclose(top, teacher(z, torch.full((3,), 0.9), None))  # inside, t still matters


def test_a_student_starts_as_the_teacher_below_the_floor_and_stays_finite_at_t_1(tiny):
    folder, _ = tiny
    teacher = wrapped(folder)
    student = trainable_copy(teacher)  # reads x = (z - sigma eps_hat) / max(alpha, 0.1)
    z, labels = torch.randn(4, 1, 16, 16), torch.tensor([0, 3, 7, 10])  # labels, the null label too, are ignored
    t_floor = 2 / torch.pi * torch.acos(torch.tensor(STUDENT_ALPHA_FLOOR))  # alpha_t = 0.1 at t = 0.936
    below, above = torch.tensor([t_floor - 1e-3, 0.75, 0.5, 0.01]), torch.tensor([1.0, t_floor + 0.01])
    with torch.no_grad():  # the same function where alpha >= 0.1 (in eval mode bit for bit)
        assert torch.equal(student.eval()(z, below, labels), teacher(z, below, torch.zeros(4, dtype=torch.long)))
        assert not torch.allclose(student(z[:2], above, labels[:2]), teacher(z[:2], above, labels[:2]))
    # the amplification of an error in eps_hat at t = 1: 1 / alpha_999 = 157 for the teacher, 10 for a student
    for model, gain in ((teacher, 157.4), (student, 10.0)):
        x = model(z, torch.ones(4), labels)
        bump = model.net.conv_out.bias.detach().clone()
        model.net.conv_out.bias.data += 1e-3  # eps_hat + 1e-3 everywhere
        x_bumped = model(z, torch.ones(4), labels)
        model.net.conv_out.bias.data.copy_(bump)
        assert torch.allclose((x - x_bumped) / 1e-3, torch.full_like(x, gain), rtol=2e-2), model
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(3):  # a one-step generator's update: x = student(z_1, 1), a loss on x
        x = student(z, torch.ones(4), labels)
        loss = (x - 0.5).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(x).all() and all(torch.isfinite(p.grad).all() for p in student.parameters())
        opt.step()
    state = student.state_dict()  # a student's checkpoint reads as it trained: the floor travels with it
    again = load_pretrained(TeacherConfig.from_preset("fmnist16", teacher=f"diffusers:{folder}", device="cpu"),
                            "cpu", weights=False)
    again.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(again(z, torch.ones(4), labels), student.eval()(z, torch.ones(4), labels))
    v = student.predict_v(z, torch.full((4,), 0.5), labels)  # the fake score's v-MSE reads this
    assert torch.allclose(v, (0.5 ** 0.5 * z - student(z, torch.full((4,), 0.5), labels)) / 0.5 ** 0.5, atol=1e-4)


def test_bad_diffusers_teachers_are_one_line(tiny, tmp_path, monkeypatch):
    folder, _ = tiny
    with pytest.raises(UserError, match="takes 1x16x16 images.*--image-size"):
        wrapped(folder, image_size=32)
    with pytest.raises(UserError, match="no UNet config.json"):
        wrapped(tmp_path)
    with pytest.raises(UserError, match="no such folder, and not a hub id"):
        wrapped(tmp_path / "missing" / "deeper")
    conditional = tmp_path / "conditional"
    diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                          layers_per_block=1, norm_num_groups=8, num_class_embeds=10,
                          down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(conditional)
    diffusers.DDPMScheduler().save_pretrained(conditional)
    with pytest.raises(UserError, match="class-conditional"):
        wrapped(conditional)
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # as if it were not installed
    with pytest.raises(UserError, match="pip install diffusers"):
        wrapped(folder)


def test_a_hub_id_is_resolved_once_per_process(tiny, monkeypatch):
    # Every student a run rebuilds (PD's rounds, evaluate.py's rows) loads the teacher's architecture again;
    # a hub id must not ask the hub each time.
    import huggingface_hub

    from plumbing.pretrained import _folder

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda name, **kw: asked.append(name) or str(tiny[0]))
    _folder.cache_clear()
    config = TeacherConfig.from_preset("fmnist16", teacher="diffusers:owner/tiny-ddpm", device="cpu")
    for _ in range(3):
        load_pretrained(config, "cpu", weights=False)
    _folder.cache_clear()
    assert asked == ["owner/tiny-ddpm"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("from_diffusers")
    data = fashion_mnist_args(folder)
    args = ["--preset", "fmnist16", "--device", "cpu", "--teacher", f"diffusers:{tiny[0]}", "--out-dir", str(folder),
            "--eval-samples", "40", "--eval-share", "0", "--classifier-steps", "30", "--log-every", "2",
            "--ckpt-every", "2", "--eval-steps", "1", "4", "--no-amp", *data]
    return folder, args


@pytest.mark.slow
def test_pd_dmd_disback_and_evaluate_distil_a_diffusers_teacher(run, tiny):
    folder, args = run
    progressive_distill.main([*args, "--start-steps", "4", "--to-steps", "1", "--round-iterations", "2",
                              "--pd-batch-size", "4"])
    dmd_args = ["--steps", "1", "--dmd-iterations", "2", "--eval-every", "2", "--dmd-batch-size", "4",
                "--fake-updates", "1", "--reg-loss", "mse", "--reg-pairs", "8", "--reg-steps", "2"]
    dmd.main([*args, *dmd_args, "--recipe", "dmd"])
    dmd.main([*args, *dmd_args, "--recipe", "dmd2"])  # the GAN on the UNet2DModel's mid block, real data
    disback.main([*args, *dmd_args, "--recipe", "dmd", "--snapshots", "2", "--record-iterations", "2",
                  "--interval", "1"])
    assert not (folder / "teacher.pt").exists()  # nothing trained a teacher
    pd = assert_finite(folder / "pd" / "metrics.json")
    assert set(pd["students"]) == {"2", "1"} and all("fd_classifier" in s for s in pd["students"].values())
    for name in ("dmd_1step", "dmd2_1step", "disback_1step"):
        metrics = assert_finite(folder / name / "metrics.json")
        assert [h["step"] for h in metrics["history"]] == [0, 2] and metrics["teacher"]
    assert {"loss_gan", "loss_cls"} <= set(log_records(folder / "dmd2_1step")[-1])
    # a student's checkpoint comes back as the teacher's wrapper with the student's weights
    state = torch.load(folder / "pd" / "student_1.pt", weights_only=True)
    student = frozen_denoiser(state["config"], state["model"], "cpu")
    teacher = wrapped(tiny[0])
    assert type(student) is type(teacher) and not torch.equal(student.net.conv_out.weight, teacher.net.conv_out.weight)
    z = torch.randn(2, 1, 16, 16)
    assert torch.isfinite(ddim_sample(student, z, 1, torch.zeros(2, dtype=torch.long))).all()
    evaluate.main([*args, "--num-samples", "40", "--speed-batch", "4", "--teacher-steps", "1", "4"])
    table = (folder / "results.md").read_text()
    for row in ("| teacher DDIM | 4 | 4 |", "| PD | 1 | 1 |", "| DMD | 1 | 1 |", "| DMD2 | 1 | 1 |",
                "| DisBack | 1 | 1 |"):
        assert row in table, (row, table)
    assert "guided: not possible" in table  # not "make it with" a command that refuses this teacher


def test_what_a_diffusers_teacher_cannot_do_is_one_line(run):
    _, args = run
    with pytest.raises(UserError, match="class-conditional teacher that knows a null label"):
        guided_distill.main([*args, "--start-steps", "2", "--to-steps", "1"])
    with pytest.raises(UserError, match="already trained"):
        train_teacher.main(args)
    with pytest.raises(UserError, match="--real-guidance 0"):
        dmd.main([*args, "--real-guidance", "2", "--tag", "guided"])


@pytest.mark.slow
def test_the_ddpm_tool_trains_a_teacher_that_the_wrapper_loads(tmp_path):
    # tools/ddpm_teacher.py: DDPM's simple loss in diffusers' format; its EMA is what save_pretrained writes.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import ddpm_teacher

    data = fashion_mnist_args(tmp_path)
    args = ["--preset", "fmnist16", "--device", "cpu", "--channels", "16", "--out-dir", str(tmp_path / "run"),
            "--batch-size", "16", "--log-every", "10", "--warmup", "1", *data]
    with pytest.raises(UserError, match="multiples of 8"):
        ddpm_teacher.main([*args, "--channels", "12"])
    ddpm_teacher.main([*args, "--iterations", "30"])
    losses = [r["loss"] for r in log_records(tmp_path / "run" / "ddpm")]
    assert len(losses) == 3 and losses[-1] < 0.7 * losses[0], losses  # epsilon-MSE falls from its random start
    teacher = wrapped(tmp_path / "run" / "ddpm")
    ema = torch.load(tmp_path / "run" / "ddpm" / "progress.pt", weights_only=True)["ema"]["model"]
    assert all(torch.equal(ema[k], v) for k, v in teacher.net.state_dict().items())
    assert teacher.prediction_type == "epsilon" and teacher.steps == 1000
