"""Guided distillation: fold classifier-free guidance into a w-conditioned student, then halve its steps.

Paper: Meng et al. 2023, "On Distillation of Guided Diffusion Models" (arXiv 2210.03142),
pixel-space version. Formulas: docs/methods.md section 2. Convention: guidance weight w,
x_hat^w = (1 + w) x_hat(z_t, c) - w x_hat(z_t, null), so w = 0 is the conditional model
(diffusers' guidance_scale is 1 + w).

Algorithm:
    stage one   student x_hat_eta1(z_t, c, w) <- copy of the teacher plus a w embedding whose
                output layer starts at zero (so at first it is the teacher, for every w)
                for `stage1_iterations` updates:
                    x, c ~ data;  t ~ U[0, 1];  w ~ U[w_min, w_max];  z_t = alpha_t x + sigma_t eps
                    loss = w(lambda_t) || x_hat_eta1(z_t, c, w) - x_hat^w_teacher(z_t, c) ||^2
    stage two   progressive distillation (progressive_distill.py, Alg. 2) of x_hat_eta1 from
                `start_steps` down to `to_steps`, each example with its own w ~ U[w_min, w_max]
                passed to both teacher and student; every round saved as student_<N>.pt

Sampling (`--sample --w W --sampler ddim|stochastic`): deterministic N-step DDIM, or the paper's
N-step stochastic sampler: from t, a DDIM step of twice the length to t - 2/N, then fresh noise
forward to t - 1/N with q(z_{t-1/N} | z_{t-2/N}); the last step (1/N -> 0) is deterministic.
Both cost one network call per step; the guided teacher costs two.

`--single-w W` distils one fixed w instead of the range: the paper's "single-w" baseline.

Deliberate differences from the paper:
- Both stages reuse progressive distillation's target, loss and round loop unchanged (w is
  bound to the networks with `at_w`); stage one's lr is annealed linearly like a PD round.
- On toy data (gaussians8, one class per mode) the ladder starts at 64 steps, as in PD's toy preset.
- The metric is computed against the guided teacher's own 256-step DDIM samples at the same w
  (guidance changes the target distribution), with that sampler's floor.

    python guided_distill.py --preset toy                       # both stages, w in [0, 4], 64 -> 1 steps
    python guided_distill.py --preset toy --single-w 2          # the single-w baseline
    python guided_distill.py --preset toy --sample --w 2 --sample-steps 4 --sampler stochastic
    python guided_distill.py --preset toy --resume
"""

from __future__ import annotations

import plumbing.interrupt  # noqa: F401  (first: Ctrl-C while torch loads is one line)
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

from common import (Denoiser, alpha_sigma, ddim_sample, ddim_step, diffuse, drop_labels, guided, no_grad_fp32,
                    trainable_copy)
from plumbing.config import parse_config, sample_shape
from plumbing.errors import UserError, require
from plumbing.folders import guided_dir
from plumbing.loop import Ladder
from plumbing.metrics import balanced_labels
from plumbing.pretrained import is_pretrained
from plumbing.reports import GuidedEvaluator, plot_guided_quality, print_guided_round
from plumbing.training import LogWriter, pick_device, run_cli, save_image_grid, save_scatter, seed_everything
from progressive_distill import (ROUND_KEYS, PDConfig, load_student, pd_loss, probe_gap, probe_noise, snr_weight,
                                 train_round, train_student)
from train_teacher import load_teacher, require_null_label

SAMPLERS = ("ddim", "stochastic")


@dataclass
class GuidedConfig(PDConfig):
    """Guided distillation: stage one, then PD's rounds (pixel-space defaults, docs/methods.md 2.4)"""

    start_steps: int = 1024           # stage two's first N: the low end of PD's range 1024 to 8192
    pd_label_dropout: float = 0.0     # guidance needs a class: every example keeps its label
    stage1_iterations: int = 50_000   # stage one: updates of the w-conditioned student
    stage1_lr: float = 5e-5           # stage one: Adam learning rate, annealed linearly to 0 (PD's rate)
    w_min: float = 0.0                # smallest guidance weight w learned (w = 0: the conditional model; paper: 0)
    w_max: float = 4.0                # largest guidance weight w learned (paper, pixel space: 4)
    single_w: float | None = None     # distil only this w (the paper's single-w baseline) instead of [w_min, w_max]
    eval_ws: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0])  # w measured after every round
    w: float = 2.0                    # with --sample: the guidance weight to sample at (within the trained range)
    sampler: str = "ddim"             # with --sample: ddim (deterministic) or stochastic (the paper's sampler)
    sample_steps: int = 4             # with --sample: the student's steps (one of the saved rounds)

    PRESETS: ClassVar[dict] = {
        # Toy: batch 256 with 2500 updates per halving matches batch 512 with 1500, in less time.
        "toy": dict(start_steps=64, round_iterations=2500, pd_label_dropout=0.0, stage1_iterations=3000,
                    stage1_lr=1e-3),
        # 2 CPU cores. 400 stage-one updates at 2e-4 learned an average over w (w = 0 sampled like the teacher
        # at w = 1); 1000 at 1e-3 separate them. Stage two from 16 steps left w = 0 at 2.3x the teacher's
        # 64-step FD (a 4-step student copies a 16-step sampler, FD 1.06 at w = 0); from 64, as PD, 1.5x.
        "fmnist16": dict(start_steps=64, to_steps=4, stage1_iterations=1000, stage1_lr=1e-3),
        "fmnist": dict(stage1_iterations=10_000, stage1_lr=1e-4),
    }
    RESUMABLE: ClassVar[tuple] = ("eval_ws", "w", "sampler", "sample_steps")

    def check(self) -> None:
        super().check()
        check_config(self)  # below the algorithm


# What a resumed stage one must share with its checkpoint: guided distillation's own fields but the
# sampling options, the batch, the weighting, the seed and the clip. Its rounds add PD's ROUND_KEYS.
STAGE1_KEYS = (*GuidedConfig.run_keys(PDConfig), "pd_batch_size", "weighting", "grad_clip")


# ==== Stage one: one network call that reproduces the guided teacher's two ============================================


def at_w(model, w):
    """The denoiser protocol (z_t, t, labels) -> x_hat with the guidance weight w (float or (B,)) bound."""
    return lambda z_t, t, labels: model(z_t, t, labels, w)


def sample_w(n: int, config: GuidedConfig, device) -> torch.Tensor:
    """w ~ U[w_min, w_max], one per example (B,)."""
    return config.w_min + (config.w_max - config.w_min) * torch.rand(n, device=device)


@no_grad_fp32()  # the guided teacher in fp32, also inside a bf16 step
def guided_target(teacher: Denoiser, z_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, w) -> torch.Tensor:
    """x_hat^w_teacher(z_t, c) = (1 + w) x_hat(z_t, c) - w x_hat(z_t, null): two teacher calls."""
    ### BEGIN SOLUTION
    return guided(teacher, w, teacher.null_label)(z_t, t, labels)
    ### END SOLUTION


def guided_loss(student: Denoiser, teacher: Denoiser, x: torch.Tensor, labels: torch.Tensor, w: torch.Tensor,
                weighting: str = "truncated-snr", t: torch.Tensor | None = None, reduce: bool = True):
    """Stage one: w(lambda_t) || x_hat_eta1(z_t, c, w) - x_hat^w_teacher(z_t, c) ||^2, t ~ U[0, 1].

    With `reduce=False` returns the per-example losses (B,) and t (B,).
    """
    if t is None:
        t = torch.rand(x.shape[0], device=x.device)
    z_t = diffuse(x, t, torch.randn_like(x))  # z_t = alpha_t x + sigma_t eps
    x_target = guided_target(teacher, z_t, t, labels, w)  # no gradient flows into the target
    x_hat = student(z_t, t, labels, w)
    per_example = snr_weight(t, weighting) * (x_hat - x_target).pow(2).flatten(1).mean(1)  # (B,)
    return per_example.mean() if reduce else (per_example, t)


def new_w_student(teacher: Denoiser) -> Denoiser:
    """x_hat_eta1 starts as the teacher with a zero-initialised w embedding: equal to it for every w."""
    student = trainable_copy(teacher)
    student.net.enable_w_embedding()
    return student


def stage_two_loss(config: GuidedConfig):
    """Stage two's batch loss for `train_round`: Alg. 2's pd_loss with w ~ U[w_min, w_max] per
    example, the same w passed to the teacher (the stage-one student or the previous round) and the student."""

    def batch_loss(student, teacher, x, labels, n_steps):
        labels = drop_labels(labels, config.pd_label_dropout, config.num_classes)  # 0: every label kept
        w = sample_w(x.shape[0], config, x.device)
        return pd_loss(at_w(student, w), at_w(teacher, w), x, labels, n_steps, config.weighting, reduce=False)

    return batch_loss


# ==== Sampling: deterministic DDIM and the paper's N-step stochastic sampler ==========================================


def renoise(z_s: torch.Tensor, s: float, t: float, eps: torch.Tensor) -> torch.Tensor:
    """A draw from the forward q(z_t | z_s), s < t:

        z_t = (alpha_t / alpha_s) z_s + sigma_{t|s} eps,   sigma^2_{t|s} = (1 - exp(lambda_t - lambda_s)) sigma_t^2

    written as sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2 (the same number, no logSNR clip at s = 0).
    """
    ### BEGIN SOLUTION
    alpha_s, sigma_s = alpha_sigma(s)
    alpha_t, sigma_t = alpha_sigma(t)
    ratio = alpha_t / alpha_s
    sigma_ts = (sigma_t**2 - ratio**2 * sigma_s**2).clamp(min=0).sqrt()
    return ratio * z_s + sigma_ts * eps
    ### END SOLUTION


@torch.no_grad()
def stochastic_sample(denoiser, z: torch.Tensor, steps: int, labels: torch.Tensor,
                      generator: torch.Generator | None = None, return_trajectory: bool = False):
    """Meng et al.'s N-step stochastic sampler (N = steps), one network call per step:
    from t = i/N, a deterministic DDIM step of twice the length to t - 2/N, then fresh noise
    forward to t - 1/N; the last step 1/N -> 0 is plain DDIM. The noise is drawn on the CPU
    from `generator`, so a seed gives the same samples on every device."""
    trajectory = [z]
    for i in range(steps, 0, -1):
        t = i / steps
        x_hat = denoiser(z, torch.full((z.shape[0],), t, device=z.device), labels)
        if i == 1:
            z = ddim_step(x_hat, z, t, 0.0)  # the last step is deterministic: z_0 = x_hat
        else:
            s2, s = (i - 2) / steps, (i - 1) / steps
            z_s2 = ddim_step(x_hat, z, t, s2)  # a DDIM step of twice the length, t -> t - 2/N
            eps = torch.randn(z.shape, generator=generator).to(z.device)
            z = renoise(z_s2, s2, s, eps)  # fresh noise forward to t - 1/N
        trajectory.append(z)
    return (z, trajectory) if return_trajectory else z


def sample(student, z: torch.Tensor, labels: torch.Tensor, w: float, steps: int, sampler: str = "ddim",
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The distilled student at guidance weight w: N steps, one network call each."""
    if sampler == "ddim":
        return ddim_sample(at_w(student, w), z, steps, labels)
    if sampler == "stochastic":
        return stochastic_sample(at_w(student, w), z, steps, labels, generator)
    raise UserError(f"unknown --sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


# ==== The run: checks, stage one, stage two, evaluation ===============================================================


def probe_at_w_max(config: GuidedConfig):
    """Both stages' diagnostic sampler (model, z, steps) -> x: DDIM at w_max with class-balanced labels."""

    def probe_sampler(model, z, steps):
        labels = balanced_labels(len(z), config.num_classes).to(z.device)
        return ddim_sample(at_w(model, config.w_max), z, steps, labels)

    return probe_sampler


def train_stage_one(teacher: Denoiser, config: GuidedConfig, device, out: Path, log: LogWriter,
                    probe_sampler) -> tuple[Denoiser, float]:
    """Stage one: the w-conditioned student x_hat_eta1 learns the guided teacher, w ~ U[w_min, w_max].
    `probe_sampler(model, z, steps)` samples at w_max, as in stage two's diagnostic."""

    def batch_loss(student, teacher, x, labels):
        w = sample_w(x.shape[0], config, device)  # w ~ U[w_min, w_max], one per example
        return guided_loss(student, teacher, x, labels, w, config.weighting, reduce=False)

    # Diagnostic on shared noise: the student's 16-step DDIM against the guided teacher's, at w_max.
    z_probe = probe_noise(config, device)
    c_probe = balanced_labels(z_probe.shape[0], config.num_classes).to(device)
    x_teacher = ddim_sample(guided(teacher, config.w_max, teacher.null_label), z_probe, 16, c_probe)

    def probe(student):
        return {"student_vs_guided_teacher_mse": probe_gap(student, probe_sampler, z_probe, 16, x_teacher)}

    seed_everything(config.seed)
    student = new_w_student(teacher)
    return train_student(student, teacher, batch_loss, config.stage1_lr, config.stage1_iterations, config.seed,
                         config, device, dict(path=out / "progress.pt", phase="stage one", desc="stage one",
                                              keys=STAGE1_KEYS, log=log, shared=True), probe, {"stage": 1})


def guided_distillation(config: GuidedConfig, resume: bool = False) -> dict:
    """Stage one, then stage two's ladder start_steps -> to_steps; every student saved and measured."""
    require(not is_pretrained(config), f"guided distillation needs a class-conditional teacher that knows a null "
            f"label, and {config.teacher} is unconditional; distil it with progressive_distill.py or dmd.py")
    require_null_label(config, "it cannot be guided")  # guidance needs x_hat(z_t, null)
    device = pick_device(config.device)
    ladder = Ladder(guided_dir(config), config, resume)  # finished stages load, an interrupted one resumes
    teacher = load_teacher(config, device)  # frozen, eval mode, no grads; trained first if missing
    ladder.teacher = teacher.fingerprint  # every student records the teacher it descends from (evaluate.py)
    ladder.metrics.update(preset=config.preset, w_min=config.w_min, w_max=config.w_max, single_w=config.single_w,
                          reference_steps=GuidedEvaluator.REFERENCE_STEPS)
    evaluator = GuidedEvaluator(teacher, config, device, ladder.out, sample, resume)
    probe_sampler = probe_at_w_max(config)

    def load(path):
        return load_student(path, config, device, w_embedding=True)

    stage_one = partial(train_stage_one, teacher, config, device, ladder.out, ladder.log, probe_sampler)
    student, seconds = ladder.stage("stage1", stage_one, load, steps=config.start_steps)
    if "stage1" not in ladder.metrics:
        ladder.metrics["stage1"] = {**evaluator(student, config.start_steps, samplers=("ddim",), folder="stage1"),
                                    "time_s": round(seconds, 1)}
        ladder.save_metrics()
    students = ladder.metrics.setdefault("students", {})
    n_steps = config.start_steps // 2  # N: the student's steps; its teacher takes 2N
    while n_steps >= config.to_steps:  # stage two: PD's rounds with w passed to teacher and student
        student, seconds = ladder.stage(f"student_{n_steps}",
                                        partial(train_round, student, n_steps, config, device, ladder.out, ladder.log,
                                                stage_two_loss(config), probe_sampler, (*ROUND_KEYS, *STAGE1_KEYS)),
                                        load, steps=n_steps)
        if str(n_steps) not in students:
            students[str(n_steps)] = {**evaluator(student, n_steps), "time_s": round(seconds, 1)}
            ladder.metrics["distill_time_s"] = round(ladder.metrics["stage1"]["time_s"] +
                                                     sum(s["time_s"] for s in students.values()), 1)
            ladder.metrics.update(teacher=evaluator.teacher_rows, eval_time_s=round(evaluator.watch.seconds, 1))
            ladder.save_metrics()
            print_guided_round(n_steps, students[str(n_steps)])
        n_steps //= 2
    ladder.log.plot(ladder.out / "loss.png", "guided distillation: weighted x-MSE by t bucket (stage one, then rounds)")
    plot_guided_quality(ladder.metrics, ladder.out / "quality_vs_steps.png")
    return ladder.metrics


def sample_command(config: GuidedConfig) -> Path:
    """--sample: draw from a saved student at --w with --sampler, and save the picture and samples."""
    w, steps, device = config.w, config.sample_steps, pick_device(config.device)
    if not config.w_min <= w <= config.w_max:
        raise UserError(f"--w {w:g} is outside the trained range [{config.w_min:g}, {config.w_max:g}]; "
                        "pick a w in it or distil a wider range (--w-min, --w-max)")
    path = guided_dir(config) / f"student_{steps}.pt"
    if not path.exists():
        raise UserError(f"no {steps}-step student at {path}; run `{config.command('guided_distill.py')}` first, "
                        "or pick --sample-steps from the saved rounds")
    student = load_student(path, config, device, w_embedding=True)
    toy = config.net == "mlp"
    n = config.eval_samples if toy else 8 * config.num_classes
    g = torch.Generator().manual_seed(config.seed)
    z = torch.randn((n, *sample_shape(config)), generator=g).to(device)
    labels = balanced_labels(n, config.num_classes).to(device)
    x = sample(student, z, labels, w, steps, config.sampler, g).float().cpu()
    png = guided_dir(config) / f"sample_w{w:g}_{config.sampler}_{steps}.png"
    if toy:
        save_scatter({f"w = {w:g}, {steps}-step {config.sampler}": x}, png)
    else:
        save_image_grid(x, png, nrow=config.num_classes)
    return png


# ==== Checks and the command line =====================================================================================


def check_config(config: GuidedConfig) -> None:
    """One-line errors for values that make no sense (called when a config is made)."""
    if config.single_w is not None:
        config.w_min = config.w_max = config.single_w
    require(min(config.w_min, config.w_max) >= 0,
            f"guidance weights must be >= 0 (w = 0 is the conditional model), got "
            f"[{config.w_min}, {config.w_max}]")
    require(config.w_min <= config.w_max, f"--w-min {config.w_min} is above --w-max {config.w_max}; swap them")
    outside = [w for w in config.eval_ws if not config.w_min <= w <= config.w_max]
    require(config.single_w is not None or not outside,  # (the single-w baseline is measured at its own w)
            f"--eval-ws {' '.join(f'{w:g}' for w in outside)}: outside the trained range [{config.w_min:g}, "
            f"{config.w_max:g}]; measure within it, or widen --w-min / --w-max")
    require(config.sampler in SAMPLERS, f"unknown --sampler {config.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    require(config.stage1_iterations >= 1, f"--stage1-iterations must be at least 1, got {config.stage1_iterations}")
    require(config.pd_label_dropout <= 0, "guided distillation trains on class labels: use --pd-label-dropout 0")


def main(argv=None) -> None:
    config, flags = parse_config(GuidedConfig, __doc__.split("\n\n")[0], argv,
                                 {"resume": "continue an interrupted run (either stage, mid-round included)",
                                  "sample": "sample a saved student at --w with --sampler instead of training"})
    resume, sample_only = flags["resume"], flags["sample"]
    if sample_only:
        print(f"samples in {sample_command(config)}")
        return
    print(f"guided distillation, {config.preset}: w in [{config.w_min:g}, {config.w_max:g}], "
          f"stage one {config.stage1_iterations} updates, then {config.start_steps} -> {config.to_steps} "
          f"steps at {config.round_iterations} updates per halving")
    metrics = guided_distillation(config, resume=resume)
    print(f"distilled in {metrics.get('distill_time_s')} s; students and metrics in {guided_dir(config)}")


if __name__ == "__main__":
    run_cli(main)
