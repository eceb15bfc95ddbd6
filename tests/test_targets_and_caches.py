"""Distillation targets in fp32 inside a bf16 step; DisBack's path recorded on the fake score's own
data; caches and resumed runs tied to everything that made them; checkpoints that cannot run code."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import with_teacher

import disback
import dmd
import guided_distill as gd
import progressive_distill as pd
from common import ddim_sample, diffuse, guided, trainable_copy
from plumbing.data import gaussians8
from plumbing.errors import UserError
from plumbing.folders import dmd_dir
from plumbing.training import save_checkpoint
from train_teacher import TeacherConfig, load_teacher

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def bf16():
    """amp forced on: CPU autocast to bf16, as a CUDA run's training step would be."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def teacher_of(folder) -> torch.nn.Module:
    config = TeacherConfig.from_preset("toy", out_dir=str(folder), device="cpu", iterations=1500)
    return load_teacher(config, CPU, train_if_missing=False)


def noisy_batch(n_steps: int, n: int = 2048, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, _ = gaussians8().sample(n, g)
    t = torch.randint(1, n_steps + 1, (n,), generator=g).float() / n_steps
    return diffuse(x, t, torch.randn(n, 2, generator=g)), t, torch.full((n,), 8)


# ----------------------------------------------------------------------------------------
# 1. Targets in fp32
# ----------------------------------------------------------------------------------------


def test_pd_target_at_4096_steps_is_fp32_inside_a_bf16_step(toy_teacher):
    teacher, n = teacher_of(toy_teacher), 4096
    z_t, t, labels = noisy_batch(n)
    target = pd.pd_target(teacher, z_t, t, labels, n)  # fp32: no autocast anywhere
    with torch.no_grad():
        signal = rms(target - teacher(z_t, t, labels))  # what the two half-steps add to one step
    with bf16():
        amp_target = pd.pd_target(teacher, z_t, t, labels, n)
        with torch.no_grad():
            rounded = pd.pd_target.__wrapped__(teacher, z_t, t, labels, n)  # the same math left to autocast
    assert signal > 1e-5, signal
    assert rms(rounded - target) > signal, "bf16 rounding should swamp the signal, or this test proves nothing"
    assert rms(amp_target - target) < 1e-3 * signal, (rms(amp_target - target), signal)
    assert amp_target.dtype == torch.float32


def test_guided_target_is_fp32_inside_a_bf16_step(toy_teacher):
    teacher = teacher_of(toy_teacher)
    z_t, t, _ = noisy_batch(64)
    labels = torch.arange(2048) % 8
    target = gd.guided_target(teacher, z_t, t, labels, 2.0)
    with bf16():
        amp_target = gd.guided_target(teacher, z_t, t, labels, 2.0)
        with torch.no_grad():
            rounded = gd.guided_target.__wrapped__(teacher, z_t, t, labels, 2.0)
    assert rms(rounded - target) > 1e-4
    assert rms(amp_target - target) < 1e-7


def test_dm_gradient_uses_fp32_scores_inside_a_bf16_step(toy_teacher):
    real = teacher_of(toy_teacher)
    fake = trainable_copy(real).requires_grad_(False)
    with torch.no_grad():  # a fake score a little off the real one: the gradient is a small difference
        for p in fake.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x0, t = torch.randn(1024, 2, generator=g) * 0.5, torch.rand(1024, generator=g) * 0.9 + 0.05
    eps, labels = torch.randn(1024, 2, generator=g), torch.full((1024,), 8)

    def grad_of_loss():
        x = x0.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(dmd.dmd_generator_loss(x, real, fake, labels, t=t, eps=eps), x)
        return grad * x.numel()

    exact = grad_of_loss()
    x_t = diffuse(x0, t, eps)
    with torch.no_grad():
        mu_real, signal = real(x_t, t, labels), rms(fake(x_t, t, labels) - real(x_t, t, labels))
        with bf16():  # the real score's own bf16 error, against the signal mu_fake - mu_real
            bf16_error = rms(real(x_t, t, labels) - mu_real)
    with bf16():
        amp = grad_of_loss()
    assert bf16_error > 0.1 * signal, (bf16_error, signal)
    assert rms(amp - exact) < 1e-5 * rms(exact), (rms(amp - exact), rms(exact))


def test_regression_pairs_are_fp32_under_autocast(tmp_path, toy_teacher):
    config = dmd_config(tmp_path, toy_teacher, reg_pairs=64, reg_steps=8)
    teacher = load_teacher(config, CPU, train_if_missing=False)
    with bf16():
        pairs = dmd.regression_pairs(teacher, config, CPU)
    assert torch.allclose(pairs["y"], ddim_sample(teacher, pairs["z"], 8, pairs["labels"]), atol=1e-6)


# ----------------------------------------------------------------------------------------
# 2. DisBack with K > 1 records on the fake score's own distribution
# ----------------------------------------------------------------------------------------


def test_generator_samples_are_backward_simulated():
    # The exact denoiser as a 4-step generator: its final samples lie on the modes (radius 1), but
    # the fake score sees the k-th step's output for k ~ U{0..3}; k = 0 is the data mean, the origin.
    mix = gaussians8()
    z, labels = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0)), torch.full((4000,), 8)
    torch.manual_seed(0)
    final = dmd.generate(mix.denoiser, z, labels, 4)
    seen, t_k = dmd.generator_samples(mix.denoiser, z, labels, 4)
    assert torch.equal(seen[t_k == 1.0], mix.denoiser(z[t_k == 1.0], 1.0, labels[t_k == 1.0]))  # k = 0: from z itself
    near_origin = (final.norm(dim=1) < 0.5).float().mean().item(), (seen.norm(dim=1) < 0.5).float().mean().item()
    assert near_origin[0] < 0.15 and near_origin[1] > 0.4, near_origin


def test_recording_and_the_fake_update_draw_from_one_function(tmp_path, toy_teacher, monkeypatch):
    calls = []

    def spy(module):
        real = module.generator_samples

        def recorded(generator, z, labels, steps):
            calls.append((module.__name__, steps))
            return real(generator, z, labels, steps)

        monkeypatch.setattr(module, "generator_samples", recorded)

    spy(disback)
    spy(dmd)
    config = disback_config(tmp_path, toy_teacher, steps=4, snapshots=2, record_iterations=6, dmd_iterations=2,
                            fake_updates=3, reg_weight=0.0, eval_every=2)
    disback.train_disback(config)
    # six recording updates, the path's diagnostic (disback.path_losses), then the fake score's updates
    assert calls == [("disback", 4)] * (6 + 1) + [("dmd", 4)] * (2 * 3), calls


# ----------------------------------------------------------------------------------------
# 3. Caches and resumed runs tied to what made them
# ----------------------------------------------------------------------------------------


def common_settings(folder, teacher_folder) -> dict:
    """Two DMD updates with the tests' teacher: everything fast."""
    return dict(out_dir=str(with_teacher(folder, teacher_folder)), device="cpu", iterations=1500, eval_samples=300,
                eval_steps=[1, 256], log_every=1, ckpt_every=2, dmd_iterations=2, eval_every=2, fake_updates=1,
                reg_pairs=64, reg_steps=8)


def dmd_config(folder, teacher_folder, **overrides):
    return dmd.DMDConfig.from_preset("toy", **{**common_settings(folder, teacher_folder), **overrides})


def disback_config(folder, teacher_folder, **overrides):
    return disback.DisBackConfig.from_preset("toy", **{**common_settings(folder, teacher_folder), "snapshots": 2,
                                                  "record_iterations": 4, "interval": 1, **overrides})


def retrain(folder) -> None:
    """Another teacher in the same place, at the same iteration count: its weights moved a little."""
    path = Path(folder) / "teacher.pt"
    state = torch.load(path, weights_only=True)
    for k, v in state["ema"]["model"].items():
        state["ema"]["model"][k] = v + 1e-3 * torch.randn_like(v)
    save_checkpoint(path, state)


def test_regression_pairs_follow_the_real_score_and_the_teacher(tmp_path, toy_teacher):
    config = dmd_config(tmp_path, toy_teacher, dmd_label_dropout=0.0)  # class labels: guidance matters
    teacher = load_teacher(config, CPU, train_if_missing=False)
    plain = dmd.regression_pairs(teacher, config, CPU)
    guided_pairs = dmd.regression_pairs(teacher, config.replace(real_guidance=2.0), CPU)
    expected = ddim_sample(guided(teacher, 2.0, teacher.null_label), guided_pairs["z"], 8, guided_pairs["labels"])
    assert torch.allclose(guided_pairs["y"], expected, atol=1e-6)
    assert rms(guided_pairs["y"] - plain["y"]) > 1e-3  # not the unguided teacher's pairs
    retrain(tmp_path)
    other = load_teacher(config, CPU, train_if_missing=False)
    assert other.fingerprint != teacher.fingerprint
    rebuilt = dmd.regression_pairs(other, config, CPU)
    assert torch.allclose(rebuilt["y"], ddim_sample(other, rebuilt["z"], 8, rebuilt["labels"]), atol=1e-6)
    assert rms(rebuilt["y"] - plain["y"]) > 0


@pytest.mark.parametrize("change", [{"real_guidance": 1.0}, {"dmd_label_dropout": 0.5}, {"reg_steps": 4},
                                    {"grad_clip": 0.5}, "teacher"])
def test_dmd_resume_refuses_a_changed_real_score(tmp_path, toy_teacher, change):
    config = dmd_config(tmp_path, toy_teacher, dmd_label_dropout=0.9, dmd_iterations=1)
    dmd.train_dmd(config)
    more = config.replace(dmd_iterations=2)
    if change == "teacher":
        retrain(tmp_path)
        with pytest.raises(UserError, match="made from another teacher"):
            dmd.train_dmd(more, resume=True)
    else:
        (key, value), = change.items()
        with pytest.raises(UserError, match=f"{key}="):
            dmd.train_dmd(more.replace(**change), resume=True)
    if change == {"reg_steps": 4}:  # the unchanged run continues
        assert dmd.train_dmd(more, resume=True)["final"]["step"] == 2


def test_reruns_are_refused_before_any_work_and_checkpoints_are_not_mistaken(tmp_path, toy_teacher, monkeypatch):
    config = dmd_config(tmp_path, toy_teacher)
    dmd.train_dmd(config)
    teacher_log = (tmp_path / "teacher" / "log.jsonl").read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the regression set was built before the rerun was refused")

    monkeypatch.setattr(dmd, "regression_pairs", must_not_run)
    with pytest.raises(UserError, match="pass --resume"):
        dmd.train_dmd(config)
    monkeypatch.undo()
    from train_teacher import train_teacher

    teacher_config = TeacherConfig.from_preset("toy", out_dir=str(tmp_path), device="cpu", iterations=1500)
    with pytest.raises(UserError, match="pass --resume"):  # a finished teacher, rerun without --resume
        train_teacher(teacher_config)
    assert (tmp_path / "teacher" / "log.jsonl").read_text() == teacher_log  # its log is kept
    dmd_checkpoint = dmd_dir(config) / "checkpoint.pt"
    before = dmd_checkpoint.read_bytes()
    with pytest.raises(UserError, match="is not a teacher checkpoint"):  # a DMD run is not a teacher to resume
        train_teacher(teacher_config.replace(teacher=str(dmd_checkpoint), iterations=3000), resume=True)
    assert dmd_checkpoint.read_bytes() == before
    with pytest.raises(UserError, match="unknown preset 'cifar'"):
        TeacherConfig.from_preset("cifar")


def test_disback_path_is_tied_to_its_teacher(tmp_path, toy_teacher):
    config = disback_config(tmp_path, toy_teacher)
    disback.train_disback(config)
    with pytest.raises(UserError, match="interval="):  # stage 2's schedule is part of the run too
        disback.train_disback(config.replace(interval=2, dmd_iterations=3), resume=True)
    retrain(tmp_path)
    with pytest.raises(UserError, match="DisBack path .* made from another teacher"):
        disback.train_disback(config.replace(dmd_iterations=3), resume=True)


# ----------------------------------------------------------------------------------------
# 4. Checkpoints hold tensors and plain values only
# ----------------------------------------------------------------------------------------


class CodePayload:
    """Unpickling this runs code: it creates the file `target`."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_a_checkpoint_carrying_code_is_refused_and_runs_nothing(tmp_path):
    marker, evil = tmp_path / "payload_ran", tmp_path / "teacher.pt"
    torch.save({"kind": "teacher", "step": 1, "model": CodePayload(marker)}, evil)
    torch.load(evil, weights_only=False)  # what an unsafe load would do
    assert marker.exists()
    marker.unlink()
    result = subprocess.run([sys.executable, str(ROOT / "progressive_distill.py"), "--preset", "toy",
                             "--out-dir", str(tmp_path), "--teacher", str(evil)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "not loaded" in lines[0], result.stderr
    assert not marker.exists()


def test_every_checkpoint_of_a_run_loads_weights_only(tmp_path, toy_teacher):
    config = disback_config(tmp_path, toy_teacher, record_iterations=4, snapshots=2, dmd_iterations=2)
    disback.train_disback(config)
    paths = list(Path(tmp_path).rglob("*.pt"))
    assert {"teacher.pt", "checkpoint.pt", "snapshot_01.pt"} <= {p.name for p in paths}
    assert any(p.name.startswith("regression_") for p in paths)
    for p in paths:
        state = torch.load(p, weights_only=True)
        assert isinstance(state, dict), p


def test_the_generator_and_teacher_are_timed_in_turns(tmp_path, toy_teacher, monkeypatch):
    # The speed-up is a ratio of two timings: taken in turns, in one call, so that a load that comes or goes
    # between them cannot make it more than the ratio of network calls (a cached teacher timing could).
    from plumbing import reports

    config = dmd_config(tmp_path, toy_teacher)
    teacher = load_teacher(config, CPU, train_if_missing=False)
    turns, real_ddim = [], reports.ddim_sample
    monkeypatch.setattr(reports, "ddim_sample", lambda m, z, n, c: turns.append("teacher") or real_ddim(m, z, n, c))
    speed = reports.sampling_speed(teacher, teacher, config, CPU, lambda *a: turns.append("generator") or a[1],
                                   repeats=3)
    assert turns == ["generator", "generator", "teacher", "teacher"] * 3  # a warm-up call, then the timed one
    assert speed["speedup"] > 0 and not list(tmp_path.rglob("speed_*"))  # nothing cached


def test_the_teachers_speed_is_scaled_from_a_few_steps(tmp_path, toy_teacher, monkeypatch):
    # DDIM costs one call per step: 8 timed steps, scaled to 64, land near a real 64-step measurement,
    # and only 8-step samplings are run.
    from plumbing import reports
    from plumbing.training import samples_per_second

    config = dmd_config(tmp_path, toy_teacher)
    teacher = load_teacher(config, CPU, train_if_missing=False)
    z, labels = torch.randn(2000, 2), torch.full((2000,), 8)
    steps_run, real_ddim = [], reports.ddim_sample
    monkeypatch.setattr(reports, "ddim_sample", lambda m, z, n, c: steps_run.append(n) or real_ddim(m, z, n, c))
    speed = reports.sampling_speed(teacher, teacher, config, CPU, lambda *a: a[1], teacher_steps=64)
    scaled = speed["teacher_ddim_64"]
    assert set(steps_run) == {8}
    real = samples_per_second(lambda: real_ddim(teacher, z, 64, labels), len(z), CPU, repeats=3)
    assert 0.5 < scaled / real < 2.0, (scaled, real)  # measured: within 10% on 2 cores
