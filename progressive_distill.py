"""Progressive distillation: a student's one DDIM step learns the teacher's two; halve N, repeat.

Paper: Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"
(arXiv 2202.00512), Alg. 2. Formulas: docs/methods.md section 1.

Algorithm (Alg. 2), starting from the trained teacher at N = `start_steps`:
    repeat until N = `to_steps`:
        student <- copy of teacher (dropout off), fresh Adam, lr annealed linearly to 0
        for `round_iterations` updates:
            x, c ~ data;  i ~ U{1..N};  t = i/N, t' = t - 0.5/N, t'' = t - 1/N
            z_t = alpha_t x + sigma_t eps
            z_t'  = DDIM(teacher, z_t,  t  -> t')             two teacher steps, no gradient
            z_t'' = DDIM(teacher, z_t', t' -> t'')
            x_tilde = invert_ddim(z_t, z_t'', t, t'')         one student step must land on z_t''
            loss = w(lambda_t) || x_tilde - x_hat_student(z_t) ||^2
        save the student as an N/2-step sampler; teacher <- student; N <- N / 2

Each round's student is saved as <out_dir>/pd/student_<N>.pt with its samples (toy:
samples.png, samples_<N>.npz) and metrics in <out_dir>/pd/metrics.json; a run stopped at
any point continues with --resume, mid-round included.

Deliberate differences from the paper:
- Default starting N: 64 on the toy data (8192 in the paper's cifar10 preset): the toy
  teacher's DDIM is converged by 64 steps, so longer ladders only cost time.
- The toy preset distils the unconditional model (`pd_label_dropout` 1.0), the case its
  benchmark is stated for; the image presets distil both, dropping labels like the teacher.
- The student is the teacher's network: v-prediction (the paper's best is x-prediction).
- The cifar10 preset gives every halving 50k updates (the paper gives the last two 100k).

    python progressive_distill.py                          # toy, 64 -> 1 steps on the CPU
    python progressive_distill.py --preset toy --to-steps 4
    python progressive_distill.py --preset toy --resume    # continue an interrupted ladder
"""

from __future__ import annotations

import plumbing.interrupt  # noqa: F401  (first: Ctrl-C while torch loads is one line)
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from common import (Denoiser, ddim_sample, ddim_step, diffuse, drop_labels, invert_ddim, logsnr, loss_by_t_bucket,
                    no_grad_fp32, trainable_copy)
from plumbing.config import NetworkConfig, parse_config, sample_shape
from plumbing.data import BatchStream
from plumbing.errors import UserError, require
from plumbing.folders import pd_dir, teacher_dir
from plumbing.loop import Ladder, Loop
from plumbing.networks import frozen_denoiser
from plumbing.reports import evaluate_pd_student, plot_pd_quality, print_pd_round
from plumbing.training import (LogWriter, autocast, check_compatible, load_checkpoint, optimizer_step, pick_device,
                               prepare_network, read_json, run_cli, seed_everything)
from train_teacher import TeacherConfig, load_teacher, require_null_label

WEIGHTINGS = ("truncated-snr", "snr+1")


@dataclass
class PDConfig(TeacherConfig):
    """Alg. 2: progressive distillation (defaults: the paper's CIFAR-10 values, docs/methods.md 1.2)"""

    start_steps: int = 8192           # the teacher's DDIM steps N in the first round, a power of two (paper: 8192)
    to_steps: int = 1                 # stop when the student samples in this many steps, a power of two (paper: 1)
    round_iterations: int = 50_000    # student updates per halving (paper: 50k)
    pd_lr: float = 5e-5               # Adam learning rate, annealed linearly to 0 within each round (paper: 5e-5)
    pd_batch_size: int = 128          # batch size while distilling, global under torchrun (paper: 128)
    weighting: str = "truncated-snr"  # x-MSE weight: truncated-snr = max(SNR, 1) (paper), or snr+1
    pd_label_dropout: float = 0.1     # probability of distilling an example with the null label (as the teacher)

    PRESETS: ClassVar[dict] = {
        # Toy: the unconditional model (its benchmark); batch 256 gives the students of 512 in half the time.
        "toy": dict(start_steps=64, round_iterations=2000, pd_lr=1e-3, pd_batch_size=256, pd_label_dropout=1.0),
        # 2 CPU cores: 200 updates of about 0.3 s per halving (docs/results.md, images on the CPU).
        "fmnist16": dict(start_steps=64, round_iterations=200, pd_lr=2e-4, pd_batch_size=64),
        "fmnist": dict(start_steps=256, round_iterations=5000, pd_lr=1e-4),
    }
    RESUMABLE: ClassVar[tuple] = ("to_steps",)  # a finished ladder can be continued to fewer steps

    def check(self) -> None:
        super().check()
        check_config(self)  # below the algorithm


# What a resumed round must share with its checkpoint: every PD field but to_steps, the seed and the clip.
ROUND_KEYS = (*PDConfig.run_keys(TeacherConfig), "grad_clip")


# ==== Alg. 2: the target and the loss =================================================================================


@no_grad_fp32()  # the teacher in fp32, also inside a bf16 step: the signal is below bf16's rounding
def pd_target(teacher, z_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, n_steps: int) -> torch.Tensor:
    """x_tilde: the x-prediction whose single DDIM step of the N-step student (N = n_steps) from
    z_t lands where two half-length teacher steps land.

    t (B,) lies on the student's N-step grid; at t = 1 alpha_t = 0, at the last interval
    t'' = 0 and x_tilde reduces to the teacher's second x_hat.
    """
    ### BEGIN SOLUTION
    t1 = t - 0.5 / n_steps  # t'
    t2 = t - 1.0 / n_steps  # t''
    # Alg. 2: z_t' = alpha_t' x_hat(z_t) + sigma_t' (z_t - alpha_t x_hat(z_t)) / sigma_t
    z_t1 = ddim_step(teacher(z_t, t, labels), z_t, t, t1)
    # Alg. 2: z_t'' from z_t' the same way
    z_t2 = ddim_step(teacher(z_t1, t1, labels), z_t1, t1, t2)
    # Alg. 2 (PD Appendix G): x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
    return invert_ddim(z_t, z_t2, t, t2)
    ### END SOLUTION


def snr_weight(t: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(lambda_t) for the x-MSE: max(SNR, 1) ("truncated-snr") or SNR + 1 ("snr+1")."""
    ### BEGIN SOLUTION
    snr = torch.exp(logsnr(t))  # alpha_t^2 / sigma_t^2, logSNR clipped to [-20, 20]
    if weighting == "truncated-snr":
        return snr.clamp(min=1.0)
    if weighting == "snr+1":
        return snr + 1.0
    raise UserError(f"unknown --weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    ### END SOLUTION


def pd_loss(student, teacher, x: torch.Tensor, labels: torch.Tensor, n_steps: int,
            weighting: str = "truncated-snr", i: torch.Tensor | None = None, reduce: bool = True):
    """Alg. 2's loss for one batch: w(lambda_t) || x_tilde - x_hat_student(z_t) ||^2, t = i / N,
    where N = n_steps is the student's sampling steps (the teacher takes 2N).

    With `reduce=False` returns the per-example losses (B,) and t (B,), for logging by t.
    """
    if i is None:
        i = torch.randint(1, n_steps + 1, (x.shape[0],), device=x.device)  # i ~ U{1..N}
    t = i.float() / n_steps
    z_t = diffuse(x, t, torch.randn_like(x))  # z_t = alpha_t x + sigma_t eps
    x_tilde = pd_target(teacher, z_t, t, labels, n_steps)  # no gradient flows into the target
    x_hat = student(z_t, t, labels)
    per_example = snr_weight(t, weighting) * (x_hat - x_tilde).pow(2).flatten(1).mean(1)  # (B,)
    return per_example.mean() if reduce else (per_example, t)


# ==== The ladder of rounds ============================================================================================


def frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def new_student(teacher: Denoiser) -> Denoiser:
    """Alg. 2: the student starts as a copy of its teacher; no dropout while distilling."""
    return trainable_copy(teacher)


def load_student(path, config: PDConfig, device, w_embedding: bool = False) -> Denoiser:
    """A saved student, frozen; `w_embedding` for guided distillation's w-conditioned students."""
    state = load_checkpoint(path, "student checkpoint")
    check_compatible(state["config"], config, NetworkConfig.network_keys(), "student checkpoint", path)
    student = frozen_denoiser(config, state["model"], device, w_embedding)
    prepare_network(student, config, device, compile=False)  # as the trained one was (channels_last)
    return student


def probe_noise(config: PDConfig, device) -> torch.Tensor:
    """Shared noise for the teacher-vs-student diagnostic: 256 toy points or 16 images."""
    g = torch.Generator().manual_seed(config.eval_seed)
    shape = (256 if config.net == "mlp" else 16, *sample_shape(config))
    return torch.randn(shape, generator=g).to(device)


def probe_gap(student, sampler, z: torch.Tensor, steps: int, x_teacher: torch.Tensor) -> float:
    """MSE between the student's `steps`-step samples and the teacher's on the same noise."""
    student.eval()
    gap = (sampler(student, z, steps) - x_teacher).pow(2).mean().item()
    student.train()
    return gap


def train_student(student: Denoiser, teacher: Denoiser, batch_loss, lr: float, iterations: int, seed: int,
                  config: PDConfig, device, loop_args: dict, probe, record: dict) -> tuple[Denoiser, float]:
    """The loop of every PD round (and of guided distillation's stage one): Adam with the learning rate
    annealed linearly to 0 (Alg. 2), `batch_loss(student, teacher, x, labels) -> (per-example loss, t)`;
    `probe(student) -> {name: teacher-vs-student error on shared noise}` at every log line, off the training
    clock. Returns the frozen student and its training seconds."""
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    stream = BatchStream({**config, "batch_size": config.pd_batch_size}, device, seed)
    loop = Loop(config=config, total=iterations, state={"model": student, "opt": opt, "stream": stream}, **loop_args)
    for step in loop:
        for group in opt.param_groups:  # lr annealed linearly to 0
            group["lr"] = lr * (1.0 - step / iterations)
        x, labels = stream.next()
        with autocast(config, device):
            per_example, t = batch_loss(student, teacher, x, labels)
        loss = per_example.mean()
        grad_norm = optimizer_step(opt, loss, student, config.grad_clip)
        if loop.due(config.log_every):
            with loop.off_the_clock():  # a diagnostic, not training: N student and 2N teacher steps
                gap = probe(student)
            loop.log(**record, loss=loss, grad_norm=grad_norm, **gap, **loss_by_t_bucket(per_example, t))
    return frozen(student), loop.seconds


def train_round(teacher: Denoiser, n_steps: int, config: PDConfig, device, out: Path, log: LogWriter,
                batch_loss=None, probe_sampler=None, keys=ROUND_KEYS) -> tuple[Denoiser, float]:
    """Alg. 2's inner loop: a student whose N = n_steps DDIM steps match the teacher's 2N.

    `batch_loss(student, teacher, x, labels, n_steps) -> (per-example loss, t)` and
    `probe_sampler(model, z, steps) -> x` default to Alg. 2's loss and unconditional DDIM;
    guided distillation passes versions that draw and pass a guidance weight w.
    """
    if batch_loss is None:
        def batch_loss(student, teacher, x, labels, n_steps):
            labels = drop_labels(labels, config.pd_label_dropout, teacher.null_label)
            return pd_loss(student, teacher, x, labels, n_steps, config.weighting, reduce=False)
    if probe_sampler is None:
        def probe_sampler(model, z, steps):
            return ddim_sample(model, z, steps, torch.full((z.shape[0],), model.null_label, device=z.device))
    # Diagnostic on shared noise: the student's N-step samples against the teacher's 2N-step ones.
    z_probe = probe_noise(config, device)
    x_teacher = probe_sampler(teacher, z_probe, 2 * n_steps)

    def probe(student):
        return {"student_vs_teacher_mse": probe_gap(student, probe_sampler, z_probe, n_steps, x_teacher)}

    seed_everything(config.seed + n_steps)  # rounds do not depend on what ran before them
    student = new_student(teacher)  # Alg. 2: the student starts as a copy of its teacher
    return train_student(student, teacher, lambda s, t, x, c: batch_loss(s, t, x, c, n_steps), config.pd_lr,
                         config.round_iterations, config.seed + n_steps, config, device,
                         dict(path=out / "progress.pt", phase=f"round {n_steps}", desc=f"PD {2 * n_steps}->{n_steps}",
                              keys=keys, log=log, shared=True), probe, {"student_steps": n_steps})


def progressive_distillation(config: PDConfig, resume: bool = False) -> dict:
    """Alg. 2's outer loop: halve N from `start_steps` to `to_steps`, saving and measuring every student."""
    require_null_label(config, "progressive distillation cannot sample the null label from it (its probe does, "
                               "and --pd-label-dropout)")
    device = pick_device(config.device)
    ladder = Ladder(pd_dir(config), config, resume)  # finished rounds load, an interrupted one resumes
    teacher = load_teacher(config, device)  # frozen, eval mode, no grads; trained first if missing
    ladder.teacher = teacher.fingerprint  # every student records the teacher it descends from (evaluate.py)
    ladder.metrics.update(preset=config.preset, start_steps=config.start_steps,
                          teacher_ddim=read_json(teacher_dir(config) / "metrics.json"))
    students = ladder.metrics.setdefault("students", {})
    n_steps = config.start_steps // 2  # N: the student's steps; its teacher takes 2N
    while n_steps >= config.to_steps:
        teacher, seconds = ladder.stage(f"student_{n_steps}",  # the student is the next round's teacher
                                        partial(train_round, teacher, n_steps, config, device, ladder.out, ladder.log),
                                        partial(load_student, config=config, device=device), steps=n_steps)
        if str(n_steps) not in students:  # also a round whose run died before its evaluation
            result = evaluate_pd_student(teacher, n_steps, config, device, ladder.out)
            students[str(n_steps)] = {**result, "round_time_s": round(seconds, 1)}
            ladder.metrics["distill_time_s"] = round(sum(s["round_time_s"] for s in students.values()), 1)
            ladder.metrics["eval_time_s"] = round(sum(s.get("eval_time_s", 0) for s in students.values()), 1)
            ladder.save_metrics()
            print_pd_round(n_steps, result, seconds, ladder.metrics["teacher_ddim"].get("ddim", {}))
        n_steps //= 2
    ladder.log.plot(ladder.out / "loss.png", "progressive distillation: weighted x-MSE by t bucket")
    plot_pd_quality(ladder.metrics, ladder.out / "quality_vs_steps.png")
    return ladder.metrics


# ==== Checks and the command line =====================================================================================


def check_config(config: PDConfig) -> None:
    """One-line errors for values that make no sense (called when a config is made)."""
    for name in ("start_steps", "to_steps"):
        n = config[name]
        require(n >= 1 and n & (n - 1) == 0,
                f"--{name.replace('_', '-')} must be a power of two (1, 2, 4, ...), got {n}")
    require(config.to_steps < config.start_steps,
            f"--to-steps {config.to_steps} must be below the teacher's {config.start_steps} steps "
            "(--start-steps)")
    require(config.round_iterations >= 1 and config.pd_batch_size >= 1,
            f"--round-iterations and --pd-batch-size must be at least 1, got {config.round_iterations} and "
            f"{config.pd_batch_size}")
    require(config.weighting in WEIGHTINGS,
            f"unknown --weighting {config.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    require(0.0 <= config.pd_label_dropout <= 1.0,
            f"--pd-label-dropout must be in [0, 1], got {config.pd_label_dropout}")


def main(argv=None) -> None:
    config, flags = parse_config(PDConfig, __doc__.split("\n\n")[0], argv,
                                 {"resume": "continue an interrupted ladder (mid-round included)"})
    resume = flags["resume"]
    print(f"progressive distillation, {config.preset}: {config.start_steps} -> {config.to_steps} steps, "
          f"{config.round_iterations} updates per halving")
    metrics = progressive_distillation(config, resume=resume)
    print(f"distilled in {metrics.get('distill_time_s')} s; students and metrics in {pd_dir(config)}")


if __name__ == "__main__":
    run_cli(main)
