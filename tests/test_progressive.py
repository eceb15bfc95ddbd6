"""Progressive distillation (Alg. 2): the target's identity with a perfect teacher, the loss,
a short ladder with an exact mid-round resume, and clear errors."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import die_on_call, log_records, with_teacher

import progressive_distill as pd
from common import Denoiser, MLPDenoiserNet, ddim_sample, ddim_step, diffuse
from plumbing.data import gaussians8
from plumbing.errors import UserError
from plumbing.training import save_checkpoint
from train_teacher import TeacherConfig, load_teacher

ROOT = Path(__file__).resolve().parent.parent
N = 8


def two_teacher_steps(teacher, z_t, t, labels, n):
    z_mid = ddim_step(teacher(z_t, t, labels), z_t, t, t - 0.5 / n)
    return ddim_step(teacher(z_mid, t - 0.5 / n, labels), z_mid, t - 0.5 / n, t - 1.0 / n)


@pytest.mark.parametrize("i", [N, N - 1, N // 2, 1])  # i = N: alpha_t = 0; i = 1: t'' = 0
def test_target_makes_one_student_step_land_on_two_teacher_steps(i):
    teacher = gaussians8().denoiser  # exact E[x | z_t, c]: a perfect teacher
    g = torch.Generator().manual_seed(i)
    labels = torch.randint(9, (256,), generator=g)  # classes and the null label
    t = torch.full((256,), i / N)
    z_t = diffuse(gaussians8().sample(256, g)[0], t, torch.randn(256, 2, generator=g))
    x_tilde = pd.pd_target(teacher, z_t, t, labels, N)
    assert torch.isfinite(x_tilde).all()
    z_two = two_teacher_steps(teacher, z_t, t, labels, N)
    assert torch.allclose(ddim_step(x_tilde, z_t, t, t - 1.0 / N), z_two, atol=1e-5)
    if i == 1:  # the last interval: the target is the teacher's second x_hat, z_0
        assert torch.allclose(x_tilde, z_two, atol=1e-6)


def test_student_equal_to_the_two_step_map_has_zero_loss_and_a_copy_does_not():
    teacher = gaussians8().denoiser
    x, labels = gaussians8().sample(512, torch.Generator().manual_seed(0))

    def two_step_student(z_t, t, c):
        return pd.pd_target(teacher, z_t, t, c, N)

    torch.manual_seed(0)
    assert pd.pd_loss(two_step_student, teacher, x, labels, N).item() < 1e-10
    torch.manual_seed(0)
    assert pd.pd_loss(teacher, teacher, x, labels, N).item() > 1e-3  # one step of the teacher is not two


def test_training_reduces_the_loss_of_a_teacher_copy(tmp_path):
    torch.manual_seed(0)
    teacher = Denoiser(MLPDenoiserNet(8, hidden=64, depth=2))
    # a teacher that means something: briefly fit the exact denoiser
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    mix = gaussians8()
    for _ in range(300):
        x, c = mix.sample(256)
        t = torch.rand(256)
        z = diffuse(x, t, torch.randn_like(x))
        loss = (teacher(z, t, c) - mix.denoiser(z, t, c)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.zero_grad(set_to_none=True)
    teacher = pd.frozen(teacher)
    student = pd.new_student(teacher)
    x, c = mix.sample(1024, torch.Generator().manual_seed(1))

    def held_out_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return pd.pd_loss(student, teacher, x, c, 4).item()

    before = held_out_loss()
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(300):
        xb, cb = mix.sample(256)
        loss = pd.pd_loss(student, teacher, xb, cb, 4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before > 0 and held_out_loss() < 0.5 * before
    assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen


def test_weightings():
    t = torch.tensor([0.05, 0.5, 0.9])
    snr = (torch.cos(torch.pi * t / 2) / torch.sin(torch.pi * t / 2)) ** 2
    assert torch.allclose(pd.snr_weight(t, "snr+1"), snr + 1, rtol=1e-4)
    assert torch.allclose(pd.snr_weight(t, "truncated-snr"), snr.clamp(min=1), rtol=1e-4)
    assert pd.snr_weight(torch.ones(1), "truncated-snr").item() == 1.0


def ladder_config(folder, teacher_folder, **overrides):
    folder = with_teacher(folder, teacher_folder)
    return pd.PDConfig.from_preset("toy", **{
        "out_dir": str(folder), "device": "cpu", "iterations": 1500, "eval_samples": 500, "eval_steps": [1, 2, 4, 8],
        "start_steps": 8, "to_steps": 1, "round_iterations": 60, "ckpt_every": 20, "log_every": 30, **overrides})


def test_short_ladder_with_mid_round_resume(tmp_path, toy_teacher, monkeypatch):
    whole = ladder_config(tmp_path / "whole", toy_teacher, log_every=5)
    metrics = pd.progressive_distillation(whole)
    out = tmp_path / "whole" / "pd"
    for n in (4, 2, 1):
        assert (out / f"student_{n}.pt").is_file() and (out / f"student_{n}" / f"samples_{n}.npz").is_file()
    assert set(metrics["students"]) == {"4", "2", "1"} and (out / "quality_vs_steps.png").is_file()
    assert not (out / "progress.pt").exists()
    # PD's point, even after 60 updates per round: 1 student step beats 1 teacher step by far
    assert metrics["students"]["1"]["mmd"] < 0.5 * metrics["teacher_ddim"]["ddim"]["1"]["mmd"]
    # the first round's student, N = 4 steps, follows its teacher's 8 steps far better than the teacher's own 4 do
    teacher = load_teacher(whole, torch.device("cpu"), train_if_missing=False)
    student = pd.load_student(out / "student_4.pt", whole, "cpu")
    z, null = torch.randn(500, 2, generator=torch.Generator().manual_seed(5)), torch.full((500,), 8)
    x8 = ddim_sample(teacher, z, 8, null)
    student_gap = (ddim_sample(student, z, 4, null) - x8).pow(2).mean()
    teacher_gap = (ddim_sample(teacher, z, 4, null) - x8).pow(2).mean()
    assert student_gap < 0.05 * teacher_gap, (student_gap, teacher_gap)  # measured 0.003x; a 2N-grid bug: 0.2x

    # Interrupt the second round (4 -> 2) at update 47: the checkpoint at 40 survives, the log line at 45 is
    # written again by the resumed run and must not appear twice.
    part = ladder_config(tmp_path / "part", toy_teacher, log_every=5)
    die_on_call(monkeypatch, pd, "pd_loss", 60 + 47)
    with pytest.raises(KeyboardInterrupt):
        pd.progressive_distillation(part)
    monkeypatch.undo()
    assert torch.load(tmp_path / "part" / "pd" / "progress.pt", weights_only=False)["step"] == 40
    with pytest.raises(UserError, match="pass --resume"):
        pd.progressive_distillation(part)
    with pytest.raises(UserError, match="pd_batch_size=256 \\(now 128\\)"):  # one run's round, not two
        pd.progressive_distillation(part.replace(pd_batch_size=128), resume=True)
    torch.manual_seed(7)  # the resumed run must not depend on the process's RNG
    pd.progressive_distillation(part, resume=True)
    for n in (4, 2, 1):
        a = torch.load(out / f"student_{n}.pt", weights_only=False)["model"]
        b = torch.load(tmp_path / "part" / "pd" / f"student_{n}.pt", weights_only=False)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), n
    assert log_records(tmp_path / "part" / "pd") == log_records(out)  # every line once, and the same numbers
    # a run killed between a student's checkpoint and its evaluation: --resume evaluates it
    metrics_path = tmp_path / "part" / "pd" / "metrics.json"
    saved = json.loads(metrics_path.read_text())
    del saved["students"]["2"]
    metrics_path.write_text(json.dumps(saved))
    restored = pd.progressive_distillation(part, resume=True)["students"]["2"]
    assert restored.pop("round_time_s") > 0 and restored.pop("eval_time_s") >= 0
    timings = ("round_time_s", "eval_time_s")
    assert restored == {k: v for k, v in metrics["students"]["2"].items() if k not in timings}

    # killed in the first round, before its first checkpoint: the resumed run starts the log afresh
    early = ladder_config(tmp_path / "early", toy_teacher, log_every=5)
    die_on_call(monkeypatch, pd, "pd_loss", 7)
    with pytest.raises(KeyboardInterrupt):
        pd.progressive_distillation(early)
    monkeypatch.undo()
    pd.progressive_distillation(early, resume=True)
    assert log_records(tmp_path / "early" / "pd") == log_records(out)


def test_the_probe_runs_off_the_training_clock(tmp_path, monkeypatch):
    # PD's probe (N student and 2N teacher steps at every log line; 8192 teacher steps once per round on cifar10)
    # is a diagnostic: made slow here (0.5 s a call, 4 calls), it must not show in the round's training time.
    fields = dict(out_dir=str(tmp_path), device="cpu", iterations=5, eval_steps=[1], eval_samples=100)
    load_teacher(TeacherConfig.from_preset("toy", **fields), torch.device("cpu"))  # trains a 5-update teacher
    real, probing = pd.probe_gap, []

    def slow_probe(*args):
        start = time.perf_counter()
        time.sleep(0.5)
        gap = real(*args)
        probing.append(time.perf_counter() - start)
        return gap

    monkeypatch.setattr(pd, "probe_gap", slow_probe)
    config = pd.PDConfig.from_preset("toy", **fields, start_steps=2, to_steps=1, round_iterations=4, log_every=1)
    start = time.perf_counter()
    student = pd.progressive_distillation(config)["students"]["1"]
    elapsed = time.perf_counter() - start
    assert len(probing) == 4 and len([r for r in log_records(tmp_path / "pd") if "student_vs_teacher_mse" in r]) == 4
    # the round's time and the probes' add up to no more than the whole run: the probes are not in the round's
    assert student["round_time_s"] + sum(probing) <= elapsed + 0.05, (student["round_time_s"], sum(probing), elapsed)


def test_students_sample_with_and_without_labels(tmp_path, toy_teacher):
    config = ladder_config(tmp_path, toy_teacher, start_steps=4, to_steps=2, pd_label_dropout=0.5)
    pd.progressive_distillation(config)
    student = pd.load_student(tmp_path / "pd" / "student_2.pt", config, "cpu")
    z = torch.randn(400, 2, generator=torch.Generator().manual_seed(0))
    for label in (0, 3, 8):
        x = ddim_sample(student, z, 2, torch.full((400,), label))
        assert torch.isfinite(x).all()
        if label < 8:  # a class label pulls the samples towards its own centre
            centre = gaussians8().means[label]
            assert (x - centre).norm(dim=1).median() < (x - gaussians8().means[(label + 4) % 8]).norm(dim=1).median()


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "progressive_distill.py"), "--preset", "toy", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["--to-steps", "3"], "--to-steps must be a power of two"),
    (["--to-steps", "128"], "must be below the teacher's 64 steps"),
    (["--start-steps", "48"], "--start-steps must be a power of two"),
    (["--weighting", "snr"], "unknown --weighting 'snr'"),
])
def test_bad_steps_give_one_line(args, message, tmp_path):
    result = run_cli(*args, "--out-dir", str(tmp_path), cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_teacher_from_another_preset_gives_one_line(tmp_path):
    fmnist = TeacherConfig.from_preset("fmnist", out_dir=str(tmp_path))
    save_checkpoint(tmp_path / "teacher.pt", {"kind": "teacher", "config": fmnist, "step": 10**9,
                                              "ema": {"model": {}}})
    result = run_cli("--out-dir", str(tmp_path), cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "does not match this run: data='fmnist' (now 'gaussians8')" in lines[0]


@pytest.mark.slow
def test_image_path_end_to_end(tmp_path):
    # The UNet path, teacher and ladder, on a tiny fake CIFAR-10 in torchvision's layout.
    from test_data import write_fake_cifar

    write_fake_cifar(tmp_path / "data", n_per_batch=8)
    config = pd.PDConfig.from_preset("cifar10", out_dir=str(tmp_path), device="cpu", data_dir=str(tmp_path / "data"),
                                channels=16, ch_mult=[1, 2], num_res_blocks=1, batch_size=4, iterations=4,
                                eval_samples=4, eval_steps=[2], sample_every=2, log_every=2, ckpt_every=2,
                                fd_max_steps=0, start_steps=4, to_steps=1, round_iterations=3, pd_batch_size=4)
    metrics = pd.progressive_distillation(config)
    assert set(metrics["students"]) == {"2", "1"}
    assert (tmp_path / "teacher" / "samples_2.png").is_file() and (tmp_path / "teacher" / "during").is_dir()
    assert (tmp_path / "pd" / "student_1" / "samples_1.png").is_file()
    student = pd.load_student(tmp_path / "pd" / "student_1.pt", config, "cpu")
    x = ddim_sample(student, torch.randn(2, 3, 32, 32), 1, torch.tensor([3, 10]))
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
