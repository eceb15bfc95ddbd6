"""The coursework checker can pass and can fail: the reference code passes every check, the
untouched stubs fail every one with their message, and a plausible wrong answer to each
exercise is rejected. The exercise files are exactly what `exercises/make.py` writes."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import dmd
from exercises import check, make

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = [name for _, (_, functions) in make.TOPICS.items() for _, name in functions]
TOPIC_OF = {name: topic for topic, (_, functions) in make.TOPICS.items() for _, name in functions}


def results(name: str, function) -> list:
    return check.run(name, function)


def test_exercise_files_are_what_make_writes():
    assert make.main(["--check"]) == 0, "run `python exercises/make.py`"


@pytest.mark.parametrize("topic", list(make.TOPICS))
def test_the_reference_passes_every_check(topic):
    for name, what, ok, detail in check.check_topic(topic, check.implementations(topic, reference=True)):
        assert ok, f"{name}: {what} ({detail})"


@pytest.mark.parametrize("topic", list(make.TOPICS))
def test_the_stubs_fail_with_their_message(topic):
    impl = check.implementations(topic, reference=False)
    for name in impl:
        found = results(name, impl[name])
        assert len(found) == 1 and not found[0][1] and found[0][0].startswith("not implemented yet"), found


def test_the_command_prints_one_line_per_check_and_no_traceback():
    result = subprocess.run([sys.executable, str(ROOT / "exercises" / "check.py"), "basics"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0 passed, 4 failed"
    reference = subprocess.run([sys.executable, str(ROOT / "exercises" / "check.py"), "--reference"],
                               capture_output=True, text=True, timeout=120)
    assert reference.returncode == 0 and reference.stdout.strip().splitlines()[-1].endswith(" passed, 0 failed")


# Plausible wrong answers, one (or more) per exercise: each must fail at least one check.


def alpha_sigma_swapped(t):  # sin and cos exchanged: t = 1 becomes the clean end
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.sin(0.5 * math.pi * t), torch.cos(0.5 * math.pi * t)


def alpha_sigma_unclamped(t):  # fp32 cos(pi / 2) = -4e-8, not 0
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


def ddim_step_times_swapped(x_hat, z_t, t, s):
    return common.ddim_step(x_hat, z_t, s, t)


def ddim_step_eps_at_s(x_hat, z_t, t, s):  # the noise estimate divided by the wrong sigma
    alpha_t, sigma_t = common._coeffs(t, z_t)
    alpha_s, sigma_s = common._coeffs(s, z_t)
    return alpha_s * x_hat + (z_t - alpha_t * x_hat)


def invert_ddim_swapped(z_t, z_s, t, s):  # t and s exchanged
    return common.invert_ddim(z_t, z_s, s, t)


def cfg_other_convention(x_cond, x_uncond, w):  # w x_c - (w - 1) x_u: the guidance_scale convention
    w = common.bcast(common._as_time(w, x_cond), x_cond)
    return w * x_cond - (w - 1.0) * x_uncond


def pd_target_primes_swapped(teacher, z_t, t, labels, n_steps):  # t' and t'' exchanged
    t1, t2 = t - 1.0 / n_steps, t - 0.5 / n_steps
    z_t1 = common.ddim_step(teacher(z_t, t, labels), z_t, t, t1)
    z_t2 = common.ddim_step(teacher(z_t1, t1, labels), z_t1, t1, t2)
    return common.invert_ddim(z_t, z_t2, t, t2)


def pd_target_one_teacher_step(teacher, z_t, t, labels, n_steps):  # the teacher's own x_hat, no inversion
    return teacher(z_t, t, labels)


def snr_weight_min(t, weighting):  # min(SNR, 1) instead of max
    snr = torch.exp(common.logsnr(t))
    return snr.clamp(max=1.0) if weighting == "truncated-snr" else snr + 1.0


def guided_target_scale_convention(teacher, z_t, t, labels, w):
    null = torch.full_like(labels, teacher.null_label)
    return w * teacher(z_t, t, labels) - (w - 1.0) * teacher(z_t, t, null)


def renoise_sigma_t(z_s, s, t, eps):  # the marginal sigma_t, not sigma_{t|s}
    (alpha_s, _), (alpha_t, sigma_t) = common.alpha_sigma(s), common.alpha_sigma(t)
    return alpha_t / alpha_s * z_s + sigma_t * eps


def dmd_loss_wrong_sign(x, real_score, fake_score, labels, t=None, eps=None):
    return -dmd.dmd_generator_loss(x, real_score, fake_score, labels, t=t, eps=eps)


def dmd_loss_no_normaliser(x, real_score, fake_score, labels, t=None, eps=None):
    t = torch.rand(x.shape[0]) * 0.96 + 0.02 if t is None else t
    eps = torch.randn_like(x) if eps is None else eps
    with torch.no_grad():
        x_t = common.diffuse(x.detach(), t, eps)
        grad = fake_score(x_t, t, labels) - real_score(x_t, t, labels)
    return 0.5 * (x - (x - grad).detach()).pow(2).mean()


def fake_score_loss_not_detached(fake_score, x, labels):
    return common.diffusion_loss(fake_score, x, labels)


def generator_renoising_with(renoise, name: str):
    """A K-step generator like dmd.generate whose re-noising to the next time is `renoise(x, t, z)`."""

    def generate(generator, z, labels, steps, first=None):
        times = dmd.generator_times(steps)
        z_t = z
        for k, t in enumerate(times):
            if first is not None and k == first:
                return z_t, t
            x = generator(z_t, torch.full((z.shape[0],), t), labels)
            if k + 1 < len(times):
                z_t = renoise(x, times[k + 1], z)
        return x

    generate.__name__ = name
    return generate


# re-noises with the initial z every time; passes the prediction on as it is
generate_same_noise = generator_renoising_with(lambda x, t, z: common.diffuse(x, t, z), "generate_same_noise")
generate_no_renoise = generator_renoising_with(lambda x, t, z: x, "generate_no_renoise")


def snapshot_index_off_by_one(step, n_snapshots, interval):  # starts at s'_N, the fake score's start
    return max(n_snapshots - step // interval, 0)


WRONG = {
    "alpha_sigma": [alpha_sigma_swapped, alpha_sigma_unclamped],
    "ddim_step": [ddim_step_times_swapped, ddim_step_eps_at_s],
    "invert_ddim": [invert_ddim_swapped],
    "cfg": [cfg_other_convention],
    "pd_target": [pd_target_primes_swapped, pd_target_one_teacher_step],
    "snr_weight": [snr_weight_min],
    "guided_target": [guided_target_scale_convention],
    "renoise": [renoise_sigma_t],
    "dmd_generator_loss": [dmd_loss_wrong_sign, dmd_loss_no_normaliser],
    "fake_score_loss": [fake_score_loss_not_detached],
    "generate": [generate_same_noise, generate_no_renoise],
    "snapshot_index": [snapshot_index_off_by_one],
}


def test_every_exercise_has_a_wrong_answer():
    assert set(WRONG) == set(EXERCISES)


@pytest.mark.parametrize("name,wrong", [(n, w) for n, ws in WRONG.items() for w in ws],
                         ids=[w.__name__ for ws in WRONG.values() for w in ws])
def test_a_wrong_answer_is_rejected(name, wrong):
    found = results(name, wrong)
    assert found and not all(ok for _, ok, _ in found), found
