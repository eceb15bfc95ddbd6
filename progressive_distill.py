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

import time
from pathlib import Path

import torch
import torch.nn as nn

from common import (Denoiser, UserError, check_compatible, ddim_sample, ddim_step, diffuse, drop_labels,
                    invert_ddim, frozen_denoiser, load_checkpoint, logsnr, loss_by_t_bucket, no_grad_fp32,
                    pick_device, read_json, rng_state, run_cli, save_checkpoint, seed_everything,
                    set_rng_state, trainable_copy, write_json)
from data import BatchStream
from metrics import evaluate_sampler
from presets import TEACHER_KEYS, parse_config
from train_teacher import load_teacher, teacher_dir
from training import LogWriter, autocast, progress

PD_FIELDS = {
    "start_steps": (int, "the teacher's DDIM steps N in the first round (a power of two)"),
    "to_steps": (int, "stop when the student samples in this many steps (a power of two)"),
    "round_iterations": (int, "student updates per halving"),
    "pd_lr": (float, "Adam learning rate, annealed linearly to 0 within each round"),
    "pd_batch_size": (int, "batch size during distillation"),
    "weighting": (str, "x-MSE weight: truncated-snr = max(SNR, 1), or snr+1"),
    "pd_label_dropout": (float, "probability of distilling an example with the null label"),
}
# A round's settings: resuming its progress checkpoint with other values would mix two runs.
ROUND_KEYS = ("pd_batch_size", "round_iterations", "pd_lr", "weighting", "pd_label_dropout", "seed")
PD_PRESETS = {
    # Toy: batch 256 gives the same students as 512 (README) in about half the time.
    "toy": {"start_steps": 64, "to_steps": 1, "round_iterations": 2000, "pd_lr": 1e-3, "pd_batch_size": 256,
            "weighting": "truncated-snr", "pd_label_dropout": 1.0},
    "fmnist": {"start_steps": 256, "to_steps": 1, "round_iterations": 5000, "pd_lr": 1e-4, "pd_batch_size": 128,
               "weighting": "truncated-snr", "pd_label_dropout": 0.1},
    # The paper's CIFAR-10 values (docs/methods.md section 1): 8192 -> 1, 50k updates per halving, lr 5e-5, batch 128.
    "cifar10": {"start_steps": 8192, "to_steps": 1, "round_iterations": 50_000, "pd_lr": 5e-5,
                "pd_batch_size": 128, "weighting": "truncated-snr", "pd_label_dropout": 0.1},
}
WEIGHTINGS = ("truncated-snr", "snr+1")


# ----------------------------------------------------------------------------------------
# Alg. 2: the target and the loss
# ----------------------------------------------------------------------------------------


@no_grad_fp32()  # the teacher in fp32, also inside a bf16 step: the signal is below bf16's rounding
def pd_target(teacher, z_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, n_steps: int) -> torch.Tensor:
    """x_tilde: the x-prediction whose single DDIM step of the N-step student (N = n_steps) from
    z_t lands where two half-length teacher steps land.

    t (B,) lies on the student's N-step grid; at t = 1 alpha_t = 0, at the last interval
    t'' = 0 and x_tilde reduces to the teacher's second x_hat.
    """
    t1 = t - 0.5 / n_steps  # t'
    t2 = t - 1.0 / n_steps  # t''
    # Alg. 2: z_t' = alpha_t' x_hat(z_t) + sigma_t' (z_t - alpha_t x_hat(z_t)) / sigma_t
    z_t1 = ddim_step(teacher(z_t, t, labels), z_t, t, t1)
    # Alg. 2: z_t'' from z_t' the same way
    z_t2 = ddim_step(teacher(z_t1, t1, labels), z_t1, t1, t2)
    # Alg. 2 (PD Appendix G): x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
    return invert_ddim(z_t, z_t2, t, t2)


def snr_weight(t: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(lambda_t) for the x-MSE: max(SNR, 1) ("truncated-snr") or SNR + 1 ("snr+1")."""
    snr = torch.exp(logsnr(t))  # alpha_t^2 / sigma_t^2, logSNR clipped to [-20, 20]
    if weighting == "truncated-snr":
        return snr.clamp(min=1.0)
    if weighting == "snr+1":
        return snr + 1.0
    raise UserError(f"unknown --weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


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


# ----------------------------------------------------------------------------------------
# The ladder of rounds
# ----------------------------------------------------------------------------------------


def check_steps(config: dict) -> None:
    def power_of_two(n):
        return n >= 1 and n & (n - 1) == 0

    for name in ("start_steps", "to_steps"):
        if not power_of_two(config[name]):
            raise UserError(f"--{name.replace('_', '-')} must be a power of two (1, 2, 4, ...), got {config[name]}")
    if config["to_steps"] >= config["start_steps"]:
        raise UserError(f"--to-steps {config['to_steps']} must be below the teacher's {config['start_steps']} steps "
                        "(--start-steps)")
    if config["weighting"] not in WEIGHTINGS:
        raise UserError(f"unknown --weighting {config['weighting']!r}; choose one of {', '.join(WEIGHTINGS)}")
    if not 0.0 <= config["pd_label_dropout"] <= 1.0:
        raise UserError(f"--pd-label-dropout must be in [0, 1], got {config['pd_label_dropout']}")


def frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def new_student(teacher: Denoiser) -> Denoiser:
    """Alg. 2: the student starts as a copy of its teacher; no dropout while distilling."""
    return trainable_copy(teacher)


def load_student(path, config: dict, device, w_embedding: bool = False) -> Denoiser:
    """A saved student, frozen; `w_embedding` for guided distillation's w-conditioned students."""
    state = load_checkpoint(path, "student checkpoint")
    check_compatible(state["config"], config, TEACHER_KEYS, "student checkpoint", path)
    return frozen_denoiser(config, state["model"], device, w_embedding)


def train_round(teacher: Denoiser, n_steps: int, config: dict, device, out: Path, log: LogWriter,
                batch_loss=None, probe_sampler=None) -> Denoiser:
    """One halving: a student whose N = n_steps DDIM steps match the teacher's 2N.

    `batch_loss(student, teacher, x, labels, n_steps) -> (per-example loss, t)` and
    `probe_sampler(model, z, steps) -> x` default to Alg. 2's loss and unconditional DDIM;
    guided distillation passes versions that draw and pass a guidance weight w.
    """
    if batch_loss is None:
        def batch_loss(student, teacher, x, labels, n_steps):
            return pd_loss(student, teacher, x, labels, n_steps, config["weighting"], reduce=False)
    if probe_sampler is None:
        def probe_sampler(model, z, steps):
            return ddim_sample(model, z, steps, torch.full((z.shape[0],), model.null_label, device=z.device))
    seed_everything(config["seed"] + n_steps)  # rounds do not depend on what ran before them
    student = new_student(teacher)
    opt = torch.optim.Adam(student.parameters(), lr=config["pd_lr"])
    stream = BatchStream({**config, "batch_size": config["pd_batch_size"]}, device, config["seed"] + n_steps)
    iterations, step = config["round_iterations"], 0
    progress_path = out / "progress.pt"
    if progress_path.exists():
        state = load_checkpoint(progress_path, "distillation progress checkpoint")
        if state["n_steps"] == n_steps:
            check_compatible(state["config"], config, ROUND_KEYS, "distillation progress checkpoint", progress_path)
            student.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            stream.load_state_dict(state["stream"])
            set_rng_state(state["rng"])
            log.restore(state.get("log"))
            step = state["step"]
            print(f"resuming the {2 * n_steps} -> {n_steps} round at update {step}")

    # Diagnostic on shared noise: the student's N-step samples against the teacher's 2N-step ones.
    g = torch.Generator().manual_seed(config["eval_seed"])
    shape = (256, 2) if config["net"] == "mlp" else (16, config["in_ch"], 32, 32)
    z_probe = torch.randn(shape, generator=g).to(device)
    x_teacher = probe_sampler(teacher, z_probe, 2 * n_steps)

    bar = progress(range(step, iterations), f"PD {2 * n_steps}->{n_steps}", initial=step, total=iterations)
    for step in bar:
        for group in opt.param_groups:  # lr annealed linearly to 0 within the round
            group["lr"] = config["pd_lr"] * (1.0 - step / iterations)
        x, labels = stream.next()
        labels = drop_labels(labels, config["pd_label_dropout"], teacher.null_label)
        with autocast(config, device):
            per_example, t = batch_loss(student, teacher, x, labels, n_steps)
        loss = per_example.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config["grad_clip"])
        opt.step()
        step += 1
        if step % config["log_every"] == 0 or step == iterations:
            student.eval()
            gap = (probe_sampler(student, z_probe, n_steps) - x_teacher).pow(2).mean().item()
            student.train()
            log.write({"student_steps": n_steps, "step": step, "loss": loss.item(), "grad_norm": grad_norm.item(),
                       "student_vs_teacher_mse": gap, **loss_by_t_bucket(per_example, t)})
            bar.set_postfix(loss=f"{loss.item():.4f}", gap=f"{gap:.4f}")
        if step % config["ckpt_every"] == 0 and step < iterations:
            save_checkpoint(progress_path, {"kind": "pd_progress", "config": config, "n_steps": n_steps,
                                            "step": step, "model": student.state_dict(), "opt": opt.state_dict(),
                                            "stream": stream.state_dict(), "rng": rng_state(),
                                            "log": log.records()})
    bar.close()
    return frozen(student)


def progressive_distillation(config: dict, resume: bool = False) -> dict:
    """Alg. 2's outer loop: halve N from `start_steps` to `to_steps`, saving every student."""
    check_steps(config)
    device = pick_device(config["device"])
    out = Path(config["out_dir"]) / "pd"
    if out.exists() and any(out.glob("*.pt")) and not resume:
        raise UserError(f"{out} holds an earlier run; pass --resume to continue it, or --out-dir for a new run")
    teacher = load_teacher(config, device)  # frozen, eval mode, no grads; trained first if missing
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    metrics = read_json(metrics_path) if resume else {}
    metrics.update({"preset": config["preset"], "start_steps": config["start_steps"],
                    "teacher_ddim": read_json(teacher_dir(config) / "metrics.json")})
    students = metrics.setdefault("students", {})
    log = LogWriter(out / "log.jsonl", resume=resume)
    logged = []  # the log as it was when the last finished round ended
    n_steps = config["start_steps"] // 2  # N: the student's steps; its teacher takes 2N
    while n_steps >= config["to_steps"]:
        path = out / f"student_{n_steps}.pt"
        if path.exists():  # a finished round: its student is the next teacher
            teacher = load_student(path, config, device)
            saved = load_checkpoint(path)
            seconds, logged = saved["round_time_s"], saved.get("log")
        else:
            log.restore(logged)  # drop an interrupted round's lines (train_round restores its checkpoint's)
            start = time.perf_counter()
            teacher = train_round(teacher, n_steps, config, device, out, log)
            seconds, logged = time.perf_counter() - start, log.records()
            save_checkpoint(path, {"kind": "pd_student", "config": config, "steps": n_steps,
                                   "model": teacher.state_dict(), "round_time_s": seconds, "log": logged})
            (out / "progress.pt").unlink(missing_ok=True)
        if str(n_steps) not in students:  # also a round whose run died before its evaluation
            result = evaluate_student(teacher, n_steps, config, device, out)
            students[str(n_steps)] = {**result, "round_time_s": round(seconds, 1)}
            metrics["distill_time_s"] = round(sum(s["round_time_s"] for s in students.values()), 1)
            write_json(metrics_path, metrics)
            summary = f"  student {n_steps:>4} steps"
            if "off_mode" in result:
                summary += f": off-mode {result['off_mode']:.1%}  MMD {result['mmd']:.4f}"
            print(summary + f"  ({seconds:.0f} s)")
        n_steps //= 2
    log.plot(out / "loss.png", "progressive distillation: weighted x-MSE by t bucket")
    plot_quality(metrics, out / "quality_vs_steps.png")
    return metrics


def evaluate_student(student: Denoiser, steps: int, config: dict, device, out: Path) -> dict:
    results = evaluate_sampler(lambda z, c, n: ddim_sample(student, z, n, c), config, out / f"student_{steps}",
                               [steps], device, title="PD student ")
    return results[steps]


def plot_quality(metrics: dict, png: Path) -> None:
    """Students against the teacher's own DDIM at the same step counts (toy data)."""
    from matplotlib.figure import Figure

    teacher = metrics.get("teacher_ddim", {}).get("ddim", {})
    students = metrics.get("students", {})
    key = "off_mode" if any("off_mode" in m for m in students.values()) else "mmd"
    if not students or not any(key in m for m in students.values()):
        return
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for label, table, style in (("teacher DDIM", teacher, "o--"), ("PD student", students, "s-")):
        pts = sorted((int(k), v[key]) for k, v in table.items() if key in v)
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps (network calls)")
    ax.set_ylabel(key.replace("_", "-") + (" rate" if key == "off_mode" else ""))
    ax.set_title("progressive distillation: quality vs steps", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> None:
    config = parse_config(__doc__.split("\n\n")[0], PD_FIELDS, PD_PRESETS, argv=argv,
                          flags={"resume": "continue an interrupted ladder (mid-round included)"})
    resume = config.pop("resume")
    check_steps(config)
    print(f"progressive distillation, {config['preset']}: {config['start_steps']} -> {config['to_steps']} steps, "
          f"{config['round_iterations']} updates per halving")
    metrics = progressive_distillation(config, resume=resume)
    print(f"distilled in {metrics.get('distill_time_s')} s; students and metrics in {Path(config['out_dir']) / 'pd'}")


if __name__ == "__main__":
    run_cli(main)
