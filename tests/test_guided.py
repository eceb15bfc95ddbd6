"""Guided distillation: the guided target by hand, the student's start, stage two's target with a
closed-form guided teacher, the stochastic sampler's noise, a short run of both stages with an
exact resume, and clear errors."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import die_on_call, log_records, with_teacher

import guided_distill as gd
from common import Denoiser, MLPDenoiserNet, alpha_sigma, cfg, ddim_sample, ddim_step, diffuse, guided, logsnr
from plumbing.data import gaussians8
from plumbing.errors import UserError
from plumbing.folders import guided_dir
from plumbing.training import save_checkpoint, write_json
from progressive_distill import pd_target
from train_teacher import TeacherConfig, load_teacher

ROOT = Path(__file__).resolve().parent.parent
MIX = gaussians8()
NULL = MIX.num_classes


class ExactTeacher:
    """The exact mixture denoiser behind the Denoiser protocol (a perfect, unguided teacher)."""

    null_label = NULL

    def __call__(self, z_t, t, labels, w=None):
        return MIX.denoiser(z_t, t, labels)


TEACHER = ExactTeacher()


def exact_guided(z_t, t, labels, w):
    """x_hat^w of the exact mixture denoiser: a perfect guided teacher, (z, t, c, w) like a student."""
    return cfg(MIX.denoiser(z_t, t, labels), MIX.denoiser(z_t, t, torch.full_like(labels, NULL)), w)


def noisy_batch(n, t_value, seed):
    g = torch.Generator().manual_seed(seed)
    x, labels = MIX.sample(n, g)
    t = torch.full((n,), t_value)
    return diffuse(x, t, torch.randn(n, 2, generator=g)), t, labels


def test_guided_target_is_the_cfg_formula_and_w_zero_is_the_conditional_model():
    z_t, t, labels = noisy_batch(512, 0.6, 0)
    cond, uncond = MIX.denoiser(z_t, t, labels), MIX.denoiser(z_t, t, torch.full_like(labels, NULL))
    w = torch.rand(512, generator=torch.Generator().manual_seed(1)) * 4
    by_hand = (1 + w[:, None]) * cond - w[:, None] * uncond
    assert torch.allclose(gd.guided_target(TEACHER, z_t, t, labels, w), by_hand, atol=1e-6)
    assert torch.allclose(gd.guided_target(TEACHER, z_t, t, labels, 0.0), cond, atol=1e-7)
    assert (cond - uncond).abs().max() > 0.1  # so the two checks above can tell w apart


def test_stage_one_student_starts_as_the_teacher_for_every_w():
    torch.manual_seed(0)
    teacher = Denoiser(MLPDenoiserNet(8, hidden=64, depth=2)).eval().requires_grad_(False)
    student = gd.new_w_student(teacher)
    z_t, t, labels = noisy_batch(256, 0.5, 2)
    for w in (0.0, 0.5, 4.0, torch.linspace(0, 4, 256)):
        assert torch.equal(student(z_t, t, labels, w), teacher(z_t, t, labels))
    # ... and the new w input is live: the loss has a gradient on the w embedding, so training can use w
    loss = gd.guided_loss(student, teacher, MIX.sample(256, torch.Generator().manual_seed(3))[0], labels,
                          torch.linspace(0, 4, 256))
    loss.backward()
    assert loss.item() > 0 and student.net.cond.guidance[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pass w"):
        student(z_t, t, labels)  # a w-conditioned student refuses to guess w


def test_guided_loss_is_zero_for_the_guided_teacher_itself():
    x, labels = MIX.sample(512, torch.Generator().manual_seed(4))
    w = torch.rand(512) * 4
    assert gd.guided_loss(exact_guided, TEACHER, x, labels, w).item() < 1e-10
    assert gd.guided_loss(TEACHER, TEACHER, x, labels, w).item() > 1e-3  # the unguided teacher is not it


@pytest.mark.parametrize("i", [8, 5, 1])  # i = N: alpha_t = 0; i = 1: t'' = 0
def test_stage_two_target_makes_one_step_match_two_guided_teacher_steps(i):
    n_steps = 8
    z_t, t, labels = noisy_batch(512, i / n_steps, i)
    w = torch.rand(512, generator=torch.Generator().manual_seed(i)) * 4
    teacher = gd.at_w(exact_guided, w)
    t1, t2 = t - 0.5 / n_steps, t - 1.0 / n_steps
    z_mid = ddim_step(teacher(z_t, t, labels), z_t, t, t1)  # the guided teacher's two half-steps, by hand
    z_two = ddim_step(teacher(z_mid, t1, labels), z_mid, t1, t2)
    x_tilde = pd_target(teacher, z_t, t, labels, n_steps)
    assert torch.allclose(ddim_step(x_tilde, z_t, t, t2), z_two, atol=1e-5)


def test_stage_two_loss_passes_the_same_w_to_teacher_and_student():
    config = gd.GuidedConfig.from_preset("toy")  # w in [0, 4], truncated-SNR weighting, every label kept
    x, labels = MIX.sample(512, torch.Generator().manual_seed(5))

    def ideal(z_t, t, c, w):  # the student that is exactly the guided teacher's two-step map at its w
        return pd_target(gd.at_w(exact_guided, w), z_t, t, c, 4)

    torch.manual_seed(0)
    per_example, _ = gd.stage_two_loss(config)(ideal, exact_guided, x, labels, 4)
    assert per_example.max().item() < 1e-8
    torch.manual_seed(0)  # the same map told the wrong w is penalised
    wrong, _ = gd.stage_two_loss(config)(lambda z, t, c, w: ideal(z, t, c, 4.0 - w), exact_guided, x, labels, 4)
    assert wrong.mean().item() > 1e-3


@pytest.mark.parametrize("s,t", [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.2, 0.9)])
def test_renoise_has_the_variance_of_q_zt_given_zs(s, t):
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x = MIX.sample(n, g)[0]
    z_s = diffuse(x, s, torch.randn(n, 2, generator=g))
    z_t = gd.renoise(z_s, s, t, torch.randn(n, 2, generator=g))
    alpha_s, _ = alpha_sigma(s)
    alpha_t, sigma_t = alpha_sigma(t)
    # Var(z_t | z_s) = (1 - exp(lambda_t - lambda_s)) sigma_t^2, written with the schedule's logSNR
    expected = (1 - torch.exp(logsnr(t) - logsnr(s))) * sigma_t**2
    residual = z_t - (alpha_t / alpha_s) * z_s
    assert abs(residual.var().item() / expected.item() - 1) < 0.01
    assert residual.mean().abs().item() < 0.01
    # ... so z_t given x is q(z_t | x): the chain x -> z_s -> z_t lands on the forward marginal
    assert abs((z_t - alpha_t * x).var().item() / sigma_t.item() ** 2 - 1) < 0.01


def test_stochastic_sampler_costs_one_call_per_step_and_ends_deterministically():
    calls = []

    def denoiser(z, t, c):
        calls.append(t[0].item())
        return MIX.denoiser(z, t, c)

    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(64) % 8
    for steps in (1, 2, 4):
        calls.clear()
        a, traj = gd.stochastic_sample(denoiser, z, steps, labels, torch.Generator().manual_seed(1), True)
        assert calls == [i / steps for i in range(steps, 0, -1)]  # one call per step, on the N-step grid
        b = gd.stochastic_sample(MIX.denoiser, z, steps, labels, torch.Generator().manual_seed(2))
        if steps == 1:  # a one-step sampler has no noise to add: it is DDIM
            assert torch.equal(a, b) and torch.equal(a, ddim_sample(MIX.denoiser, z, 1, labels))
        else:
            assert not torch.allclose(a, b)  # fresh noise between steps
            # the last step 1/N -> 0 adds none: z_0 is the denoiser's x_hat at z_{1/N}
            assert torch.equal(traj[-1], MIX.denoiser(traj[-2], torch.full((64,), 1 / steps), labels))


def guided_config(folder, teacher_folder, **overrides):
    folder = with_teacher(folder, teacher_folder)
    return gd.GuidedConfig.from_preset("toy", **{
        "out_dir": str(folder), "device": "cpu", "iterations": 1500, "eval_samples": 300,
        "eval_steps": [1, 2, 4, 8, 256], "stage1_iterations": 40, "start_steps": 4, "to_steps": 1,
        "round_iterations": 30, "eval_ws": [0.0, 2.0], "ckpt_every": 10, "log_every": 5, **overrides})


def test_both_stages_with_resume_in_each(tmp_path, toy_teacher, monkeypatch):
    whole = guided_config(tmp_path / "whole", toy_teacher)
    metrics = gd.guided_distillation(whole)
    out = guided_dir(whole)
    for name in ("stage1.pt", "student_2.pt", "student_1.pt", "quality_vs_steps.png", "student_1/samples.png"):
        assert (out / name).is_file(), name
    assert set(metrics["students"]) == {"2", "1"} and set(metrics["students"]["1"]["stochastic"]) == {"0", "2"}
    assert set(metrics["teacher"]["2"]) == {"4", "2", "1"}  # the guided teacher at the students' step counts
    # stage one, 40 updates: at w = 2 its DDIM follows the guided teacher's (on shared noise) far better than
    # the unguided teacher it started from does
    teacher = load_teacher(whole, torch.device("cpu"), train_if_missing=False)
    stage1 = gd.load_student(out / "stage1.pt", whole, "cpu", w_embedding=True)
    z, c = torch.randn(500, 2, generator=torch.Generator().manual_seed(5)), torch.arange(500) % 8
    x_guided = ddim_sample(guided(teacher, 2.0, NULL), z, 16, c)
    student_gap = (ddim_sample(gd.at_w(stage1, 2.0), z, 16, c) - x_guided).pow(2).mean()
    start_gap = (ddim_sample(teacher, z, 16, c) - x_guided).pow(2).mean()
    assert student_gap < 0.2 * start_gap, (student_gap, start_gap)

    def killed_at(n_calls, fn):
        part = guided_config(tmp_path / f"part{n_calls}", toy_teacher)
        die_on_call(monkeypatch, gd, fn, n_calls)
        with pytest.raises(KeyboardInterrupt):
            gd.guided_distillation(part)
        monkeypatch.undo()
        if n_calls > 10:  # past the first checkpoint: a plain rerun is refused
            with pytest.raises(UserError, match="pass --resume"):
                gd.guided_distillation(part)
        if n_calls == 27:  # a stage-one checkpoint made with other settings is refused
            with pytest.raises(UserError, match="stage1_lr"):
                gd.guided_distillation(part.replace(stage1_lr=1e-4), resume=True)
        torch.manual_seed(11)  # the resumed run must not depend on the process's RNG
        return gd.guided_distillation(part, resume=True), guided_dir(part)

    # mid stage one; mid round 2 (4 -> 2 -> 1); each after a log line that follows the last checkpoint
    # (and once before stage one's first checkpoint)
    for n_calls, fn in ((7, "guided_loss"), (27, "guided_loss"), (30 + 17, "pd_loss")):
        resumed, part_out = killed_at(n_calls, fn)
        for name in ("stage1.pt", "student_2.pt", "student_1.pt"):
            a = torch.load(out / name, weights_only=False)["model"]
            b = torch.load(part_out / name, weights_only=False)["model"]
            assert all(torch.equal(a[k], b[k]) for k in a), (fn, name)
        assert resumed["students"]["1"]["ddim"] == metrics["students"]["1"]["ddim"]
        assert log_records(part_out) == log_records(out), fn  # no line repeated


def test_a_resumed_evaluator_reads_the_runs_metrics_once(tmp_path, monkeypatch):
    from plumbing import reports

    write_json(tmp_path / "metrics.json", {"teacher": {"2": {"4": {"mmd": 0.1}}}, "eval_time_s": 12.5})
    reads, real = [], reports.read_json
    monkeypatch.setattr(reports, "read_json", lambda path: reads.append(path) or real(path))
    config = gd.GuidedConfig.from_preset("toy", out_dir=str(tmp_path), eval_samples=16)
    evaluator = reports.GuidedEvaluator(TEACHER, config, "cpu", tmp_path, gd.sample, resume=True)
    assert reads == [tmp_path / "metrics.json"]
    assert evaluator.teacher_rows == {"2": {"4": {"mmd": 0.1}}} and evaluator.watch.seconds == 12.5


def test_sampling_a_saved_student_at_any_trained_w(tmp_path, toy_teacher):
    config = guided_config(tmp_path, toy_teacher, stage1_iterations=20, start_steps=2, round_iterations=10,
                           eval_ws=[1.0])
    gd.guided_distillation(config)
    for sampler in gd.SAMPLERS:
        assert gd.sample_command(config.replace(w=3.3, sample_steps=1, sampler=sampler)).is_file()
    with pytest.raises(UserError, match=r"--w 5 is outside the trained range \[0, 4\]"):
        gd.sample_command(config.replace(w=5.0, sample_steps=1))
    with pytest.raises(UserError, match="no 8-step student"):
        gd.sample_command(config.replace(sample_steps=8))


def test_single_w_baseline_trains_one_w_in_its_own_folder(tmp_path, toy_teacher):
    config = guided_config(tmp_path, toy_teacher, single_w=2.0, stage1_iterations=20, start_steps=2,
                           round_iterations=10)
    metrics = gd.guided_distillation(config)
    assert guided_dir(config).name == "guided_single_w2" and metrics["w_min"] == metrics["w_max"] == 2.0
    assert set(metrics["students"]["1"]["ddim"]) == {"2"}  # only the distilled w is measured


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "guided_distill.py"), "--preset", "toy", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["--w-min", "3", "--w-max", "1"], "--w-min 3.0 is above --w-max 1.0"),
    (["--w-min", "-1"], "guidance weights must be >= 0"),
    (["--single-w", "-2"], "guidance weights must be >= 0"),
    (["--sampler", "ancestral"], "unknown --sampler 'ancestral'"),
    (["--to-steps", "3"], "--to-steps must be a power of two"),
])
def test_bad_input_is_refused_before_any_work(args, message, tmp_path):
    with pytest.raises(UserError, match=re.escape(message)):
        gd.main(["--preset", "toy", *args, "--out-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_bad_input_gives_one_line(tmp_path):
    result = run_cli("--w-min", "3", "--w-max", "1", "--out-dir", str(tmp_path), cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --w-min 3.0"), result.stderr


def test_teacher_without_label_dropout_gives_one_line(tmp_path):
    no_null = TeacherConfig.from_preset("toy", out_dir=str(tmp_path), label_dropout=0.0)
    save_checkpoint(tmp_path / "teacher.pt", {"kind": "teacher", "config": no_null, "step": 10**9,
                                              "ema": {"model": {}}})
    result = run_cli("--out-dir", str(tmp_path), cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "has no null class" in lines[0] and "--label-dropout 0.1" in lines[0]
