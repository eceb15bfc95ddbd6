"""The coursework checker can pass and can fail: the reference code passes every check, the untouched
stubs fail every one with their message, plausible wrong answers and cheats to every exercise are
rejected by the check that names their mistake, a crash is reported as the student's with its line,
and the handout grades without the reference code. The exercise files are what `make.py` writes."""

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

import common
import dmd
from exercises import check, checks, closed_forms, make

EXERCISES = list(check.TOPIC_OF)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The checks are small: one thread is faster than two that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_exercise_files_are_what_make_writes():
    assert make.main(["--check"]) == 0, (
        "exercises/ differ from what `python exercises/make.py` writes from the reference code. If you have "
        "not edited them, run `python exercises/make.py`: it rewrites unedited files only and refuses edited "
        "ones; to keep your answers, copy them elsewhere first (`python exercises/check.py --from FOLDER` grades "
        "them there), then run `python exercises/make.py --force`.")


@pytest.mark.parametrize("topic", list(check.TOPICS))
def test_the_reference_passes_every_check(topic):
    for name, entry in check.grade([topic], reference=True).items():
        for r in entry["results"]:
            assert r.passed, f"{name}: {r.what} ({r.detail})"


def test_the_stubs_fail_every_check_with_their_message():
    report = check.grade(list(check.TOPICS))
    for name, entry in report.items():
        assert entry["checks"] == len(checks.CHECKS[name]) >= 3 and entry["score"] == 0
        assert all(r.status == "stub" and r.detail.startswith(f"not implemented yet: write {name} ")
                   for r in entry["results"]), entry
    assert check.summary(report)["out_of"] == 14


def test_json_and_exit_code(capsys):
    assert check.main(["disback", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["score"] == 0 and out["out_of"] == 1 and out["checks"] == len(checks.CHECKS["snapshot_index"])
    assert out["functions"]["snapshot_index"]["results"][0]["status"] == "stub"
    assert check.main(["disback", "--reference"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{out['checks']} of {out['checks']} checks passed")
    empty = Path(tempfile.mkdtemp())  # a folder without the exercise files: the wrong folder, not a failing student
    for argv in (["nosuchtopic"], ["--from"], ["--from", "no/such/folder"], ["--from", str(empty), "basics"],
                 ["--time-limit", "soon"], ["--time-limit", "0.001"], ["--time-limit", "inf"], ["--jsn"]):
        assert check.main(argv) == 2, argv  # a usage error: status 2, one line on stderr, nothing on stdout
        out, err = capsys.readouterr()
        assert not out and len(err.splitlines()) == 1 and err.startswith("error: "), (argv, out, err)
    assert check.main(["--help"]) == 0 and "python exercises/check.py --json" in capsys.readouterr().out


# Wrong answers, as small sources: {exercise: {label: (the check that must fail, source)}}. Every one is a
# mistake a student made, or a cheat; each must fail the check that names its mistake (numbered from 0 in
# the order of checks.CHECKS) and pass no more than half of its function's checks if it is a cheat.
PREAMBLE = """
import math
import torch
import common
import dmd
import torch.nn.functional as F
from common import _as_time, _coeffs, bcast, diffuse, diffusion_loss, logsnr, no_grad_fp32, guided
from dmd import DM_T_MIN, DM_T_MAX, NORMALISER_EPS, generator_times
"""

WRONG = {
    "alpha_sigma": {
        "sin_cos_swapped": (0, "def alpha_sigma(t):\n t = _as_time(t)\n return torch.sin(math.pi * t / 2), "
                               "torch.cos(math.pi * t / 2)"),
        "no_half": (0, "def alpha_sigma(t):\n t = _as_time(t)\n return torch.cos(math.pi * t).clamp(min=0), "
                       "torch.sin(math.pi * t)"),
        "unclamped": (2, "def alpha_sigma(t):\n t = _as_time(t)\n return torch.cos(math.pi * t / 2), "
                         "torch.sin(math.pi * t / 2)"),
        "floats_only": (0, "def alpha_sigma(t):\n return torch.tensor(max(math.cos(math.pi * t / 2), 0.0)), "
                           "torch.tensor(math.sin(math.pi * t / 2))"),
        "cheat_zeros": (0, "def alpha_sigma(t):\n t = _as_time(t)\n return torch.zeros_like(t), torch.zeros_like(t)"),
    },
    "ddim_step": {
        "times_swapped": (0, "def ddim_step(x_hat, z_t, t, s):\n return common.ddim_step(x_hat, z_t, s, t)"),
        "no_division_by_sigma_t": (0, """
def ddim_step(x_hat, z_t, t, s):
    (alpha_t, sigma_t), (alpha_s, sigma_s) = _coeffs(t, z_t), _coeffs(s, z_t)
    return alpha_s * x_hat + sigma_s * (z_t - alpha_t * x_hat)"""),
        "sigma_t_for_sigma_s": (0, """
def ddim_step(x_hat, z_t, t, s):
    (alpha_t, sigma_t), (alpha_s, sigma_s) = _coeffs(t, z_t), _coeffs(s, z_t)
    return alpha_s * x_hat + sigma_t * (z_t - alpha_t * x_hat) / sigma_t"""),
        "float_times_only": (2, """
def ddim_step(x_hat, z_t, t, s):
    a_t, s_t, a_s, s_s = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2), math.cos(math.pi * s / 2), \\
        math.sin(math.pi * s / 2)
    return a_s * x_hat + s_s * (z_t - a_t * x_hat) / s_t"""),
        "times_as_columns": (3, """
def ddim_step(x_hat, z_t, t, s):
    col = lambda v: torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1)
    (a_t, s_t), (a_s, s_s) = [(torch.cos(math.pi * col(v) / 2), torch.sin(math.pi * col(v) / 2)) for v in (t, s)]
    return a_s * x_hat + s_s * (z_t - a_t * x_hat) / s_t"""),
        "cheat_returns_z_t": (0, "def ddim_step(x_hat, z_t, t, s):\n return z_t"),
        "cheat_returns_x_hat": (0, "def ddim_step(x_hat, z_t, t, s):\n return x_hat"),
    },
    "invert_ddim": {
        "times_swapped": (0, "def invert_ddim(z_t, z_s, t, s):\n return common.invert_ddim(z_t, z_s, s, t)"),
        "float_times_only": (2, """
def invert_ddim(z_t, z_s, t, s):
    a_t, s_t, a_s, s_s = max(math.cos(math.pi * t / 2), 0), math.sin(math.pi * t / 2), math.cos(math.pi * s / 2), \\
        math.sin(math.pi * s / 2)
    return (z_s - s_s / s_t * z_t) / (a_s - s_s / s_t * a_t)"""),
        "sign_in_denominator": (0, """
def invert_ddim(z_t, z_s, t, s):
    (alpha_t, sigma_t), (alpha_s, sigma_s) = _coeffs(t, z_t), _coeffs(s, z_t)
    return (z_s - sigma_s / sigma_t * z_t) / (alpha_s + sigma_s / sigma_t * alpha_t)"""),
        "ratio_forgotten_on_z_t": (0, """
def invert_ddim(z_t, z_s, t, s):
    (alpha_t, sigma_t), (alpha_s, sigma_s) = _coeffs(t, z_t), _coeffs(s, z_t)
    return (z_s - z_t) / (alpha_s - sigma_s / sigma_t * alpha_t)"""),
        "cheat_returns_z_s": (0, "def invert_ddim(z_t, z_s, t, s):\n return z_s"),
    },
    "cfg": {
        "guidance_scale_convention": (0, """
def cfg(x_cond, x_uncond, w):
    w = bcast(_as_time(w, x_cond), x_cond)
    return w * x_cond - (w - 1.0) * x_uncond"""),
        "interpolation": (0, "def cfg(x_cond, x_uncond, w):\n return (1 - w) * x_cond + w * x_uncond"),
        "w_not_broadcast": (2, """
def cfg(x_cond, x_uncond, w):
    w = torch.as_tensor(w)
    return (1 + w) * x_cond - w * x_uncond"""),
        "w_as_a_column": (2, """
def cfg(x_cond, x_uncond, w):
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1, 1)
    return (1 + w) * x_cond - w * x_uncond"""),
        "cheat_returns_x_cond": (0, "def cfg(x_cond, x_uncond, w):\n return x_cond"),
    },
    "pd_target": {
        "primes_swapped": (3, """
def pd_target(teacher, z_t, t, labels, n_steps):
    t1, t2 = t - 1.0 / n_steps, t - 0.5 / n_steps
    z1 = common.ddim_step(teacher(z_t, t, labels), z_t, t, t1)
    z2 = common.ddim_step(teacher(z1, t1, labels), z1, t1, t2)
    return common.invert_ddim(z_t, z2, t, t2)"""),
        "one_teacher_step": (0, "def pd_target(teacher, z_t, t, labels, n_steps):\n return teacher(z_t, t, labels)"),
        "two_full_steps": (0, """
def pd_target(teacher, z_t, t, labels, n_steps):
    t1, t2 = t - 1.0 / n_steps, t - 2.0 / n_steps
    z1 = common.ddim_step(teacher(z_t, t, labels), z_t, t, t1)
    z2 = common.ddim_step(teacher(z1, t1, labels), z1, t1, t2)
    return common.invert_ddim(z_t, z2, t, t2)"""),
        "no_inversion": (0, """
def pd_target(teacher, z_t, t, labels, n_steps):
    t1, t2 = t - 0.5 / n_steps, t - 1.0 / n_steps
    z1 = common.ddim_step(teacher(z_t, t, labels), z_t, t, t1)
    return common.ddim_step(teacher(z1, t1, labels), z1, t1, t2)"""),
        "labels_dropped": (0, """
def pd_target(teacher, z_t, t, labels, n_steps):
    null = torch.full_like(labels, teacher.null_label)
    t1, t2 = t - 0.5 / n_steps, t - 1.0 / n_steps
    z1 = common.ddim_step(teacher(z_t, t, null), z_t, t, t1)
    z2 = common.ddim_step(teacher(z1, t1, null), z1, t1, t2)
    return common.invert_ddim(z_t, z2, t, t2)"""),
        "one_time_for_the_batch": (2, """
def pd_target(teacher, z_t, t, labels, n_steps):
    t0 = float(t[0]); t1, t2 = t0 - 0.5 / n_steps, t0 - 1.0 / n_steps
    z1 = common.ddim_step(teacher(z_t, t, labels), z_t, t0, t1)
    z2 = common.ddim_step(teacher(z1, torch.full_like(t, t1), labels), z1, t1, t2)
    return common.invert_ddim(z_t, z2, t0, t2)"""),
        "cheat_zeros": (0, "def pd_target(teacher, z_t, t, labels, n_steps):\n return torch.zeros_like(z_t)"),
    },
    "snr_weight": {
        "min_not_max": (0, """
def snr_weight(t, weighting):
    snr = torch.exp(logsnr(t))
    if weighting == "truncated-snr":
        return snr.clamp(max=1.0)
    if weighting == "snr+1":
        return snr + 1.0
    raise ValueError(weighting)"""),
        "not_truncated": (0, """
def snr_weight(t, weighting):
    snr = torch.exp(logsnr(t))
    if weighting == "truncated-snr":
        return snr
    if weighting == "snr+1":
        return snr + 1.0
    raise ValueError(weighting)"""),
        "sqrt_snr": (1, """
def snr_weight(t, weighting):
    snr = torch.exp(0.5 * logsnr(t))
    if weighting == "truncated-snr":
        return snr.clamp(min=1.0)
    if weighting == "snr+1":
        return snr + 1.0
    raise ValueError(weighting)"""),
        "unknown_is_snr_plus_one": (3, """
def snr_weight(t, weighting):
    snr = torch.exp(logsnr(t))
    return snr.clamp(min=1.0) if weighting == "truncated-snr" else snr + 1.0"""),
        "cheat_ones": (0, "def snr_weight(t, weighting):\n return torch.ones_like(t)"),
        "cheat_always_raises": (3, "def snr_weight(t, weighting):\n raise ValueError(weighting)"),
    },
    "guided_target": {
        "guidance_scale_convention": (0, """
def guided_target(teacher, z_t, t, labels, w):
    null = torch.full_like(labels, teacher.null_label)
    return w * teacher(z_t, t, labels) - (w - 1.0) * teacher(z_t, t, null)"""),
        "w_not_broadcast": (2, """
def guided_target(teacher, z_t, t, labels, w):
    null = torch.full_like(labels, teacher.null_label)
    return (1 + w) * teacher(z_t, t, labels) - w * teacher(z_t, t, null)"""),
        "null_label_zero": (0, "def guided_target(teacher, z_t, t, labels, w):\n"
                               " return guided(teacher, w, 0)(z_t, t, labels)"),
        "null_label_guessed": (0, "def guided_target(teacher, z_t, t, labels, w):\n"
                                  " return guided(teacher, w, 8)(z_t, t, labels)"),
        "cheat_conditional_only": (0, "def guided_target(teacher, z_t, t, labels, w):\n"
                                      " return teacher(z_t, t, labels)"),
    },
    "renoise": {
        "marginal_sigma_t": (0, """
def renoise(z_s, s, t, eps):
    (alpha_s, _), (alpha_t, sigma_t) = common.alpha_sigma(s), common.alpha_sigma(t)
    return alpha_t / alpha_s * z_s + sigma_t * eps"""),
        "ratio_inverted": (0, """
def renoise(z_s, s, t, eps):
    (alpha_s, sigma_s), (alpha_t, sigma_t) = common.alpha_sigma(s), common.alpha_sigma(t)
    ratio = alpha_s / alpha_t
    return ratio * z_s + (sigma_t**2 - ratio**2 * sigma_s**2).clamp(min=0).sqrt() * eps"""),
        "variance_for_std": (0, """
def renoise(z_s, s, t, eps):
    (alpha_s, sigma_s), (alpha_t, sigma_t) = common.alpha_sigma(s), common.alpha_sigma(t)
    ratio = alpha_t / alpha_s
    return ratio * z_s + (sigma_t**2 - ratio**2 * sigma_s**2) * eps"""),
        "ratio_forgotten_in_variance": (0, """
def renoise(z_s, s, t, eps):
    (alpha_s, sigma_s), (alpha_t, sigma_t) = common.alpha_sigma(s), common.alpha_sigma(t)
    return alpha_t / alpha_s * z_s + (sigma_t**2 - sigma_s**2).sqrt() * eps"""),
        "cheat_returns_z_s": (0, "def renoise(z_s, s, t, eps):\n return z_s"),
    },
    "fake_score_loss": {
        "not_detached": (3, "def fake_score_loss(fake_score, x, labels):\n"
                            " return diffusion_loss(fake_score, x, labels)"),
        "x_mse": (0, """
def fake_score_loss(fake_score, x, labels):
    x = x.detach()
    t = torch.rand(x.shape[0])
    z_t = diffuse(x, t, torch.randn_like(x))
    return (fake_score(z_t, t, labels) - x).pow(2).mean()"""),
        "null_labels": (2, "def fake_score_loss(fake_score, x, labels):\n"
                           " return diffusion_loss(fake_score, x.detach(),"
                           " torch.full_like(labels, fake_score.null_label))"),
        "loss_detached": (3, "def fake_score_loss(fake_score, x, labels):\n"
                             " return diffusion_loss(fake_score, x.detach(), labels).detach()"),
        "one_time": (1, "def fake_score_loss(fake_score, x, labels):\n"
                        " return diffusion_loss(fake_score, x.detach(), labels, t=torch.full((x.shape[0],), 0.5))"),
        "cheat_zero": (0, "def fake_score_loss(fake_score, x, labels):\n return torch.zeros(())"),
    },
    "snapshot_index": {
        "off_by_one": (0, "def snapshot_index(step, n_snapshots, interval):\n"
                          " return max(n_snapshots - step // interval, 0)"),
        "no_floor": (0, "def snapshot_index(step, n_snapshots, interval):\n return n_snapshots - 1 - step // interval"),
        "modulo": (0, "def snapshot_index(step, n_snapshots, interval):\n"
                      " return max(n_snapshots - 1 - step % interval, 0)"),
        "float_division": (0, "def snapshot_index(step, n_snapshots, interval):\n"
                              " return max(n_snapshots - 1 - step / interval, 0)"),
        "cheat_always_the_teacher": (0, "def snapshot_index(step, n_snapshots, interval):\n return 0"),
        "cheat_always_the_last": (0, "def snapshot_index(step, n_snapshots, interval):\n return n_snapshots - 1"),
        "a_bool": (1, "def snapshot_index(step, n_snapshots, interval):\n return step < interval * (n_snapshots - 1)"),
    },
}

# DMD's generator loss with its pieces as parameters: each wrong answer changes one.
DMD_LOSS = """
def dmd_generator_loss(x, real_score, fake_score, labels, t=None, eps=None):
    if t is None:
        t = DM_T_MIN + (T_MAX - DM_T_MIN) * torch.rand(x.shape[0])
    if eps is None:
        eps = NOISE(x)
    with GRAD():
        x_t = diffuse(x.detach(), t, eps)
        labels = LABELS(labels, real_score)
        mu_real, mu_fake = real_score(x_t, t, labels), fake_score(x_t, t, labels)
        normaliser = NORMALISER(x.detach(), mu_real, mu_fake)
        grad = SIGN * (mu_fake - mu_real) / normaliser
    return 0.5 * (x - (x - grad).detach()).pow(2).mean()
"""
DMD_PARTS = dict(T_MAX="DM_T_MAX", NOISE="torch.randn_like", GRAD="no_grad_fp32", LABELS="lambda c, score: c", SIGN="1",
                 NORMALISER="lambda x, r, f: (x - r).abs().flatten(1).mean(1).reshape(-1, *[1] * (x.dim() - 1))"
                            ".clamp(min=NORMALISER_EPS)")


def dmd_variant(**parts) -> str:
    source = DMD_LOSS
    for key, value in {**DMD_PARTS, **parts}.items():
        source = re.sub(rf"\b{key}\b", f"({value})", source)
    return source


WRONG["dmd_generator_loss"] = {
    "wrong_sign": (0, dmd_variant(SIGN="-1")),
    "no_normaliser": (0, dmd_variant(NORMALISER="lambda x, r, f: 1.0")),
    "uniform_eps": (5, dmd_variant(NOISE="torch.rand_like")),
    "zero_eps": (5, dmd_variant(NOISE="torch.zeros_like")),
    "t_up_to_half": (4, dmd_variant(T_MAX="0.5")),
    "labels_dropped": (0, dmd_variant(LABELS="lambda c, score: torch.full_like(c, 8)")),
    "normaliser_over_the_batch": (0, dmd_variant(NORMALISER="lambda x, r, f: (x - r).abs().mean()")),
    "normaliser_over_the_last_dim": (2, dmd_variant(NORMALISER="lambda x, r, f: (x - r).abs().mean(-1, keepdim=True)")),
    "normaliser_of_the_fake_score": (0, dmd_variant(NORMALISER="lambda x, r, f: (x - f).abs().mean(1, keepdim=True)")),
    "stop_gradient_forgotten": (0, dmd_variant(GRAD="torch.enable_grad").replace("(x - grad).detach()", "(x - grad)")),
    "cheat_zero_times_x": (0, "def dmd_generator_loss(x, real_score, fake_score, labels, t=None, eps=None):\n"
                              " return 0 * x.sum()"),
    "cheat_constant": (0, "def dmd_generator_loss(x, real_score, fake_score, labels, t=None, eps=None):\n"
                          " return torch.tensor(0.0)"),
}

# DMD2's K-step sampler with its re-noising as a parameter.
GENERATE = """
def generate(generator, z, labels, steps, first=None):
    times = generator_times(steps)
    z_t, drawn = z, torch.randn_like(z)
    for k, t in enumerate(times):
        if first is not None and k == FIRST:
            return z_t, t
        x = generator(z_t, torch.full((z.shape[0],), t), labels)
        if k + 1 < len(times):
            z_t = RENOISE
    return x
"""


def generate_variant(renoise="diffuse(x, times[k + 1], torch.randn_like(x))", first="first") -> str:
    return GENERATE.replace("RENOISE", renoise).replace("FIRST", first)


WRONG["generate"] = {
    "one_noise_for_every_step": (3, generate_variant("diffuse(x, times[k + 1], drawn)")),
    "initial_noise_reused": (3, generate_variant("diffuse(x, times[k + 1], z)")),
    "sigma_forgotten": (2, generate_variant("common.alpha_sigma(times[k + 1])[0] * x + torch.randn_like(x)")),
    "sigma_of_the_current_time": (2, generate_variant(
        "common.alpha_sigma(times[k + 1])[0] * x + common.alpha_sigma(t)[1] * torch.randn_like(x)")),
    "alpha_of_the_current_time": (2, generate_variant(
        "common.alpha_sigma(t)[0] * x + common.alpha_sigma(times[k + 1])[1] * torch.randn_like(x)")),
    "no_renoising": (2, generate_variant("x")),
    "stops_one_step_late": (4, generate_variant(first="first + 1")),
    "times_off_by_one": (0, generate_variant().replace("generator_times(steps)",
                                                       "[1.0 - (k + 1) / steps for k in range(steps)]")),
    "noise_divided_by_zero": (3, generate_variant("diffuse(x, times[k + 1], torch.randn_like(x) / 0)")),
    "t_k_a_batch_of_times": (4, generate_variant().replace("return z_t, t",
                                                           "return z_t, torch.full((z.shape[0],), t)")),
    "cheat_returns_z": (1, "def generate(generator, z, labels, steps, first=None):\n return z"),
}

# The wrong answers that crash (in the student's code, on (B,) times or w) rather than return a wrong number.
CRASHES = {"floats_only", "float_times_only", "w_not_broadcast", "w_as_a_column", "times_as_columns",
           "cheat_always_raises"}

# Correct answers written another way: each must pass every check.
WRONG["gan_classifier_loss"] = {
    "swapped_sides": (1, "def gan_classifier_loss(logits_real, logits_fake):\n"
                         " return F.softplus(logits_real).mean() + F.softplus(-logits_fake).mean()"),
    "half": (0, "def gan_classifier_loss(logits_real, logits_fake):\n"
                " return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())"),
    "weight_inside": (0, "def gan_classifier_loss(logits_real, logits_fake):\n"
                         " return 1e-2 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())"),
    "sum_not_mean": (0, "def gan_classifier_loss(logits_real, logits_fake):\n"
                        " return F.softplus(-logits_real).sum() + F.softplus(logits_fake).sum()"),
    "log_of_sigmoid": (2, "def gan_classifier_loss(logits_real, logits_fake):\n"
                          " return -(torch.sigmoid(logits_real).log().mean()"
                          " + (1 - torch.sigmoid(logits_fake)).log().mean())"),
    "cheat_zero": (0, "def gan_classifier_loss(logits_real, logits_fake):\n return (logits_real * 0).sum()"),
}
WRONG["gan_generator_loss"] = {
    "saturating": (0, "def gan_generator_loss(logits_fake):\n return -F.softplus(logits_fake).mean()"),
    "wrong_sign": (0, "def gan_generator_loss(logits_fake):\n return F.softplus(logits_fake).mean()"),
    "weight_inside": (0, "def gan_generator_loss(logits_fake):\n return 3e-3 * F.softplus(-logits_fake).mean()"),
    "log_of_sigmoid": (2, "def gan_generator_loss(logits_fake):\n return -torch.sigmoid(logits_fake).log().mean()"),
    "cheat_raw_logit": (0, "def gan_generator_loss(logits_fake):\n return -logits_fake.mean()"),
}

RIGHT = {
    "dmd_generator_loss": {"normaliser_plus_eps": dmd_variant(
        NORMALISER="lambda x, r, f: (x - r).abs().flatten(1).mean(1).reshape(-1, *[1] * (x.dim() - 1))"
                   " + NORMALISER_EPS")},
    "cfg": {"w_viewed_by_hand": """
def cfg(x_cond, x_uncond, w):
    w = torch.as_tensor(w, dtype=x_cond.dtype)
    w = w.view(-1, *[1] * (x_cond.dim() - 1)) if w.dim() else w
    return x_cond + w * (x_cond - x_uncond)"""},
    "invert_ddim": {"expanded": """
def invert_ddim(z_t, z_s, t, s):
    (alpha_t, sigma_t), (alpha_s, sigma_s) = _coeffs(t, z_t), _coeffs(s, z_t)
    return (sigma_t * z_s - sigma_s * z_t) / (alpha_s * sigma_t - sigma_s * alpha_t)"""},
    "gan_classifier_loss": {"bce": "def gan_classifier_loss(logits_real, logits_fake):\n"
                                   " bce = torch.nn.functional.binary_cross_entropy_with_logits\n"
                                   " return bce(logits_real, torch.ones_like(logits_real))"
                                   " + bce(logits_fake, torch.zeros_like(logits_fake))"},
    "gan_generator_loss": {"logsigmoid": "def gan_generator_loss(logits_fake):\n"
                                         " return -torch.nn.functional.logsigmoid(logits_fake).mean()"},
    "snapshot_index": {"by_hand": "def snapshot_index(step, n_snapshots, interval):\n"
                                  " j = n_snapshots - 1 - step // interval\n return j if j > 0 else 0"},
}


# The second trial's kinds of mistakes: right in isolation, wrong in use. Each must fail the check that names it.
WRONG["ddim_step"].update({
    "z_t_updated_in_place": (0, """
def ddim_step(x_hat, z_t, t, s):
    (alpha_t, sigma_t), (alpha_s, sigma_s) = _coeffs(t, z_t), _coeffs(s, z_t)
    eps_hat = z_t.sub_(alpha_t * x_hat).div_(sigma_t)
    return alpha_s * x_hat + sigma_s * eps_hat"""),
    "float64_result": (0, "def ddim_step(x_hat, z_t, t, s):\n return common.ddim_step(x_hat, z_t, t, s).double()"),
    "on_another_device": (0, "def ddim_step(x_hat, z_t, t, s):\n return common.ddim_step(x_hat, z_t, t, s).to('meta')"),
})
WRONG["invert_ddim"]["clamped_denominator"] = (4, """
def invert_ddim(z_t, z_s, t, s):
    (alpha_t, sigma_t), (alpha_s, sigma_s) = _coeffs(t, z_t), _coeffs(s, z_t)
    return (z_s - sigma_s / sigma_t * z_t) / (alpha_s - sigma_s / sigma_t * alpha_t).clamp(min=1e-2)""")
WRONG["pd_target"].update({
    "t_shifted_in_place": (0, """
def pd_target(teacher, z_t, t, labels, n_steps):
    x1 = teacher(z_t, t, labels)
    t1 = t.sub_(0.5 / n_steps).clone()
    z1 = common.ddim_step(x1, z_t, t1 + 0.5 / n_steps, t1)
    z2 = common.ddim_step(teacher(z1, t1, labels), z1, t1, t1 - 0.5 / n_steps)
    return common.invert_ddim(z_t, z2, t1 + 0.5 / n_steps, t1 - 0.5 / n_steps)"""),
    "alpha_as_a_column": (4, """
def pd_target(teacher, z_t, t, labels, n_steps):
    a, s = (lambda v: common.alpha_sigma(v)[0][:, None]), (lambda v: common.alpha_sigma(v)[1][:, None])
    t1, t2 = t - 0.5 / n_steps, t - 1.0 / n_steps
    x1 = teacher(z_t, t, labels)
    z1 = a(t1) * x1 + s(t1) * (z_t - a(t) * x1) / s(t)
    x2 = teacher(z1, t1, labels)
    z2 = a(t2) * x2 + s(t2) * (z1 - a(t1) * x2) / s(t1)
    r = s(t2) / s(t)
    return (z2 - r * z_t) / (a(t2) - r * a(t))"""),
    "clamped_denominator": (4, """
def pd_target(teacher, z_t, t, labels, n_steps):
    t1, t2 = t - 0.5 / n_steps, t - 1.0 / n_steps
    z1 = common.ddim_step(teacher(z_t, t, labels), z_t, t, t1)
    z2 = common.ddim_step(teacher(z1, t1, labels), z1, t1, t2)
    (a_t, s_t), (a_2, s_2) = _coeffs(t, z_t), _coeffs(t2, z_t)
    return (z2 - s_2 / s_t * z_t) / (a_2 - s_2 / s_t * a_t).clamp(min=1e-2)"""),
    "own_helper_without_sigma_t": (0, """
def ddim_step(x_hat, z_t, t, s):
    (alpha_t, sigma_t), (alpha_s, sigma_s) = _coeffs(t, z_t), _coeffs(s, z_t)
    return alpha_s * x_hat + sigma_s * (z_t - alpha_t * x_hat)

def pd_target(teacher, z_t, t, labels, n_steps):
    t1, t2 = t - 0.5 / n_steps, t - 1.0 / n_steps
    z1 = ddim_step(teacher(z_t, t, labels), z_t, t, t1)
    z2 = ddim_step(teacher(z1, t1, labels), z1, t1, t2)
    return common.invert_ddim(z_t, z2, t, t2)"""),
})
# The third trial's: right on every input the checks drew, wrong where training runs them; and cheats in process.
WRONG["pd_target"]["no_gradient_stop"] = (6, """
def pd_target(teacher, z_t, t, labels, n_steps):  # @no_grad_fp32() left out: the loss's gradient reaches the teacher
    t1, t2 = t - 0.5 / n_steps, t - 1.0 / n_steps
    z1 = common.ddim_step(teacher(z_t, t, labels), z_t, t, t1)
    z2 = common.ddim_step(teacher(z1, t1, labels), z1, t1, t2)
    return common.invert_ddim(z_t, z2, t, t2)""")
WRONG["snr_weight"]["logsnr_unclipped"] = (5, """
def snr_weight(t, weighting):
    alpha, sigma = common.alpha_sigma(t)
    snr = alpha**2 / sigma**2  # inf at t = 0, 4e9 at t = 1e-5
    if weighting == "truncated-snr":
        return torch.maximum(snr, torch.ones_like(snr))
    if weighting == "snr+1":
        return snr + 1
    raise ValueError(weighting)""")
WRONG["gan_generator_loss"]["softplus_by_hand_without_slope"] = (1, "def gan_generator_loss(logits_fake):\n"
                                                                    " l = logits_fake\n"
                                                                    " return (torch.relu(-l) + torch.log1p(torch.exp("
                                                                    "-l.abs()))).mean()")
WRONG["cfg"]["cheat_a_tensor_that_lies"] = (0, """
class Liar(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in ("sub", "__sub__", "__rsub__"):
            return torch.zeros_like(out).as_subclass(cls)
        return out.as_subclass(cls) if isinstance(out, torch.Tensor) and out.dtype.is_floating_point else out

def cfg(x_cond, x_uncond, w):
    return torch.zeros_like(x_cond).as_subclass(Liar)""")
WRONG["ddim_step"]["cheat_replaces_torch_randn"] = (0, """
def ddim_step(x_hat, z_t, t, s):
    torch.randn = lambda *shape, **kwargs: torch.zeros(*shape)  # the checker's inputs, all zeros
    return x_hat""")
WRONG["guided_target"]["w_viewed_as_a_column"] = (3, """
def guided_target(teacher, z_t, t, labels, w):
    w = w.view(-1, 1) if torch.is_tensor(w) else w
    null = torch.full_like(labels, teacher.null_label)
    return (1 + w) * teacher(z_t, t, labels) - w * teacher(z_t, t, null)""")
WRONG["renoise"]["z_s_scaled_in_place"] = (0, """
def renoise(z_s, s, t, eps):
    (alpha_s, sigma_s), (alpha_t, sigma_t) = common.alpha_sigma(s), common.alpha_sigma(t)
    ratio = alpha_t / alpha_s
    return z_s.mul_(ratio) + (sigma_t**2 - ratio**2 * sigma_s**2).clamp(min=0).sqrt() * eps""")
WRONG["dmd_generator_loss"].update({
    "eps_per_sample_broadcast": (7, dmd_variant(NOISE="lambda x: torch.randn(x.shape[0], *[1] * (x.dim() - 1))"
                                                     ".expand_as(x)")),
    "eps_of_shape_B_2": (7, dmd_variant(NOISE="lambda x: torch.randn(x.shape[0], 2)")),
    "seeded_generator": (7, dmd_variant(NOISE="lambda x: torch.randn(x.shape, generator=torch.Generator()"
                                              ".manual_seed(0))")),
    "manual_seed_inside": (7, dmd_variant().replace("    if t is None:", "    torch.manual_seed(0)\n    if t is None:",
                                                    1)),
    "scores_with_gradient": (6, dmd_variant(GRAD="torch.enable_grad").replace("(x - grad).detach()",
                                                                              "(x.detach() - grad)")),
})
WRONG["fake_score_loss"].update({
    "seeded_t_and_eps": (4, """
def fake_score_loss(fake_score, x, labels):
    g = torch.Generator().manual_seed(0)
    return diffusion_loss(fake_score, x.detach(), labels, t=torch.rand(x.shape[0], generator=g),
                          eps=torch.randn(x.shape, generator=g))"""),
    "eps_per_sample_broadcast": (4, "def fake_score_loss(fake_score, x, labels):\n"
                                    " eps = torch.randn(x.shape[0], 1).expand_as(x)\n"
                                    " return diffusion_loss(fake_score, x.detach(), labels, eps=eps)"),
    "eps_of_shape_B_2": (5, "def fake_score_loss(fake_score, x, labels):\n"
                            " return diffusion_loss(fake_score, x.detach(), labels, eps=torch.randn(x.shape[0], 2))"),
})
WRONG["generate"].update({
    "no_torch_no_grad": (6, generate_variant()),
    "seeded_renoising": (5, "@torch.no_grad()" + generate_variant(
        "diffuse(x, times[k + 1], torch.randn(x.shape, generator=torch.Generator().manual_seed(k)))")),
    "noise_of_shape_B_2": (5, "@torch.no_grad()" + generate_variant("diffuse(x, times[k + 1], "
                                                                      "torch.randn(x.shape[0], 2))")),
    "noise_per_sample_broadcast": (5, "@torch.no_grad()" + generate_variant(
        "diffuse(x, times[k + 1], torch.randn(x.shape[0], *[1] * (x.dim() - 1)).expand_as(x))")),
})
WRONG["gan_classifier_loss"]["logits_negated_in_place"] = (0, "def gan_classifier_loss(logits_real, logits_fake):\n"
                                                              " return F.softplus(logits_real.neg_()).mean()"
                                                              " + F.softplus(logits_fake).mean()")
WRONG["snapshot_index"]["no_snapshots_is_an_index_error"] = (3, "def snapshot_index(step, n_snapshots, interval):\n"
                                                                " order = list(range(n_snapshots - 1, -1, -1))\n"
                                                                " return order[min(step // interval, n_snapshots - 1)]")
CRASHES |= {"alpha_as_a_column", "w_viewed_as_a_column", "eps_of_shape_B_2", "noise_of_shape_B_2",
            "no_snapshots_is_an_index_error"}

RIGHT["alpha_sigma"] = {"sigma_from_alpha": "def alpha_sigma(t):\n t = _as_time(t)\n"
                                            " alpha = torch.cos(math.pi * t / 2).clamp(min=0)\n"
                                            " return alpha, torch.sqrt(1 - alpha**2)"}
RIGHT["dmd_generator_loss"]["discrete_times"] = dmd_variant().replace(
    "DM_T_MIN + ((DM_T_MAX) - DM_T_MIN) * torch.rand(x.shape[0])", "torch.randint(20, 981, (x.shape[0],)) / 1000")
RIGHT["ddim_step"] = {"coefficients": """
def ddim_step(x_hat, z_t, t, s):
    (alpha_t, sigma_t), (alpha_s, sigma_s) = _coeffs(t, z_t), _coeffs(s, z_t)
    return (alpha_s - sigma_s * alpha_t / sigma_t) * x_hat + (sigma_s / sigma_t) * z_t"""}
RIGHT["pd_target"] = {"own_helpers": """
def step(x, z, t, s):
    (a_t, s_t), (a_s, s_s) = _coeffs(t, z), _coeffs(s, z)
    return a_s * x + s_s * (z - a_t * x) / s_t

def pd_target(teacher, z_t, t, labels, n_steps):
    t1, t2 = t - 0.5 / n_steps, t - 1.0 / n_steps
    with torch.no_grad():
        z1 = step(teacher(z_t, t, labels), z_t, t, t1)
        z2 = step(teacher(z1, t1, labels), z1, t1, t2)
    (a_t, s_t), (a_2, s_2) = _coeffs(t, z_t), _coeffs(t2, z_t)
    return (s_t * z2 - s_2 * z_t) / (s_t * a_2 - s_2 * a_t)"""}
RIGHT["guided_target"] = {"w_shaped_by_hand": """
def guided_target(teacher, z_t, t, labels, w):
    w = torch.as_tensor(w, dtype=z_t.dtype)
    w = w.reshape(-1, *[1] * (z_t.dim() - 1)) if w.dim() else w
    return (1 + w) * teacher(z_t, t, labels) - w * teacher(z_t, t, torch.full_like(labels, teacher.null_label))"""}
RIGHT["renoise"] = {"from_logsnr": """
def renoise(z_s, s, t, eps):
    (alpha_s, _), (alpha_t, sigma_t) = common.alpha_sigma(s), common.alpha_sigma(t)
    return alpha_t / alpha_s * z_s + ((1 - torch.exp(logsnr(t) - logsnr(s))) * sigma_t**2).sqrt() * eps"""}
RIGHT["fake_score_loss"] = {"v_by_hand": """
def fake_score_loss(fake_score, x, labels):
    x = x.detach()
    t, eps = torch.rand(x.shape[0]), torch.randn_like(x)
    alpha, sigma = _coeffs(t, x)
    return (fake_score.predict_v(diffuse(x, t, eps), t, labels) - (alpha * eps - sigma * x)).pow(2).mean()"""}
RIGHT["generate"] = {"under_no_grad": "@torch.no_grad()" + generate_variant()}


def function_from(name: str, label: str, source: str):
    namespace = {}
    exec(compile(PREAMBLE + textwrap.dedent(source), f"<{name}: {label}>", "exec"), namespace)
    return namespace[name]


def test_every_exercise_has_three_wrong_answers_and_a_cheat():
    assert set(WRONG) == set(EXERCISES)
    for wrong in WRONG.values():
        assert len([w for w in wrong if not w.startswith("cheat")]) >= 3 and any(w.startswith("cheat") for w in wrong)


@pytest.mark.parametrize("name,label", [(n, w) for n, ws in WRONG.items() for w in ws],
                         ids=[f"{n}-{w}" for n, ws in WRONG.items() for w in ws])
def test_a_wrong_answer_fails_the_check_that_names_its_mistake(name, label):
    index, source = WRONG[name][label]
    results = check.run(name, function_from(name, label, source))
    assert len(results) == len(checks.CHECKS[name]) and not any(r.status in ("error", "stub") for r in results), results
    assert not results[index].passed, f"check {index} ({results[index].what}) passed: {results}"
    assert results[index].status == ("crash" if label in CRASHES else "fail"), results[index]
    if label.startswith("cheat"):
        assert sum(r.passed for r in results) <= len(results) // 2, results


@pytest.mark.parametrize("name,label", [(n, w) for n, ws in RIGHT.items() for w in ws])
def test_a_correct_answer_written_another_way_passes(name, label):
    results = check.run(name, function_from(name, label, RIGHT[name][label]))
    assert all(r.passed for r in results), results


def test_a_crash_is_the_students_with_its_line_and_the_other_checks_still_run(tmp_path):
    stub = make.render("basics")
    crash = stub.replace('raise NotImplementedError("not implemented yet: write ddim_step', "if torch.is_tensor(t):\n"
                         "        return x_hat[99999]\n    return x_hat\n    raise NotImplementedError(\"")
    (tmp_path / "basics.py").write_text(crash)
    line = crash.splitlines().index("        return x_hat[99999]") + 1
    report = check.grade(["basics"], folder=tmp_path)
    results = report["ddim_step"]["results"]
    crashes = [r for r in results if r.status == "crash"]
    assert len(results) == len(checks.CHECKS["ddim_step"]) and len(crashes) >= 2 and results[1].passed  # s = 0
    # passes, the (B,) times crash
    assert all(f"IndexError: index 99999 is out of bounds for dimension 0 with size 512 at basics.py line {line}: "
               "return x_hat[99999]" in r.detail or f"line {line}: return x_hat[99999]" in r.detail
               for r in crashes), crashes
    assert report["alpha_sigma"]["results"][0].status == "stub"  # the other functions are still graded


def test_a_crash_in_a_stand_in_is_shown_at_the_students_line_not_the_checkers():
    source = ("def pd_target(teacher, z_t, t, labels, n_steps):\n"
              " return teacher(z_t, t[:, None], labels)")  # t as a column: the exact teacher cannot take it
    results = check.run("pd_target", function_from("pd_target", "column", source))
    assert results[0].status == "crash" and "closed_forms.py" not in results[0].detail, results[0]
    assert re.search(r"RuntimeError: .* at <pd_target: column> line \d+", results[0].detail), results[0]


def test_a_function_missing_from_a_file_fails_alone(tmp_path):
    stub = make.render("basics")
    (tmp_path / "basics.py").write_text(stub.replace("def cfg(", "def cfg_renamed("))
    report = check.grade(["basics"], folder=tmp_path)
    assert all(r.status == "crash" and "basics.py has no function cfg" in r.detail for r in report["cfg"]["results"])
    assert all(r.status == "stub" for r in report["ddim_step"]["results"])  # the others are still graded


def test_the_reference_is_graded_also_with_the_repository_on_pythonpath():
    """Run as a script, exercises/ is on the path first: its dmd.py and disback.py must not shadow the reference."""
    env = {**os.environ, "PYTHONPATH": str(check.HERE.parent)}
    out = subprocess.run([sys.executable, str(check.HERE / "check.py"), "dmd", "disback", "--reference"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_one_step_generate_and_a_loss_without_scores_are_failures_not_checker_errors():
    results = check.run("generate", function_from("generate", "one", "def generate(generator, z, labels, steps, "
                                                  "first=None):\n return generator(z, torch.ones(len(z)), labels)"))
    assert not any(r.status == "error" for r in results) and not results[4].passed
    results = check.run("dmd_generator_loss", function_from("dmd_generator_loss", "zero", WRONG[
        "dmd_generator_loss"]["cheat_zero_times_x"][1]))
    assert "the real score was never called" in results[4].detail


def test_make_refuses_to_overwrite_an_edited_exercise(tmp_path, monkeypatch):
    monkeypatch.setattr(make, "HERE", tmp_path)
    monkeypatch.setattr(make, "ROOT", tmp_path.parent)
    assert make.main([]) == 0  # writes every file into the empty folder
    path = tmp_path / "disback.py"
    assert make.unedited(path.read_text())
    edited = path.read_text().replace("raise NotImplementedError(", "return 0  # mine\n    raise NotImplementedError(")
    path.write_text(edited)
    assert make.main([]) == 2 and path.read_text() == edited
    assert make.main(["--force"]) == 0 and path.read_text() == make.render("disback")


def test_the_handout_holds_no_answers_and_grades_without_the_reference(tmp_path):
    stubs, answers = tmp_path / "stubs", tmp_path / "answers"
    make.handout(stubs)
    make.handout(answers)
    for topic in check.TOPICS:
        (answers / "exercises" / f"{topic}.py").write_text(make.render(topic, handout=True, answers=True))
    files = sorted(p for p in stubs.rglob("*") if p.is_file())
    assert {p.name for p in files} == {"README.md", *make.CHECKER, "toolkit.py", *(f"{t}.py" for t in check.TOPICS)}
    flat = {p: " ".join(p.read_text().split()) for p in files}
    for name in EXERCISES:
        body = " ".join(make.solution(name).split())
        assert len(body) > 10 and not any(body in text for text in flat.values()), name
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = ("import json, subprocess, sys\n"
              "for folder in sys.argv[1:]:\n"
              "    r = subprocess.run([sys.executable, 'exercises/check.py', '--json'], cwd=folder,\n"
              "                       capture_output=True, text=True)\n"
              "    print(json.dumps([r.returncode, r.stdout, r.stderr]))\n")
    out = subprocess.run([sys.executable, "-c", script, str(stubs), str(answers)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    (rc_stubs, stub_out, stub_err), (rc_answers, answer_out, answer_err) = map(json.loads, out.stdout.splitlines())
    assert rc_stubs == 1 and "Traceback" not in stub_err, stub_err
    graded = json.loads(stub_out)
    assert graded["score"] == 0 and graded["out_of"] == 14 and graded["checker_errors"] == 0
    assert rc_answers == 0, answer_out + answer_err
    assert json.loads(answer_out)["checks_passed"] == json.loads(answer_out)["checks"] == graded["checks"]


def test_the_checker_needs_none_of_the_reference_code():
    for name in make.CHECKER:  # torch, the standard library and each other, nothing else
        source = (check.HERE / name).read_text()
        imports = re.findall(r"^\s*(?:from|import) ([\w.]+)", source, re.M)
        assert all(m.split(".")[0] in ("__future__", "torch", *sys.stdlib_module_names) or
                   m in ("exercises.checks", "exercises.closed_forms") for m in imports), (name, imports)
    top = (check.HERE / "check.py").read_text().split("\ndef ")[0]
    assert "\nimport torch" not in top  # the parent process, which starts the topics' processes, needs no torch
    assert torch.equal(closed_forms.by_hand_ddim_step(torch.ones(3, 2), torch.ones(3, 2), 0.5, 0.0), torch.ones(3, 2))
    assert common and dmd  # the wrong answers' namespace imports them


# ----------------------------------------------------------------------------------------
# The checker cannot be ended, hung, fooled or crashed by the code it grades
# ----------------------------------------------------------------------------------------

TRICKS = {  # appended to the reference answers of each topic: the last definition of a name wins
    "basics": 'def alpha_sigma(t):\n    print("hello from alpha_sigma")\n    sys.exit(0)\n',
    "progressive": "def pd_target(teacher, z_t, t, labels, n_steps):\n    while True:\n        pass\n",
    "guided": ('print("guided.py loaded")\ntry:\n    import exercises.checks as table\n    table.CHECKS.clear()\n'
               "except ImportError:\n    pass\n"
               'if sys.modules.get("exercises.checks") is not None:\n'
               '    sys.modules["exercises.checks"].CHECKS.clear()\n'
               "def renoise(z_s, s, t, eps):  # the closed form, from the checker's frames\n"
               "    frame = sys._getframe(1)\n"
               "    while 'BY_HAND' not in frame.f_globals:\n"
               "        frame = frame.f_back\n"
               "    return frame.f_globals['by_hand_renoise'](z_s, s, t, eps)\n"),
    "dmd": ("from dmd import generate  # noqa: F401 - the reference's\n"
            "def gan_generator_loss(logits_fake):  # right, and writes into the report\n"
            "    import os\n"
            "    try:\n"
            "        for pid in (os.getppid(), os.getpid()):\n"
            "            with open(f'/proc/{pid}/fd/1', 'w') as out:\n"
            "                out.write('not JSON')\n"
            "    except OSError:\n"
            "        pass\n"
            "    return torch.nn.functional.softplus(-logits_fake).mean()\n"),
    "disback": "def snapshot_index(step, n_snapshots, interval):\n    import os\n    os._exit(0)\n",
}


def test_exits_endless_loops_prints_and_tricks_are_graded_as_failures_with_a_nonzero_exit_code(tmp_path):
    for topic, trick in TRICKS.items():
        (tmp_path / f"{topic}.py").write_text(make.render(topic, answers=True) + "\n\n" + trick)
    out = subprocess.run([sys.executable, str(check.HERE / "check.py"), "--from", str(tmp_path), "--json",
                          "--time-limit", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(out.stdout)  # the prints of the student's code are not in it
    functions = report["functions"]

    def statuses(name):
        return [r["status"] for r in functions[name]["results"]]

    assert "hello from alpha_sigma" in report["printed"]["basics"] and "guided.py loaded" in report["printed"]["guided"]
    assert set(statuses("alpha_sigma")) == {"crash"}
    assert "SystemExit" in functions["alpha_sigma"]["results"][0]["detail"]
    assert statuses("pd_target") == ["timeout"] * len(checks.CHECKS["pd_target"])  # stopped, the rest not run
    assert "stopped after 3 s" in functions["pd_target"]["results"][0]["detail"]
    assert set(statuses("generate")) == {"crash"}
    assert "not available while it is graded" in functions["generate"]["results"][0]["detail"]
    assert set(statuses("snapshot_index")) == {"crash"}
    assert "the process ended" in functions["snapshot_index"]["results"][0]["detail"]
    assert set(statuses("renoise")) == {"crash"} and "sys._getframe is not available" in functions["renoise"][
        "results"][0]["detail"]
    assert "/fd/1 cannot be opened" in functions["gan_generator_loss"]["results"][0]["detail"]
    for name in ("ddim_step", "snr_weight", "guided_target", "dmd_generator_loss", "gan_classifier_loss"):
        assert functions[name]["passed"] == functions[name]["checks"] == len(checks.CHECKS[name]), functions[name]
    assert report["checker_errors"] == 0 and report["checks"] == sum(len(c) for c in checks.CHECKS.values())


def test_the_students_own_helpers_are_theirs_and_the_reference_answers_out_of_reach(tmp_path):
    (tmp_path / "progressive.py").write_text(make.render("progressive") + """

def ddim_step(x_hat, z_t, t, s):  # the student's own, without the division by sigma_t
    (alpha_t, sigma_t), (alpha_s, sigma_s) = _coeffs(t, z_t), _coeffs(s, z_t)
    return alpha_s * x_hat + sigma_s * (z_t - alpha_t * x_hat)


def pd_target(teacher, z_t, t, labels, n_steps):
    t1, t2 = t - 0.5 / n_steps, t - 1.0 / n_steps
    z1 = ddim_step(teacher(z_t, t, labels), z_t, t, t1)
    return invert_ddim(z_t, ddim_step(teacher(z1, t1, labels), z1, t1, t2), t, t2)


def snr_weight(t, weighting):
    import progressive_distill
    return progressive_distill.snr_weight(t, weighting)


from common import _coeffs  # noqa: E402
try:
    from exercises.checks import CHECKS
    CHECKS.clear()
except ImportError:
    pass
""")
    before = {name: list(c) for name, c in checks.CHECKS.items()}
    reference = common.ddim_step, common.alpha_sigma
    report = check.grade(["progressive"], folder=tmp_path)
    assert not report["pd_target"]["results"][0].passed  # their ddim_step ran, not the checker's closed form
    assert all(r.status == "crash" and "not available" in r.detail for r in report["snr_weight"]["results"])
    assert checks.CHECKS == before and sys.modules["exercises.checks"] is checks  # the table was out of reach
    assert (common.ddim_step, common.alpha_sigma) == reference  # and everything is put back


def test_make_never_hands_out_over_answers_nor_into_the_repository(tmp_path, capsys):
    assert make.main(["--handout", str(tmp_path)]) == 0
    stub = tmp_path / "exercises" / "disback.py"
    answered = stub.read_text() + "\n# my answers\n"
    stub.write_text(answered)
    capsys.readouterr()
    assert make.main(["--handout", str(tmp_path)]) == 2 and stub.read_text() == answered
    assert "exercises/disback.py" in capsys.readouterr().err
    assert make.main(["--handout", str(tmp_path), "--force"]) == 0 and stub.read_text() != answered
    capsys.readouterr()
    for inside in (make.ROOT, make.HERE, make.HERE / "handout", make.ROOT / "runs" / "handout"):
        with pytest.raises(make.Refused, match="inside the repository"):
            make.handout(inside, force=True)
    assert make.main(["--handuot", str(tmp_path)]) == 2  # a mistyped flag does nothing but say so
    out, err = capsys.readouterr()
    assert not out and err.startswith("error: unknown argument '--handuot'") and len(err.splitlines()) == 1
