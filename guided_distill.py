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

import time
from pathlib import Path

import torch

from common import (Denoiser, UserError, alpha_sigma, check_compatible, ddim_sample, ddim_step, diffuse,
                    guided, load_checkpoint, loss_by_t_bucket, no_grad_fp32, pick_device, read_json,
                    rng_state, run_cli, save_checkpoint, save_image_grid, save_scatter, seed_everything,
                    set_rng_state, trainable_copy, write_json)
from data import BatchStream, toy_dataset
from metrics import reference_metrics, sampler_floor
from presets import parse_config
from progressive_distill import PD_FIELDS, check_steps, frozen, load_student, pd_loss, snr_weight, train_round
from train_teacher import load_teacher
from training import LogWriter, autocast, progress

GD_FIELDS = {
    **PD_FIELDS,  # stage two is progressive distillation: start_steps, to_steps, round_iterations, pd_lr, ...
    "stage1_iterations": (int, "stage one: updates of the w-conditioned student"),
    "stage1_lr": (float, "stage one: Adam learning rate, annealed linearly to 0"),
    "w_min": (float, "smallest guidance weight w the student learns (w = 0: the conditional model)"),
    "w_max": (float, "largest guidance weight w the student learns"),
    "single_w": (float, "distil only this w (the paper's single-w baseline) instead of [w_min, w_max]"),
    "eval_ws": ("floats", "guidance weights measured at the end of every round"),
    "w": (float, "with --sample: the guidance weight to sample at (within the trained range)"),
    "sampler": (str, "with --sample: ddim (deterministic) or stochastic (the paper's N-step sampler)"),
    "sample_steps": (int, "with --sample: the student's steps (one of the saved rounds)"),
}
# Stage one's settings: resuming its progress checkpoint with other values would mix two runs.
STAGE1_KEYS = ("pd_batch_size", "stage1_iterations", "stage1_lr", "weighting", "w_min", "w_max", "single_w", "seed")
# Toy: batch 256 (stage one and the halvings) with 2500 updates per halving matches batch 512 with 1500
# (README), in less time.
_TOY = {"start_steps": 64, "to_steps": 1, "round_iterations": 2500, "pd_lr": 1e-3, "pd_batch_size": 256,
        "weighting": "truncated-snr", "pd_label_dropout": 0.0, "stage1_iterations": 3000, "stage1_lr": 1e-3,
        "w_min": 0.0, "w_max": 4.0, "single_w": None, "eval_ws": [0.0, 1.0, 2.0, 4.0],
        "w": 2.0, "sampler": "ddim", "sample_steps": 4}
GD_PRESETS = {
    "toy": _TOY,
    "fmnist": {**_TOY, "start_steps": 256, "round_iterations": 5000, "pd_lr": 1e-4, "pd_batch_size": 128,
               "stage1_iterations": 10_000, "stage1_lr": 1e-4},
    # PD's CIFAR-10 settings (docs/methods.md section 1) from 1024 steps, the low end of the paper's
    # range (1024 to 8192), with the pixel-space w range [0, 4].
    "cifar10": {**_TOY, "start_steps": 1024, "round_iterations": 50_000, "pd_lr": 5e-5, "pd_batch_size": 128,
                "stage1_iterations": 50_000, "stage1_lr": 5e-5},
}
SAMPLERS = ("ddim", "stochastic")
REFERENCE_STEPS = 256  # the guided teacher's DDIM that defines "the target distribution" at each w


# ----------------------------------------------------------------------------------------
# Stage one: one network call that reproduces the guided teacher's two
# ----------------------------------------------------------------------------------------


def at_w(model, w):
    """The denoiser protocol (z_t, t, labels) -> x_hat with the guidance weight w (float or (B,)) bound."""
    return lambda z_t, t, labels: model(z_t, t, labels, w)


def sample_w(n: int, config: dict, device) -> torch.Tensor:
    """w ~ U[w_min, w_max], one per example (B,)."""
    return config["w_min"] + (config["w_max"] - config["w_min"]) * torch.rand(n, device=device)


@no_grad_fp32()  # the guided teacher in fp32, also inside a bf16 step
def guided_target(teacher: Denoiser, z_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, w) -> torch.Tensor:
    """x_hat^w_teacher(z_t, c) = (1 + w) x_hat(z_t, c) - w x_hat(z_t, null): two teacher calls."""
    return guided(teacher, w, teacher.null_label)(z_t, t, labels)


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


def stage_two_loss(config: dict):
    """Stage two's batch loss for `train_round`: Alg. 2's pd_loss with w ~ U[w_min, w_max] per
    example, the same w passed to the teacher (the stage-one student or the previous round) and the student."""

    def batch_loss(student, teacher, x, labels, n_steps):
        w = sample_w(x.shape[0], config, x.device)
        return pd_loss(at_w(student, w), at_w(teacher, w), x, labels, n_steps, config["weighting"], reduce=False)

    return batch_loss


# ----------------------------------------------------------------------------------------
# Sampling: deterministic DDIM and the paper's N-step stochastic sampler
# ----------------------------------------------------------------------------------------


def renoise(z_s: torch.Tensor, s: float, t: float, eps: torch.Tensor) -> torch.Tensor:
    """A draw from the forward q(z_t | z_s), s < t:

        z_t = (alpha_t / alpha_s) z_s + sigma_{t|s} eps,   sigma^2_{t|s} = (1 - exp(lambda_t - lambda_s)) sigma_t^2

    written as sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2 (the same number, no logSNR clip at s = 0).
    """
    alpha_s, sigma_s = alpha_sigma(s)
    alpha_t, sigma_t = alpha_sigma(t)
    ratio = alpha_t / alpha_s
    sigma_ts = (sigma_t**2 - ratio**2 * sigma_s**2).clamp(min=0).sqrt()
    return ratio * z_s + sigma_ts * eps


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


# ----------------------------------------------------------------------------------------
# The run: checks, stage one, stage two, evaluation
# ----------------------------------------------------------------------------------------


def check_config(config: dict) -> None:
    if config["single_w"] is not None:
        config["w_min"] = config["w_max"] = config["single_w"]
    if config["w_min"] < 0 or config["w_max"] < 0:
        raise UserError(f"guidance weights must be >= 0 (w = 0 is the conditional model), got "
                        f"[{config['w_min']}, {config['w_max']}]")
    if config["w_min"] > config["w_max"]:
        raise UserError(f"--w-min {config['w_min']} is above --w-max {config['w_max']}; swap them")
    if config["sampler"] not in SAMPLERS:
        raise UserError(f"unknown --sampler {config['sampler']!r}; choose one of {', '.join(SAMPLERS)}")
    if config["stage1_iterations"] < 1:
        raise UserError(f"--stage1-iterations must be at least 1, got {config['stage1_iterations']}")
    if config["pd_label_dropout"] > 0:
        raise UserError("guided distillation trains on class labels: use --pd-label-dropout 0")
    check_steps(config)


def check_teacher_has_null(config: dict) -> None:
    """Guidance needs x_hat(z_t, null): a teacher trained with label dropout."""
    path = Path(config["teacher"])
    trained = load_checkpoint(path, "teacher checkpoint")["config"] if path.exists() else config
    if trained["label_dropout"] <= 0:
        raise UserError(f"the teacher {'at ' + str(path) if path.exists() else 'to be trained'} has no null class "
                        "(it was trained with --label-dropout 0), so it cannot be guided; train one with "
                        "`python train_teacher.py --label-dropout 0.1` or pass another --teacher")


def run_dir(config: dict) -> Path:
    single = config["single_w"]
    return Path(config["out_dir"]) / ("guided" if single is None else f"guided_single_w{single:g}")


def labels_for(n: int, config: dict, device) -> torch.Tensor:
    """Class-conditional evaluation: every class equally often (guidance needs a class)."""
    return (torch.arange(n) % config["num_classes"]).to(device)


def train_stage_one(teacher: Denoiser, config: dict, device, out: Path, log: LogWriter) -> Denoiser:
    """The w-conditioned student x_hat_eta1, resumable from out/progress.pt."""
    seed_everything(config["seed"])
    student = new_w_student(teacher)
    opt = torch.optim.Adam(student.parameters(), lr=config["stage1_lr"])
    stream = BatchStream({**config, "batch_size": config["pd_batch_size"]}, device, config["seed"])
    iterations, step = config["stage1_iterations"], 0
    progress_path = out / "progress.pt"
    if progress_path.exists():
        state = load_checkpoint(progress_path, "stage-one progress checkpoint")
        if state["n_steps"] == 0:  # stage one's progress (rounds store their student's N > 0)
            check_compatible(state["config"], config, STAGE1_KEYS, "stage-one progress checkpoint", progress_path)
            student.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            stream.load_state_dict(state["stream"])
            set_rng_state(state["rng"])
            log.restore(state.get("log"))
            step = state["step"]
            print(f"resuming stage one at update {step}")

    # Diagnostic on shared noise: the student's 16-step DDIM against the guided teacher's, at w_max.
    g = torch.Generator().manual_seed(config["eval_seed"])
    shape = (256, 2) if config["net"] == "mlp" else (16, config["in_ch"], 32, 32)
    z_probe = torch.randn(shape, generator=g).to(device)
    c_probe, w_probe = labels_for(shape[0], config, device), config["w_max"]
    x_teacher = ddim_sample(guided(teacher, w_probe, teacher.null_label), z_probe, 16, c_probe)

    bar = progress(range(step, iterations), "stage one", initial=step, total=iterations)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = config["stage1_lr"] * (1.0 - step / iterations)
        x, labels = stream.next()
        w = sample_w(x.shape[0], config, device)  # w ~ U[w_min, w_max], one per example
        with autocast(config, device):
            per_example, t = guided_loss(student, teacher, x, labels, w, config["weighting"], reduce=False)
        loss = per_example.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config["grad_clip"])
        opt.step()
        step += 1
        if step % config["log_every"] == 0 or step == iterations:
            student.eval()
            gap = (ddim_sample(at_w(student, w_probe), z_probe, 16, c_probe) - x_teacher).pow(2).mean().item()
            student.train()
            log.write({"stage": 1, "step": step, "loss": loss.item(), "grad_norm": grad_norm.item(),
                       "student_vs_guided_teacher_mse": gap, **loss_by_t_bucket(per_example, t)})
            bar.set_postfix(loss=f"{loss.item():.4f}", gap=f"{gap:.5f}")
        if step % config["ckpt_every"] == 0 and step < iterations:
            save_checkpoint(progress_path, {"kind": "guided_progress", "config": config, "n_steps": 0, "step": step,
                                            "model": student.state_dict(), "opt": opt.state_dict(),
                                            "stream": stream.state_dict(), "rng": rng_state(),
                                            "log": log.records()})
    bar.close()
    return frozen(student)


def guided_distillation(config: dict, resume: bool = False) -> dict:
    """Stage one, then stage two's ladder start_steps -> to_steps; every student saved and measured."""
    check_config(config)
    check_teacher_has_null(config)
    device = pick_device(config["device"])
    out = run_dir(config)
    if out.exists() and any(out.glob("*.pt")) and not resume:
        raise UserError(f"{out} holds an earlier run; pass --resume to continue it, or --out-dir for a new run")
    teacher = load_teacher(config, device)  # frozen, eval mode, no grads; trained first if missing
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    metrics = read_json(metrics_path) if resume else {}
    metrics.update({"preset": config["preset"], "w_min": config["w_min"], "w_max": config["w_max"],
                    "single_w": config["single_w"], "reference_steps": REFERENCE_STEPS})
    evaluator = Evaluator(teacher, config, device, out, resume)
    log = LogWriter(out / "log.jsonl", resume=resume)
    logged = []  # the log as it was when stage one, then each finished round, ended

    path = out / "stage1.pt"
    if path.exists():
        student = load_student(path, config, device, w_embedding=True)
        logged = load_checkpoint(path).get("log")
    else:
        log.restore(logged)  # drop an interrupted run's lines (train_stage_one restores its checkpoint's)
        start = time.perf_counter()
        student = train_stage_one(teacher, config, device, out, log)
        logged = log.records()
        save_checkpoint(path, {"kind": "guided_stage1", "config": config, "steps": config["start_steps"],
                               "model": student.state_dict(), "round_time_s": time.perf_counter() - start,
                               "log": logged})
        (out / "progress.pt").unlink(missing_ok=True)
    if "stage1" not in metrics:
        metrics["stage1"] = {**evaluator(student, config["start_steps"], samplers=("ddim",), folder="stage1"),
                             "time_s": round(load_checkpoint(path)["round_time_s"], 1)}
        write_json(metrics_path, metrics)

    students = metrics.setdefault("students", {})
    teacher_n, n_steps = student, config["start_steps"] // 2  # N: the student's steps; its teacher takes 2N
    while n_steps >= config["to_steps"]:
        path = out / f"student_{n_steps}.pt"
        if path.exists():  # a finished round: its student is the next teacher
            teacher_n = load_student(path, config, device, w_embedding=True)
            logged = load_checkpoint(path).get("log")
        else:
            log.restore(logged)  # drop an interrupted round's lines (train_round restores its checkpoint's)
            start = time.perf_counter()
            teacher_n = train_round(teacher_n, n_steps, config, device, out, log,
                                    batch_loss=stage_two_loss(config), probe_sampler=evaluator.probe)
            logged = log.records()
            save_checkpoint(path, {"kind": "guided_student", "config": config, "steps": n_steps,
                                   "model": teacher_n.state_dict(), "round_time_s": time.perf_counter() - start,
                                   "log": logged})
            (out / "progress.pt").unlink(missing_ok=True)
        if str(n_steps) not in students:
            students[str(n_steps)] = {**evaluator(teacher_n, n_steps),
                                      "time_s": round(load_checkpoint(path)["round_time_s"], 1)}
            metrics["distill_time_s"] = round(metrics["stage1"]["time_s"] +
                                              sum(s["time_s"] for s in students.values()), 1)
            metrics["teacher"] = evaluator.teacher_rows
            write_json(metrics_path, metrics)
            print_round(n_steps, students[str(n_steps)])
        n_steps //= 2
    log.plot(out / "loss.png", "guided distillation: weighted x-MSE by t bucket (stage one, then rounds)")
    plot_quality(metrics, out / "quality_vs_steps.png")
    return metrics


class Evaluator:
    """Samples a student at each w in `eval_ws` on the shared evaluation noise and, on toy data,
    measures it against the guided teacher's 256-step DDIM at that w (with that sampler's floor:
    a second draw of it). Also measures the guided teacher's own DDIM at the student's step count."""

    def __init__(self, teacher: Denoiser, config: dict, device, out: Path, resume: bool = False):
        self.teacher, self.config, self.device, self.out = teacher, config, device, out
        self.toy = config["net"] == "mlp"
        n = config["eval_samples"] if self.toy else 2 * config["num_classes"]
        shape = (n, 2) if self.toy else (n, config["in_ch"], 32, 32)
        g = torch.Generator().manual_seed(config["eval_seed"])
        self.z, self.z2 = (torch.randn(shape, generator=g).to(device) for _ in range(2))
        self.labels = labels_for(n, config, device)
        self.mixture = toy_dataset(config["data"]) if config["data"] == "gaussians8" else None
        self.references = {}
        self.teacher_rows = read_json(out / "metrics.json").get("teacher", {}) if resume else {}  # before a resume

    def guided_teacher(self, w: float, z: torch.Tensor, steps: int) -> torch.Tensor:
        return ddim_sample(guided(self.teacher, w, self.teacher.null_label), z, steps, self.labels).float().cpu()

    def reference(self, w: float):
        """The target distribution at w, and its floor from a second draw: both made once per w."""
        if w not in self.references:
            ref = self.guided_teacher(w, self.z, REFERENCE_STEPS)
            floor = sampler_floor(ref.numpy(), self.guided_teacher(w, self.z2, REFERENCE_STEPS).numpy())
            self.references[w] = (ref, floor)
        return self.references[w]

    def probe(self, model, z: torch.Tensor, steps: int) -> torch.Tensor:
        """Stage two's diagnostic on shared noise, at w_max."""
        return ddim_sample(at_w(model, self.config["w_max"]), z, steps, labels_for(z.shape[0], self.config, z.device))

    def measure(self, x: torch.Tensor, w: float) -> dict:
        if not self.toy:
            return {}
        ref, floor = self.reference(w)
        return reference_metrics(x.numpy(), ref.numpy(), floor, self.mixture)

    def __call__(self, student: Denoiser, steps: int, samplers=SAMPLERS, folder: str | None = None) -> dict:
        ws = [w for w in self.config["eval_ws"] if self.config["w_min"] <= w <= self.config["w_max"]]
        if self.config["single_w"] is not None:
            ws = [self.config["single_w"]]  # the single-w baseline is measured at its own w
        results, panels = {sampler: {} for sampler in samplers}, {}
        for w in ws:
            if str(steps) not in self.teacher_rows.get(f"{w:g}", {}):
                x = self.guided_teacher(w, self.z, steps)
                self.teacher_rows.setdefault(f"{w:g}", {})[str(steps)] = self.measure(x, w)
            for sampler in samplers:
                g = torch.Generator().manual_seed(self.config["eval_seed"] + 1)  # the stochastic sampler's noise
                x = sample(student, self.z, self.labels, w, steps, sampler, g).float().cpu()
                results[sampler][f"{w:g}"] = self.measure(x, w)
                if self.toy:
                    panels[f"w = {w:g}, {sampler}"] = x
                else:
                    save_image_grid(x, self.out / (folder or f"student_{steps}") / f"w{w:g}_{sampler}.png",
                                    nrow=self.config["num_classes"])
            if self.toy:
                panels[f"w = {w:g}, guided teacher {REFERENCE_STEPS}"] = self.reference(w)[0]
        if self.toy:
            save_scatter(panels, self.out / (folder or f"student_{steps}") / "samples.png", ncols=len(samplers) + 1)
        return results


def print_round(n_steps: int, result: dict) -> None:
    line = f"  student {n_steps:>4} steps"
    for sampler, per_w in result.items():
        if isinstance(per_w, dict) and per_w and all("mmd" in m for m in per_w.values()):
            line += f"  {sampler} MMD " + " ".join(f"w{w}:{m['mmd']:.4f}" for w, m in per_w.items())
    print(line)


def plot_quality(metrics: dict, png: Path) -> None:
    """MMD to the guided teacher's 256-step samples against steps, one panel per w."""
    from matplotlib.figure import Figure

    students, teacher = metrics.get("students", {}), metrics.get("teacher", {})
    ws = sorted({w for s in students.values() for w in s.get("ddim", {}) if "mmd" in s["ddim"][w]}, key=float)
    if not ws:
        return
    fig = Figure(figsize=(3.2 * len(ws), 3.2))
    for ax, w in zip(fig.subplots(1, len(ws), squeeze=False)[0], ws):
        rows = {"guided teacher DDIM (2 calls/step)": (teacher.get(w, {}), "o--"),
                "student DDIM": ({k: s["ddim"][w] for k, s in students.items()}, "s-"),
                "student stochastic": ({k: s["stochastic"][w] for k, s in students.items() if "stochastic" in s},
                                       "^-")}
        for label, (table, style) in rows.items():
            pts = sorted((int(k), max(v["mmd"], 1e-5)) for k, v in table.items() if "mmd" in v)
            if pts:
                ax.plot(*zip(*pts), style, label=label, ms=4)
        floor = next(iter(students.values()))["ddim"][w]["mmd_floor"]
        ax.axhline(max(floor, 1e-5), c="0.5", ls=":", lw=1, label="floor (teacher vs itself)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_title(f"w = {w}", fontsize=10)
    fig.axes[0].set_ylabel("MMD$^2$ to the guided teacher (256 steps)")
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def sample_command(config: dict) -> Path:
    """--sample: draw from a saved student at --w with --sampler, and save the picture and samples."""
    check_config(config)
    w, steps, device = config["w"], config["sample_steps"], pick_device(config["device"])
    if not config["w_min"] <= w <= config["w_max"]:
        raise UserError(f"--w {w:g} is outside the trained range [{config['w_min']:g}, {config['w_max']:g}]; "
                        "pick a w in it or distil a wider range (--w-min, --w-max)")
    path = run_dir(config) / f"student_{steps}.pt"
    if not path.exists():
        raise UserError(f"no {steps}-step student at {path}; run `python guided_distill.py --preset "
                        f"{config['preset']}` first, or pick --sample-steps from the saved rounds")
    student = load_student(path, config, device, w_embedding=True)
    toy = config["net"] == "mlp"
    n = config["eval_samples"] if toy else 8 * config["num_classes"]
    g = torch.Generator().manual_seed(config["seed"])
    z = torch.randn((n, 2) if toy else (n, config["in_ch"], 32, 32), generator=g).to(device)
    x = sample(student, z, labels_for(n, config, device), w, steps, config["sampler"], g).float().cpu()
    png = run_dir(config) / f"sample_w{w:g}_{config['sampler']}_{steps}.png"
    if toy:
        save_scatter({f"w = {w:g}, {steps}-step {config['sampler']}": x}, png)
    else:
        save_image_grid(x, png, nrow=config["num_classes"])
    return png


def main(argv=None) -> None:
    config = parse_config(__doc__.split("\n\n")[0], GD_FIELDS, GD_PRESETS, argv=argv,
                          flags={"resume": "continue an interrupted run (either stage, mid-round included)",
                                 "sample": "sample a saved student at --w with --sampler instead of training"})
    resume, sample_only = config.pop("resume"), config.pop("sample")
    check_config(config)
    if sample_only:
        print(f"samples in {sample_command(config)}")
        return
    print(f"guided distillation, {config['preset']}: w in [{config['w_min']:g}, {config['w_max']:g}], "
          f"stage one {config['stage1_iterations']} updates, then {config['start_steps']} -> {config['to_steps']} "
          f"steps at {config['round_iterations']} updates per halving")
    metrics = guided_distillation(config, resume=resume)
    print(f"distilled in {metrics.get('distill_time_s')} s; students and metrics in {run_dir(config)}")


if __name__ == "__main__":
    run_cli(main)
