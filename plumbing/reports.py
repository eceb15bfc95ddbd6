"""Reports: what the method scripts measure, draw and write beside their training, kept out of
the method files so that those read as the papers' algorithms.

    progressive distillation   evaluate_pd_student, plot_pd_quality
    guided distillation        GuidedEvaluator, print_guided_round, plot_guided_quality
    DMD                        save_dm_view, DMDMonitor (its report: metrics.json), sampling_speed, plot_dmd_history
    DisBack                    compare_with_dmd, plot_disback_convergence

This module knows no method file: what is a method's own (its sampler, its label rule, its teacher) is
passed in by the script that is measured.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from common import Denoiser, ddim_sample, diffuse, guided
from plumbing.config import sample_shape
from plumbing.data import toy_dataset
from plumbing.folders import disback_dir, dmd_dir, teacher_dir
from plumbing.image_metrics import image_quality
from plumbing.metrics import (balanced_labels, describe, evaluate_sampler, in_batches, is_measured, picture_count,
                              quality_key, reference_metrics, sample_count, sampler_floor, stored_measurement,
                              write_measurement)
from plumbing.training import (fingerprint, read_json, samples_per_second, save_figure, save_image_grid,
                               save_scatter, write_json)

# ==== What every report shares ======================================================================================


def beside_teacher(result: dict, steps: int, teacher_ddim: dict) -> str:
    """A student's line with the teacher's DDIM at the same step count and at 256 steps, where measured."""
    key, line = quality_key(result), describe(result)
    refs = [f"{n}: {teacher_ddim[str(n)][key]:.4g}" for n in dict.fromkeys((steps, 64, 256))
            if key and key in teacher_ddim.get(str(n), {})]
    return line + (f"  (teacher DDIM {key} at {', '.join(refs)})" if refs else "")


class Stopwatch:
    """`with watch: ...` adds the block's wall time to `watch.seconds` (evaluation's share of a run)."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds

    def __enter__(self):
        self.tick = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self.tick


# ==== Progressive distillation ========================================================================================


def evaluate_pd_student(student: Denoiser, steps: int, config: dict, device, out: Path) -> dict:
    """The student's metrics (`evaluate_sampler`) and pictures, with the time they took (`eval_time_s`)."""
    with Stopwatch() as watch:
        result = evaluate_sampler(lambda z, c, n: ddim_sample(student, z, n, c), config, out / f"student_{steps}",
                                  [steps], device, title="PD student ",
                                  weights=f"ddim:{fingerprint(student.state_dict())}")[steps]
    return {**result, "eval_time_s": round(watch.seconds, 1)}


def print_pd_round(n_steps: int, result: dict, seconds: float, teacher_ddim: dict) -> None:
    print(f"  student {n_steps:>4} steps: {beside_teacher(result, n_steps, teacher_ddim)}  ({seconds:.0f} s)")


def plot_pd_quality(metrics: dict, png: Path) -> None:
    """Students against the teacher's own DDIM at the same step counts (toy data)."""
    from matplotlib.figure import Figure

    teacher = metrics.get("teacher_ddim", {}).get("ddim", {})
    students = metrics.get("students", {})
    key = next((quality_key(m) for m in students.values() if quality_key(m)), None)
    if key is None:
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
    ax.set_yscale("log" if key == "fd_classifier" else "linear")
    ax.set_title("progressive distillation: quality vs steps", fontsize=10)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png)


# ==== Guided distillation =============================================================================================


class GuidedEvaluator:
    """Samples a student at each w in `eval_ws` on the shared evaluation noise and measures it. Toy data:
    against the guided teacher's 256-step DDIM at that w (with that sampler's floor: a second draw of it).
    Images: the offline classifier's Frechet distance to the data and class accuracy (`eval_samples`
    class-balanced samples; pictures only above `fd_max_steps` steps). Also measures the guided
    teacher's own DDIM at the student's step count (images: at the last round's, and at 64 steps).

    `sample(student, z, labels, w, steps, sampler, generator) -> x` is the students' sampler (guided_distill.py)."""

    REFERENCE_STEPS = 256  # toy: the guided teacher's DDIM that defines "the target distribution" at each w
    IMAGE_REFERENCE_STEPS = 64  # images: the guided teacher's DDIM measured once per w, beside the students

    def __init__(self, teacher: Denoiser, config: dict, device, out: Path, sample, resume: bool = False):
        self.teacher, self.config, self.device, self.out, self.sample = teacher, config, device, out, sample
        self.toy = config["net"] == "mlp"
        n = config["eval_samples"]
        shape = (n, *sample_shape(config))
        g = torch.Generator().manual_seed(config["eval_seed"])
        self.z, self.z2 = (torch.randn(shape, generator=g) for _ in range(2))
        self.labels = balanced_labels(n, config["num_classes"])  # guidance needs a class
        self.mixture = toy_dataset(config["data"]) if config["data"] == "gaussians8" else None
        self.references = {}
        earlier = read_json(out / "metrics.json") if resume else {}  # what the run had measured before a resume
        self.teacher_rows, self.watch = earlier.get("teacher", {}), Stopwatch(earlier.get("eval_time_s", 0.0))

    def draw(self, sample, z: torch.Tensor, steps: int, measured: bool = True) -> torch.Tensor:
        """`sample(z, labels) -> x` on the evaluation noise: all of it where it is measured, else a picture's worth."""
        n = sample_count(self.config, steps) if measured else picture_count(self.config)
        return in_batches(sample, z[:n], self.labels[:n], self.device, n if self.toy else None)

    def guided_teacher(self, w: float, z: torch.Tensor, steps: int) -> torch.Tensor:
        teacher = guided(self.teacher, w, self.teacher.null_label)
        return self.draw(lambda z_b, c_b: ddim_sample(teacher, z_b, steps, c_b), z, steps)

    def reference(self, w: float):
        """The target distribution at w, and its floor from a second draw: both made once per w."""
        if w not in self.references:
            ref = self.guided_teacher(w, self.z, self.REFERENCE_STEPS)
            floor = sampler_floor(ref.numpy(), self.guided_teacher(w, self.z2, self.REFERENCE_STEPS).numpy())
            self.references[w] = (ref, floor)
        return self.references[w]

    def measure_teacher(self, w: float, steps: int) -> dict:
        """The guided teacher's DDIM at w; on images kept in the run folder's measurements.json (at w = 0 it
        is the teacher's own DDIM, which train_teacher.py has measured on the same noise)."""
        key = None
        if not self.toy and is_measured(self.config, steps):
            sampler = "ddim" if w == 0 else f"guided ddim w {w:g}"
            key, known = stored_measurement(self.config, self.device, f"{sampler}:{self.teacher.fingerprint}", steps,
                                            self.config["eval_samples"])
            if known is not None:
                return known
        result = self.measure(self.guided_teacher(w, self.z, steps), w)
        if key:
            write_measurement(self.config, key, result)
        return result

    def measure(self, x: torch.Tensor, w: float) -> dict:
        if not self.toy:  # against the data: guidance trades diversity for class fidelity, which FD shows
            measured = self.config["fd_max_steps"] > 0 and len(x) >= self.config["eval_samples"]
            return image_quality(self.config, self.device)(x, self.labels[:len(x)]) if measured else {}
        ref, floor = self.reference(w)
        return reference_metrics(x.numpy(), ref.numpy(), floor, self.mixture)

    def in_full(self, steps: int) -> bool:
        """Whether a student of `steps` steps is measured (with both samplers, and beside the guided teacher
        at its own step count): toy data at every round; images, where measuring 2000 samples at 4 values
        of w costs more than a round's training, at the last round only (the others get pictures)."""
        return self.toy or steps == self.config["to_steps"]

    def __call__(self, student: Denoiser, steps: int, samplers=None, folder: str | None = None) -> dict:
        """`samplers` default: both where `in_full(steps)`, otherwise DDIM alone."""
        samplers = samplers or (("ddim", "stochastic") if self.in_full(steps) else ("ddim",))
        with self.watch:
            return self._evaluate(student, steps, samplers, self.out / (folder or f"student_{steps}"))

    def _evaluate(self, student: Denoiser, steps: int, samplers, folder: Path) -> dict:
        ws = [w for w in self.config["eval_ws"] if self.config["w_min"] <= w <= self.config["w_max"]]
        if self.config["single_w"] is not None:
            ws = [self.config["single_w"]]  # the single-w baseline is measured at its own w
        results, panels = {sampler: {} for sampler in samplers}, {}
        full = self.in_full(steps)  # measured, or pictures only
        for w in ws:
            # The guided teacher at the student's steps (see in_full), and on images at 64 steps once per w.
            reference = [] if self.toy else [min(self.IMAGE_REFERENCE_STEPS, self.config["fd_max_steps"])]
            for n in {steps if full else 0, *reference}:
                if n and str(n) not in self.teacher_rows.get(f"{w:g}", {}):
                    self.teacher_rows.setdefault(f"{w:g}", {})[str(n)] = self.measure_teacher(w, n)
            for sampler in samplers:
                g = torch.Generator().manual_seed(self.config["eval_seed"] + 1)  # the stochastic sampler's noise
                x = self.draw(lambda z_b, c_b, w=w, sampler=sampler, g=g: self.sample(student, z_b, c_b, w, steps,
                                                                                    sampler, g), self.z, steps,
                              measured=full)
                results[sampler][f"{w:g}"] = self.measure(x, w) if full else {}
                if self.toy:
                    panels[f"w = {w:g}, {sampler}"] = x
                else:
                    save_image_grid(x[:picture_count(self.config)], folder / f"w{w:g}_{sampler}.png",
                                    nrow=self.config["num_classes"])
            if self.toy:
                panels[f"w = {w:g}, guided teacher {self.REFERENCE_STEPS}"] = self.reference(w)[0]
        if self.toy:
            save_scatter(panels, folder / "samples.png", ncols=len(samplers) + 1)
        return results


def print_guided_round(n_steps: int, result: dict) -> None:
    line = f"  student {n_steps:>4} steps"
    measured = False
    for sampler, per_w in result.items():
        keys = {quality_key(m) for m in per_w.values()} if isinstance(per_w, dict) and per_w else {None}
        if len(keys) == 1 and None not in keys:  # toy: MMD to the guided teacher; images: FD to the data
            key = "mmd" if all("mmd" in m for m in per_w.values()) else keys.pop()
            name, fmt = ("MMD", ".4f") if key == "mmd" else ("FD", ".4g")
            line += f"  {sampler} {name} " + " ".join(f"w{w}:{m[key]:{fmt}}" for w, m in per_w.items())
            measured = True
    print(line if measured else f"{line}: pictures only (images are measured at the last round)")


def plot_guided_quality(metrics: dict, png: Path) -> None:
    """Quality against steps, one panel per w: toy MMD to the guided teacher's 256-step samples, or the
    image FD to the data."""
    from matplotlib.figure import Figure

    students, teacher = metrics.get("students", {}), metrics.get("teacher", {})
    measured = [m for s in students.values() for m in s.get("ddim", {}).values()]
    key = "mmd" if any("mmd" in m for m in measured) else "fd_classifier"
    ws = sorted({w for s in students.values() for w in s.get("ddim", {}) if key in s["ddim"][w]}, key=float)
    if not ws:
        return
    fig = Figure(figsize=(3.2 * len(ws), 3.2))
    for ax, w in zip(fig.subplots(1, len(ws), squeeze=False)[0], ws):
        rows = {"guided teacher DDIM (2 calls/step)": (teacher.get(w, {}), "o--"),
                "student DDIM": ({k: s["ddim"][w] for k, s in students.items()}, "s-"),
                "student stochastic": ({k: s["stochastic"][w] for k, s in students.items() if "stochastic" in s},
                                       "^-")}
        for label, (table, style) in rows.items():
            pts = sorted((int(k), max(v[key], 1e-5)) for k, v in table.items() if key in v)
            if pts:
                ax.plot(*zip(*pts), style, label=label, ms=4)
        if key == "mmd":
            floor = next(iter(students.values()))["ddim"][w]["mmd_floor"]
            ax.axhline(max(floor, 1e-5), c="0.5", ls=":", lw=1, label="floor (teacher vs itself)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_title(f"w = {w}", fontsize=10)
    fig.axes[0].set_ylabel("MMD$^2$ to the guided teacher (256 steps)" if key == "mmd" else
                           "classifier FD to the data")
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, png)


# ==== DMD =============================================================================================================


def save_dm_view(generator, real_score, fake_score, config: dict, device, png: Path, generate, labels_of) -> None:
    """DMD2's debugging view: the generator's output x beside the real and fake scores'
    predictions from the same noised x_t (t = 0.25). Where they differ is where G is pushed.
    `generate(generator, z, labels, steps) -> x` and `labels_of(n, generator) -> labels` are DMD's (dmd.py)."""
    g = torch.Generator().manual_seed(config["eval_seed"] + 1)
    n = 500 if config["net"] == "mlp" else 8
    shape = sample_shape(config)
    z, labels = torch.randn(n, *shape, generator=g).to(device), labels_of(n, g).to(device)
    t = torch.full((n,), 0.25, device=device)
    generator.eval()
    with torch.no_grad():
        x = generate(generator, z, labels, config["steps"])
        x_t = diffuse(x, t, torch.randn(x.shape, generator=g).to(device))
        panels = {"generator x": x, "real score mu_real(x_t)": real_score(x_t, t, labels),
                  "fake score mu_fake(x_t)": fake_score(x_t, t, labels)}
    generator.train()
    if config["net"] == "mlp":
        save_scatter({k: v.cpu().numpy() for k, v in panels.items()}, png)
    else:
        save_image_grid(torch.cat(list(panels.values())), png, nrow=n)


class DMDMonitor:
    """`monitor(step, ...)`: the generator's metrics and sample pictures at an evaluation point, and
    DMD2's view of the two scores; the records accumulate in `history` (saved with the checkpoint).
    `monitor.report(loop, teacher)` writes metrics.json at the end. `sampler` is the generator that is
    evaluated (its EMA), `generate(generator, z, labels, steps) -> x` its K-step sampler and
    `labels_of(n, generator) -> labels` its label rule (dmd.py's `generate` and `sample_labels`)."""

    def __init__(self, config, out: Path, sampler, device, history: list, generate, labels_of):
        self.config, self.out, self.sampler, self.device, self.history = config, out, sampler, device, history
        self.generate, self.labels_of = generate, labels_of

    def __call__(self, step: int, generator=None, real_score=None, fake_score=None) -> str:
        folder, K, generate = self.out / f"eval_{step:07d}", self.config.steps, self.generate
        if generator is not None:
            save_dm_view(generator, real_score, fake_score, self.config, self.device, folder / "dm_view.png",
                         generate, self.labels_of)
        self.sampler.eval()
        result = evaluate_sampler(lambda z, c, n: generate(self.sampler, z, c, n), self.config, folder, [K],
                                  self.device, title=f"DMD update {step}: ",
                                  weights=f"generator {K}:{fingerprint(self.sampler.state_dict())}")[K]
        self.sampler.train()
        self.history.append({"step": step, **result})
        pictures = f"  (samples in {folder})" if self.config.net != "mlp" else ""
        return f"  update {step}: {describe(result)}{pictures}"

    def report(self, loop, teacher) -> dict:
        """metrics.json: the final generator beside the teacher's DDIM, the convergence history, the
        sampling speed (samples/s, generator K steps vs the teacher's 256-step DDIM), and the time spent
        training (`loop.seconds`) and evaluating (`loop.eval_seconds` and this report)."""
        config, history = self.config, self.history
        teacher_metrics = read_json(teacher_dir(config) / "metrics.json")
        with Stopwatch(loop.eval_seconds) as watch:
            speed = sampling_speed(self.sampler, teacher, config, self.device, self.generate)
        metrics = {"preset": config["preset"], "steps": config["steps"], "reg_weight": config["reg_weight"],
                   "fake_updates": config["fake_updates"], "config": config.as_dict(), "teacher": teacher.fingerprint,
                   "train_time_s": round(loop.seconds, 1),
                   "eval_time_s": round(watch.seconds, 1),
                   "final": history[-1], "history": history, "teacher_ddim": teacher_metrics.get("ddim", {}),
                   "samples_per_s": speed}
        write_json(self.out / "metrics.json", metrics)
        plot_dmd_history(history, teacher_metrics.get("ddim", {}), self.out / "convergence.png", config)
        return metrics


@torch.no_grad()
def sampling_speed(sampler, teacher, config: dict, device, generate, teacher_steps: int = 256, timed_steps: int = 8,
                   repeats: int = 3) -> dict:
    """Samples per second on one batch, synchronised on CUDA: the generator's K steps
    (`generate(sampler, z, labels, steps)`) against the teacher's `teacher_steps`-step DDIM, timed in turns
    (best of `repeats` each, after a warm-up) so that both see the same load, whatever else the machine does
    (the ratio is of wall-clock rates: DDIM's own arithmetic per step can put it a little above the ratio of
    calls). DDIM costs one network call per step, so `timed_steps` steps are timed and the rate scaled by
    timed_steps / teacher_steps (on images 256 steps would cost minutes on a CPU)."""
    n = 2000 if config["net"] == "mlp" else 64
    shape = sample_shape(config)
    z = torch.randn(n, *shape, device=device)
    labels = torch.full((n,), config["num_classes"], device=device)
    timed = min(teacher_steps, timed_steps)
    samplers = {"generator": lambda: generate(sampler, z, labels, config["steps"]),
                "teacher": lambda: ddim_sample(teacher, z, timed, labels)}
    sampler.eval()
    rates = {name: 0.0 for name in samplers}
    for _ in range(repeats):
        for name, fn in samplers.items():  # in turns: generator, teacher, generator, ...
            rates[name] = max(rates[name], samples_per_second(fn, n, device))
    sampler.train()
    gen, ddim = rates["generator"], rates["teacher"] * timed / teacher_steps
    return {"batch": n, "generator": round(gen, 1), f"teacher_ddim_{teacher_steps}": round(ddim, 1),
            "speedup": round(gen / ddim, 1)}


def plot_dmd_history(history: list, teacher: dict, png: Path, config: dict) -> None:
    from matplotlib.figure import Figure

    key = quality_key(history[-1])
    if key is None:
        return
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    ax.plot([h["step"] for h in history if key in h], [h[key] for h in history if key in h], "o-",
            label=f"DMD {config['steps']}-step")
    for steps, style in (("1", ":"), ("4", "--"), ("256", "-")):
        if steps in teacher and key in teacher[steps]:
            ax.axhline(teacher[steps][key], ls=style, c="0.4", lw=1, label=f"teacher DDIM {steps}")
    save_convergence(fig, ax, key, png)


def print_dmd_summary(config, metrics: dict, folder: Path) -> None:
    final = beside_teacher(metrics["final"], config.steps, metrics["teacher_ddim"])
    print(f"{config.steps}-step generator: {final}")
    print(f"trained in {metrics['train_time_s']} s (evaluation {metrics['eval_time_s']} s more); "
          f"{metrics['samples_per_s']['speedup']}x the samples/s of the teacher's 256-step DDIM; "
          f"everything in {folder}")


def save_convergence(fig, ax, key: str, png: Path) -> None:
    """A metric against generator updates, log scale (DMD's and DisBack's convergence plots)."""
    ax.set_yscale("log")
    ax.set_xlabel("generator updates")
    ax.set_ylabel(key.replace("_", "-"))
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, png)


# ==== DisBack =========================================================================================================


def compare_with_dmd(config: dict, metrics: dict, keys) -> dict:
    """DisBack's run against plain DMD's in dmd_dir(config) (the same --tag), compared only like with like:
    the same teacher and the same `keys` of the config (DMD's settings: budget, learning rates, evaluation
    cadence; the seed). Then: the first evaluated update at which each reaches the worse of the two final
    values, and a plot. Always says which DMD run it read (`dmd_run`), and, where it compared none, why."""
    folder = dmd_dir(config)
    dmd_metrics = read_json(folder / "metrics.json")
    why = dmd_mismatch(config, metrics, dmd_metrics, keys)
    key = quality_key(metrics["final"])
    if why is None and (key is None or key not in dmd_metrics["final"]):
        why = "the two runs share no measurement"
    if why is not None:
        return {"dmd_run": str(folder), "compared": False, "why": why}
    curves = {"DMD": dmd_metrics["history"], "DisBack": metrics["history"]}
    target = max(curves["DMD"][-1][key], curves["DisBack"][-1][key])
    reached = {name: next((h["step"] for h in hist if h[key] <= target), None) for name, hist in curves.items()}
    plot_disback_convergence(curves, key, metrics["teacher_reached_at"], disback_dir(config) / "convergence_vs_dmd.png")
    return {"dmd_run": str(folder), "compared": True, "metric": key, "target": target, "updates_to_target": reached,
            "final": {name: hist[-1][key] for name, hist in curves.items()},
            "disback_recording_updates": config["record_iterations"] if config["snapshots"] else 0}


def dmd_mismatch(config: dict, metrics: dict, dmd_metrics: dict, keys) -> str | None:
    """Why plain DMD's metrics.json is not this run's like (None: it is)."""
    if not dmd_metrics:
        tagged = ("--tag", config["tag"]) if config["tag"] else ()
        return (f"there is no finished DMD run in {dmd_dir(config)}; make one with the same settings (`"
                f"{config.command('dmd.py', '--steps', str(config['steps']), '--recipe', config['recipe'], *tagged)}"
                " ...`)")
    if "config" not in dmd_metrics:
        return "its metrics.json does not record its settings (an older version wrote it); run it again"
    if dmd_metrics.get("teacher") != metrics["teacher"]:
        return f"it was trained from another teacher (weights {dmd_metrics.get('teacher')} vs {metrics['teacher']})"
    saved = {**getattr(config, "ADDED", {}), **dmd_metrics["config"]}  # a field added since: what the run had
    diff = [f"{k}={saved.get(k)!r} (DisBack: {config[k]!r})" for k in keys if saved.get(k) != config[k]]
    return f"its settings differ: {', '.join(diff)}" if diff else None


def plot_disback_convergence(curves: dict, key: str, teacher_reached_at: int, png: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    for name, hist in curves.items():
        ax.plot([h["step"] for h in hist], [h[key] for h in hist], "o-", ms=3, label=name)
    ax.axvline(teacher_reached_at, c="0.5", ls=":", lw=1, label="DisBack reaches the teacher")
    save_convergence(fig, ax, key, png)

