"""Compare every method on quality, steps and speed: one command, one table, one plot.

Loads the preset's teacher and every student it finds in runs/<preset>/ (progressive
distillation's rounds, guided distillation's rounds, DMD and DisBack generators), samples each
at the step counts it supports on the shared evaluation noise, and writes

    runs/<preset>/results.md           method, steps, network calls per sample, quality, samples/s
    runs/<preset>/quality_vs_steps.png quality against network calls, one line per method
    runs/<preset>/side_by_side.png     images: the same noise and labels through each method, one row each
    runs/<preset>/evaluation/          the samples behind every row

It trains nothing: a method without a checkpoint is listed as missing, with the command that
makes it. Toy rows use `plumbing.metrics.toy_metrics` on the same noise as the scripts' own metrics.json,
so the numbers are the same. Guided students are the exception: their script measures them
against the guided teacher, this table against the data, at `--guided-w` (default 0) with
class-balanced labels. Image rows use the Frechet distance in the feature space of a
small classifier trained once per data set (`plumbing/image_metrics.py`; not comparable with Inception
FID), that classifier's accuracy on class-conditional samples, and with `--inception`
torchmetrics' Inception FID. Speed: samples/s on one batch of `--speed-batch` for every
method, after a warm-up, synchronised on CUDA, best of three.

    python evaluate.py --preset toy
    python evaluate.py --preset fmnist --num-samples 10000
    python evaluate.py --preset cifar10 --inception          # 50k samples, Inception FID
"""

from __future__ import annotations

import plumbing.interrupt  # noqa: F401  (first: Ctrl-C while torch loads is one line)
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from common import Denoiser, ddim_sample
from dmd import generate
from guided_distill import sample
from plumbing import distributed
from plumbing.config import NetworkConfig, parse_config, sample_shape
from plumbing.errors import UserError, require
from plumbing.image_metrics import image_quality
from plumbing.metrics import balanced_labels, evaluate_sampler
from plumbing.networks import frozen_denoiser
from plumbing.pretrained import is_pretrained
from plumbing.training import (check_compatible, fingerprint, load_checkpoint, pick_device, prepare_network, run_cli,
                               samples_per_second, save_figure, seeded_rng, write_text)
from train_teacher import TeacherConfig, load_teacher, require_null_label


@dataclass
class EvalConfig(TeacherConfig):
    """The comparison: what is sampled, how many, and how speed is measured"""

    num_samples: int = 50_000         # samples per row (toy: the scripts' eval_samples, so the numbers match)
    speed_batch: int = 64             # batch size of the samples/s measurement, the same for every method
    teacher_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 64, 256])  # the teacher's DDIM steps
    guided_w: float = 0.0             # guidance weight of guided students (0: conditional, like the data)

    PRESETS: ClassVar[dict] = {
        "toy": dict(num_samples=2000, speed_batch=2000, teacher_steps=[1, 2, 4, 8, 16, 64, 256]),
        "fmnist16": dict(num_samples=2000, teacher_steps=[1, 2, 4, 8, 16, 64, 256]),
        "fmnist": dict(num_samples=10_000),
    }

    def check(self) -> None:
        super().check()
        require(self.num_samples >= 2 and self.speed_batch >= 1,
                "--num-samples must be at least 2 and --speed-batch at least 1")
        require(all(n >= 1 for n in self.teacher_steps), f"--teacher-steps must all be at least 1, got "
                f"{' '.join(map(str, self.teacher_steps))}")


NETWORK_KEYS = NetworkConfig.network_keys()  # what every student must share with the teacher
METHODS = {  # name: (folder glob, the script and flags that make it)
    "PD": ("pd", ("progressive_distill.py",)),
    "guided": ("guided", ("guided_distill.py",)),
    "DMD": ("dmd*_*step*", ("dmd.py", "--steps", "1")),
    "DisBack": ("disback_*step*", ("disback.py", "--steps", "1")),
}


@dataclass
class Row:
    method: str
    steps: int
    calls: int  # network calls per sample
    sample: object  # (z, labels, steps) -> x
    source: str
    weights: str | None = None  # the sampler and its weights' fingerprint: a script's own measurement is re-used
    conditional: bool = False  # class-balanced labels also on toy data (guided students need a class)
    metrics: dict = field(default_factory=dict)


# ==== Finding the students ============================================================================================


def ddim_sampler(model):
    return lambda z, c, n: ddim_sample(model, z, n, c)


def guided_sampler(model, w: float):
    """The student at w with the labels it is given (class-balanced ones: its Row is `conditional`); w = 0 is the
    conditional model, whose class mixture is the data."""
    return lambda z, c, n: sample(model, z, c, w, n)


def generator_sampler(model):
    return lambda z, c, n: generate(model, z, c, n)


def prepared(model, config: EvalConfig, device):
    """Students measured as the teacher is (channels_last on CUDA and the CPU), so that speed ratios are fair."""
    prepare_network(model, config, device, compile=False)
    return model


def lineage(state: dict, teacher: Denoiser, path: Path) -> str:
    """'' for a student of this teacher; otherwise a mark for its row (and a printed line): the student was
    distilled from other weights (another teacher, or this one before it trained further), or is older than the
    record."""
    own = state.get("teacher")
    if own == teacher.fingerprint:
        return ""
    mark = " [teacher not recorded]" if own is None else " [another teacher]"
    print(f"note: {path} was distilled from " + ("a teacher it does not record" if own is None else
          f"other teacher weights ({own}, not {teacher.fingerprint})") + "; its row is marked" + mark)
    return mark


def find_rows(config: EvalConfig, teacher: Denoiser, device) -> tuple[list[Row], list[str]]:
    """Every sampler there is, and the methods that have no checkpoint yet."""
    out = Path(config.out_dir)
    rows = [Row("teacher DDIM", n, n, ddim_sampler(teacher), config.teacher, f"ddim:{teacher.fingerprint}")
            for n in config.teacher_steps]
    missing = []
    for method, (pattern, command) in METHODS.items():
        found = []
        if method in ("PD", "guided"):
            for folder in sorted(out.glob(pattern + ("*" if method == "guided" else ""))):
                paths = sorted(folder.glob("student_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
                for path in paths:
                    state = load_checkpoint(path, f"{method} student")
                    check_compatible(state["config"], config, NETWORK_KEYS, f"{method} student", path)
                    n, trained = state["steps"], state["config"]
                    mark = lineage(state, teacher, path)
                    if method == "PD":
                        model = prepared(frozen_denoiser(config, state["model"], device), config, device)
                        found.append(Row("PD" + mark, n, n, ddim_sampler(model), str(path),
                                         f"ddim:{fingerprint(model.state_dict())}"))
                        continue
                    w = config.guided_w
                    if not trained["w_min"] <= w <= trained["w_max"]:
                        missing.append(f"{folder.name}: trained for w in [{trained['w_min']:g}, {trained['w_max']:g}]"
                                       f", not --guided-w {w:g}")
                        break
                    model = prepared(frozen_denoiser(config, state["model"], device, w_embedding=True), config, device)
                    fn = guided_sampler(model, w)
                    single = "" if trained.get("single_w") is None else ", single-w"
                    found.append(Row(f"guided (w = {w:g}{single}){mark}", n, n, fn, str(path), conditional=True))
        else:
            for folder in sorted(out.glob(pattern)):
                path = folder / "checkpoint.pt"
                if not path.exists():
                    continue
                state = load_checkpoint(path, f"{method} checkpoint")
                check_compatible(state["config"], config, NETWORK_KEYS, f"{method} checkpoint", path)
                ema = state.get("ema")
                model = prepared(frozen_denoiser(config, ema["model"] if ema else state["generator"], device), config,
                                 device)
                k, tag = state["config"]["steps"], state["config"].get("tag")
                fn = generator_sampler(model)
                recipe = state["config"].get("recipe", "dmd")  # DMD2's recipe names the row: DMD2, DisBack (DMD2)
                name = ("DMD2" if method == "DMD" and recipe == "dmd2" else
                        f"{method} (DMD2)" if recipe == "dmd2" else method) + (f" ({tag})" if tag else "")
                unfinished = state["step"] < state["config"]["dmd_iterations"]
                name += (f" [update {state['step']}]" if unfinished else "") + lineage(state, teacher, path)
                found.append(Row(name, k, k, fn, str(path),
                                 f"generator {k}:{fingerprint(model.state_dict())}"))
        if found:
            rows += found
        elif method == "guided" and is_pretrained(config):
            missing.append("guided: not possible (it needs a class-conditional teacher with a null label)")
        elif not any(m.startswith(pattern) for m in missing):
            missing.append(f"{method}: missing (make it with `{config.command(*command)}`)")
    return rows, missing


# ==== Measuring =======================================================================================================


def slug(row: Row) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in row.method).strip("_") + f"_{row.steps}"


def evaluate_all(config: EvalConfig) -> dict:
    if config.net == "mlp":  # toy rows are unconditional: the null label
        require_null_label(config, "the toy rows, which sample the null label, cannot be measured")
    device = pick_device(config.device)
    known = is_pretrained(config) or Path(config.teacher).exists()
    teacher = load_teacher(config, device, train_if_missing=False) if known else None
    if teacher is None:
        raise UserError(f"no teacher at {config.teacher}; train it with `{config.command('train_teacher.py')}` "
                        "(evaluate.py trains nothing)")
    start = time.perf_counter()
    rows, missing = find_rows(config, teacher, device)
    toy = config.net == "mlp"
    # Images: the offline classifier's Frechet distance and class accuracy (plumbing/image_metrics.py), on
    # num_samples class-balanced samples; an Inception FID that was asked for but is unavailable is an error.
    quality = None if toy else image_quality(config, device, strict=True)
    measured = {**config, "eval_samples": config.num_samples, "fd_max_steps": 10**9}
    out = Path(config.out_dir)
    shape = sample_shape(config)
    g = torch.Generator().manual_seed(config.eval_seed + 2)
    z_speed = torch.randn(config.speed_batch, *shape, generator=g).to(device)  # the same batch for every method
    c_speed = (torch.full((len(z_speed),), config.num_classes) if toy
               else balanced_labels(len(z_speed), config.num_classes)).to(device)
    for row in rows:
        folder = out / "evaluation" / slug(row)
        row.metrics = evaluate_sampler(row.sample, measured, folder, [row.steps], device,
                                       title=f"{row.method} ", weights=row.weights, balanced=row.conditional)[row.steps]
        row.metrics["samples_per_s"] = samples_per_second(lambda r=row: r.sample(z_speed, c_speed, r.steps),
                                                          len(z_speed), device, repeats=3)
        print(f"  {row.method:<24} {row.steps:>4} steps  " + "  ".join(
            f"{k} {v:.4g}" for k, v in row.metrics.items() if isinstance(v, float)))
    if not toy:
        side_by_side(config, rows, out / "side_by_side.png", device)
    seconds = time.perf_counter() - start
    write_results(config, rows, missing, device, seconds, quality)
    plot_quality(config, rows, out / "quality_vs_steps.png")
    return {"rows": [{"method": r.method, "steps": r.steps, "calls": r.calls, "source": r.source, **r.metrics}
                     for r in rows], "missing": missing, "seconds": seconds}


# ==== The table and the plot ==========================================================================================


def write_results(config: EvalConfig, rows: list[Row], missing: list[str], device, seconds: float,
                  quality) -> None:
    toy = config.net == "mlp"
    ref = next((r for r in rows if r.method == "teacher DDIM" and r.steps == 256), None)
    ref_speed = ref.metrics["samples_per_s"] if ref else None
    measured_by = config.command("evaluate.py", fields=type(config).own_fields())  # its own flags too (--num-samples)
    lines = [f"# Results: preset `{config.preset}`", "",
             f"Measured by `{measured_by}` on {device_name(device)} in "
             f"{seconds:.0f} s.", "",
             f"Protocol: {config.num_samples} samples per row from the shared evaluation noise "
             f"(seed {config.eval_seed}); " +
             ("unconditional (null label); metrics against fresh data of the same size (seed 12345), "
              "with its data-vs-data floor. " if toy else
              "class-balanced labels; Frechet distance in the 128 features of this project's classifier "
              f"(test accuracy {quality.info['test_accuracy']:.1%}; not comparable with Inception FID), and "
              "its accuracy on the samples' requested classes. ") +
             f"Speed: samples/s on one batch of {config.speed_batch} for every method, after a warm-up, best of 3"
             f"{', synchronised' if device.type == 'cuda' else ''}. Guided students at w = {config.guided_w:g}.",
             ""]
    if toy:
        lines += ["| method | steps | network calls / sample | off-mode | MMD | W2 | samples/s | "
                  "speed vs teacher 256 |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            m = r.metrics
            off = f"{m['off_mode']:.1%}" if "off_mode" in m else ""
            lines.append(f"| {r.method} | {r.steps} | {r.calls} | {off} | {m['mmd']:.4f} | {m['w2']:.3f} | "
                         f"{m['samples_per_s']:.0f} | {speed_ratio(m, ref_speed)} |")
        floor = rows[0].metrics
        lines += ["", f"Data-vs-data floor: MMD {floor['mmd_floor']:.4f}, W2 {floor['w2_floor']:.3f}" +
                  (f", off-mode {floor['off_mode_floor']:.1%}" if "off_mode_floor" in floor else "") + "."]
    else:
        keys = [k for k in ("fd_classifier", "fid_inception") if k in rows[0].metrics]
        head = " | ".join(f"{k} | {k} / teacher 256" for k in keys)
        lines += [f"| method | steps | network calls / sample | {head} | class accuracy | samples/s | "
                  "speed vs teacher 256 |", "|---|---|---|" + "---|" * (2 * len(keys)) + "---|---|---|"]
        for r in rows:
            cells = " | ".join(f"{r.metrics[k]:.2f} | " + (f"{r.metrics[k] / ref.metrics[k]:.2f}" if ref else "")
                               for k in keys)
            lines.append(f"| {r.method} | {r.steps} | {r.calls} | {cells} | {r.metrics['accuracy']:.1%} | "
                         f"{r.metrics['samples_per_s']:.1f} | {speed_ratio(r.metrics, ref_speed)} |")
    if missing:
        lines += ["", "Missing:", ""] + [f"- {m}" for m in missing]
    path = Path(config.out_dir) / "results.md"
    write_text(path, "\n".join(lines) + "\n")
    print(f"table: {path}")


def speed_ratio(m: dict, ref_speed) -> str:
    return f"{m['samples_per_s'] / ref_speed:.0f}x" if ref_speed else ""


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


SIDE_BY_SIDE = [("teacher DDIM", 64), ("teacher DDIM", 4), ("PD", 4), ("guided", 4), ("DMD", 1), ("DisBack", 1)]


@torch.no_grad()
def side_by_side(config: EvalConfig, rows: list[Row], png: Path, device, per_class: int = 2) -> None:
    """One row of samples per method in SIDE_BY_SIDE that was found, all from the same noise and labels
    (every class in turn, `per_class` times over), so that differences are the methods' own."""
    from matplotlib.figure import Figure

    picked = [next((r for r in rows if r.method.split(" [")[0].startswith(name) and r.steps == steps), None)
              for name, steps in SIDE_BY_SIDE]
    picked = [r for r in picked if r is not None]
    if not picked or not distributed.is_main():
        return
    g = torch.Generator().manual_seed(config.eval_seed + 3)
    n = per_class * config.num_classes
    z = torch.randn(n, *sample_shape(config), generator=g).to(device)
    labels = balanced_labels(n, config.num_classes).to(device)  # (n,)
    fig = Figure(figsize=(0.5 * n + 1.6, 0.55 * len(picked) + 0.3))
    axes = fig.subplots(len(picked), 1, squeeze=False)[:, 0]
    for ax, row in zip(axes, picked):
        with seeded_rng(config.eval_seed, device):  # DMD2's K-step generator draws noise between steps
            x = row.sample(z, labels, row.steps).float().cpu().clamp(-1, 1)  # (n, C, H, W)
        strip = torch.cat(list(x * 0.5 + 0.5), dim=-1)  # (C, H, n * W): the samples side by side
        ax.imshow(strip.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{row.method.split(' (')[0]}\n{row.steps} step{'s' * (row.steps > 1)}", rotation=0,
                      ha="right", va="center", fontsize=8)
    fig.suptitle(f"{config.preset}: the same noise and labels through each method", fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)


def plot_quality(config: EvalConfig, rows: list[Row], png: Path) -> None:
    from matplotlib.figure import Figure

    toy = config.net == "mlp"
    keys = (["off_mode", "mmd"] if "off_mode" in rows[0].metrics else ["mmd"]) if toy else ["fd_classifier"]
    fig = Figure(figsize=(5.2 * len(keys), 3.8))
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
        methods = dict.fromkeys(r.method for r in rows)
        for i, method in enumerate(methods):
            pts = sorted((r.calls, max(r.metrics[key], 1e-4)) for r in rows if r.method == method)
            style = "o--" if method == "teacher DDIM" else ("s-" if len(pts) > 1 else "*")
            ax.plot(*zip(*pts), style, color="0.3" if method == "teacher DDIM" else f"C{i}", label=method,
                    ms=6 if len(pts) > 1 else 12)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("network calls per sample")
        ax.set_ylabel(key.replace("_", " "))
        ax.legend(fontsize=7)
    fig.suptitle(f"{config.preset}: quality against network calls (evaluate.py)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, png)


def main(argv=None) -> None:
    config, _ = parse_config(EvalConfig, __doc__.split("\n\n")[0], argv)
    result = evaluate_all(config)
    print(f"{len(result['rows'])} rows, {len(result['missing'])} methods missing, {result['seconds']:.0f} s")


if __name__ == "__main__":
    run_cli(main, interrupted="the image measurements already made are kept (measurements.json in the run folder); "
                              "rerun the command and it measures only the rest")
