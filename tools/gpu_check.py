"""The GPU check: turn one GPU into this project's first image numbers in about 8 minutes.

Writes `docs/results-gpu.md` (tables), `docs/results-gpu.json` (every number) and `docs/gpu/`
(sample grids), with the machine, the versions, the command and the wall time of each part:

1. Speed of the cifar10 network (DDPM's UNet, 35.7M parameters) on random images: updates/s and
   peak memory of a teacher step at batch 128 in fp32, bf16 autocast, and bf16 + torch.compile;
   of a progressive-distillation update (two teacher DDIM steps, then the student) and a guided
   stage-one update (two teacher calls), both at batch 128 in bf16; and of a DMD update at the
   preset's batch, 392, with its three networks (generator, fake score, frozen real score) in bf16.
2. The fmnist pipeline at a budget: a teacher, progressive distillation from 32 down to 4 steps,
   a one-step DMD generator, and `evaluate.py`, each given a share of the time. Its update counts
   follow from the updates/s measured on the fmnist network first, so the check fits on any GPU;
   the numbers say what that budget reaches, not what the full presets reach.

    python tools/gpu_check.py                              # on a GPU, about 8 minutes
    python tools/gpu_check.py --minutes 4                  # a smaller budget
    python tools/gpu_check.py --tiny --device cpu --docs /tmp/docs --out-dir /tmp/run   # what the tests run

Fashion-MNIST is read from `--data-dir`, then from Debian's package, then downloaded; on a
machine without internet, carry its four .gz files in `--data-dir`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import plumbing.interrupt  # noqa: E402, F401  (first: Ctrl-C while torch loads is one line)

import torch  # noqa: E402

import dmd  # noqa: E402
import evaluate  # noqa: E402
import guided_distill  # noqa: E402
import progressive_distill  # noqa: E402
import train_teacher  # noqa: E402
from common import Denoiser, diffusion_loss, trainable_copy  # noqa: E402
from plumbing.config import check_writable, sample_shape  # noqa: E402
from plumbing.errors import UserError, require  # noqa: E402
from plumbing.networks import build_network  # noqa: E402
from plumbing.training import autocast, optimizer_step, pick_device, prepare_network, run_cli  # noqa: E402

# Shares of the budget (the rest is start-up, evaluation and the tables).
SPEED_SHARE, TEACHER_SHARE, PD_SHARE, DMD_SHARE = 0.2, 0.22, 0.1, 0.1
TINY_NET = dict(channels=16, ch_mult=[1, 2], num_res_blocks=1, attn_res=[16])  # --tiny: seconds on a CPU


# ==== Part 1: updates/s and peak memory ===============================================================================


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(update, device, seconds: float, warmup: int = 3) -> dict:
    """Updates/s of `update()` after `warmup` calls (compilation, caches), timed for about `seconds`
    (at least 3 updates), synchronised on CUDA; the peak memory of the timed updates."""
    for _ in range(warmup):
        update()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        update()
        n += 1
        if n % 5 == 0:
            synchronize(device)
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"updates_per_s": n / elapsed, "updates": n, "seconds": round(elapsed, 2),
            "peak_memory_gib": None if peak is None else round(peak, 2)}


def random_batch(config, batch: int, device):
    x = torch.randn(batch, *sample_shape(config), device=device).clamp(-1, 1)
    return x, torch.randint(config.num_classes, (batch,), device=device)


def teacher_update(config, device, batch: int):
    """Alg. 1's step of a freshly built teacher (Adam, the preset's clip)."""
    model = Denoiser(build_network(config).to(device)).train()
    prepare_network(model, config, device, compile=config.compile)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    x, labels = random_batch(config, batch, device)

    def update():
        with autocast(config, device):
            loss = diffusion_loss(model, x, labels)
        optimizer_step(opt, loss, model, config.grad_clip)

    return update


def frozen_teacher(config, device) -> Denoiser:
    teacher = Denoiser(build_network(config).to(device)).eval().requires_grad_(False)
    prepare_network(teacher, config, device, compile=False)
    return teacher


def pd_update(config, device, batch: int):
    """One progressive-distillation update at N = 4 (the cost does not depend on N)."""
    teacher = frozen_teacher(config, device)
    student = trainable_copy(teacher)
    opt = torch.optim.Adam(student.parameters(), lr=config.pd_lr)
    x, labels = random_batch(config, batch, device)

    def update():
        with autocast(config, device):
            loss = progressive_distill.pd_loss(student, teacher, x, labels, 4, config.weighting)
        optimizer_step(opt, loss, student, config.grad_clip)

    return update


def guided_update(config, device, batch: int):
    """One guided stage-one update: the guided teacher's two calls, then the w-conditioned student."""
    teacher = frozen_teacher(config, device)
    student = guided_distill.new_w_student(teacher)
    opt = torch.optim.Adam(student.parameters(), lr=config.stage1_lr)
    x, labels = random_batch(config, batch, device)

    def update():
        w = guided_distill.sample_w(batch, config, device)
        with autocast(config, device):
            loss = guided_distill.guided_loss(student, teacher, x, labels, w, config.weighting)
        optimizer_step(opt, loss, student, config.grad_clip)

    return update


def dmd_update(config, device, batch: int):
    """One DMD update: `fake_updates` fake-score steps, then the generator's step on the distribution-
    matching loss plus a pseudo-Huber regression on random pairs (LPIPS would need a download)."""
    config = config.replace(dmd_batch_size=batch, reg_loss="pseudo-huber")
    teacher = frozen_teacher(config, device)
    generator, fake_score = trainable_copy(teacher), trainable_copy(teacher)
    gen_opt, fake_opt = dmd.adamw(generator, config.gen_lr), dmd.adamw(fake_score, config.fake_lr)
    n = 4 * batch
    pairs = {"z": torch.randn(n, *sample_shape(config)), "labels": torch.randint(config.num_classes, (n,)),
             "y": torch.randn(n, *sample_shape(config)).clamp(-1, 1)}

    def update():
        for _ in range(config.fake_updates):
            z, labels = dmd.noise_and_labels(config, device)
            dmd.fake_score_update(fake_score, fake_opt, generator, z, labels, config)
        z, labels = dmd.noise_and_labels(config, device)
        dmd.generator_update(generator, gen_opt, teacher, fake_score, z, labels, pairs, config)

    return update


def speed_part(args, device, seconds: float, network: dict) -> list[dict]:
    """Every update of part 1, with its settings; compile only on CUDA."""
    batch, dmd_batch = (4, 4) if args.tiny else (128, 392)
    base = dict(device=str(device), **network)
    rows = []
    cases = [("teacher step", teacher_update, train_teacher.TeacherConfig, batch, dict(amp=False), "fp32"),
             ("teacher step", teacher_update, train_teacher.TeacherConfig, batch, dict(amp=True), "bf16"),
             ("teacher step", teacher_update, train_teacher.TeacherConfig, batch, dict(amp=True, compile=True),
              "bf16 + compile"),
             ("PD update", pd_update, progressive_distill.PDConfig, batch, dict(amp=True), "bf16"),
             ("guided stage-one update", guided_update, guided_distill.GuidedConfig, batch, dict(amp=True), "bf16"),
             ("DMD update (3 networks)", dmd_update, dmd.DMDConfig, dmd_batch, dict(amp=True), "bf16")]
    for name, make, cls, n, precision, label in cases:
        if precision.get("compile") and device.type != "cuda":
            rows.append({"update": name, "precision": label, "batch": n, "skipped": "torch.compile: CUDA only"})
            continue
        config = cls.from_preset("cifar10", **base, **precision)
        torch.manual_seed(0)
        result = measure(make(config, device, n), device, seconds)
        millions = sum(p.numel() for p in build_network(config).parameters()) / 1e6
        on_cpu = device.type != "cuda" and label != "fp32"  # autocast is CUDA's only (plumbing/training.autocast)
        rows.append({"update": name, "precision": "fp32 (bf16: CUDA only)" if on_cpu else label,
                     "batch": n, "parameters_m": round(millions, 1), **result,
                     "images_per_s": result["updates_per_s"] * n})
        peak = "n/a on the CPU" if result["peak_memory_gib"] is None else f"{result['peak_memory_gib']} GiB"
        print(f"  {name:<26} {rows[-1]['precision']:<15} batch {n:>3}: {result['updates_per_s']:.2f} updates/s, "
              f"peak {peak}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ==== Part 2: the fmnist pipeline at a budget =========================================================================


def rate(make, cls, args, device, network: dict, batch: int, **fields) -> float:
    """Updates/s of one fmnist update, measured for a few seconds: what the budget's counts follow from."""
    config = cls.from_preset("fmnist", device=str(device), **network, **fields)
    return measure(make(config, device, batch), device, 0.5 if args.tiny else 4.0)["updates_per_s"]


def pipeline_part(args, device, budget: float, network: dict) -> dict:
    out, docs = Path(args.out_dir), Path(args.docs)
    common_args = ["--preset", "fmnist", "--device", str(device), "--out-dir", str(out)]
    common_args += ["--data-dir", args.data_dir] if args.data_dir else []
    for key, value in network.items():
        common_args += [f"--{key.replace('_', '-')}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    if args.tiny:
        common_args += ["--eval-samples", "40", "--classifier-steps", "30", "--log-every", "2"]
    teacher_batch, pd_batch, dmd_batch = (8, 4, 4) if args.tiny else (128, 128, 128)
    # The update counts that fill each share of the budget, from the updates/s measured now.
    speeds = {"teacher": rate(teacher_update, train_teacher.TeacherConfig, args, device, network, teacher_batch),
              "pd": rate(pd_update, progressive_distill.PDConfig, args, device, network, pd_batch),
              "dmd": rate(dmd_update, dmd.DMDConfig, args, device, network, dmd_batch)}
    cap = 8 if args.tiny else 10**9
    teacher_updates = min(cap, max(8, int(speeds["teacher"] * TEACHER_SHARE * budget)))
    round_updates = min(cap, max(2, int(speeds["pd"] * PD_SHARE * budget / 3)))  # three rounds: 32 -> 4 steps
    dmd_updates = min(cap, max(4, int(speeds["dmd"] * DMD_SHARE * budget)))
    teacher_args = [*common_args, "--iterations", str(teacher_updates), "--batch-size", str(teacher_batch)]
    commands = {
        "teacher": (train_teacher.main, [*teacher_args, "--sample-every", str(max(1, teacher_updates // 2))]),
        "progressive distillation": (progressive_distill.main, [
            *teacher_args, "--start-steps", "32", "--to-steps", "4", "--round-iterations", str(round_updates),
            "--pd-batch-size", str(pd_batch)]),
        "DMD, 1 step": (dmd.main, [
            *teacher_args, "--steps", "1", "--dmd-iterations", str(dmd_updates), "--dmd-batch-size", str(dmd_batch),
            "--eval-every", str(max(1, dmd_updates // 4)), "--reg-pairs", "64" if args.tiny else "2000",
            "--reg-steps", "4" if args.tiny else "64"]),
        "evaluate.py": (evaluate.main, [*teacher_args, "--num-samples", "40", "--speed-batch", "4", "--teacher-steps",
                                        "1", "4", "32"] if args.tiny else [
            *teacher_args, "--num-samples", "2000", "--teacher-steps", "1", "2", "4", "8", "32", "64", "256"]),
    }
    parts = {}
    for name, (main, argv) in commands.items():
        print(f"\n== {name}: python {main.__module__}.py {' '.join(argv)}")
        start = time.perf_counter()
        main(argv)
        parts[name] = {"command": f"python {main.__module__}.py {' '.join(argv)}",
                       "wall_s": round(time.perf_counter() - start, 1)}
    (docs / "gpu").mkdir(parents=True, exist_ok=True)
    pictures = {"teacher_ddim_4.png": out / "teacher" / "samples_4.png",
                "teacher_ddim_64.png": out / "teacher" / "samples_64.png",
                "pd_4.png": out / "pd" / "student_4" / "samples_4.png",
                "dmd_1.png": sorted((out / "dmd_1step").glob("eval_*"))[-1] / "samples_1.png"}  # the last evaluation
    for name, src in pictures.items():
        if src.is_file():
            shutil.copy(src, docs / "gpu" / name)
    return {"speeds_updates_per_s": speeds, "updates": {"teacher": teacher_updates, "pd_round": round_updates,
                                                        "dmd": dmd_updates}, "parts": parts,
            "teacher": json.loads((out / "teacher" / "metrics.json").read_text()),
            "pd": json.loads((out / "pd" / "metrics.json").read_text()),
            "dmd": json.loads((out / "dmd_1step" / "metrics.json").read_text()),
            "results_md": (out / "results.md").read_text(),
            "pictures": sorted(p.name for p in (docs / "gpu").iterdir())}


# ==== The report ======================================================================================================


def machine(device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return info


def fd_row(metrics: dict) -> str:
    return f"{metrics['fd_classifier']:.2f} | {metrics['accuracy']:.1%}" if "fd_classifier" in metrics else " | "


def write_report(result: dict, docs: Path) -> None:
    m, speed, pipe = result["machine"], result["speed"], result["pipeline"]
    where = m.get("gpu", m["device"]) + (f" ({m['gpu_memory_gib']} GiB), CUDA {m['cuda']}" if "gpu" in m else "")
    lines = ["# GPU check", "",
             f"Measured by `{result['command']}` on {where}, PyTorch {m['torch']}"
             f"{', torchvision ' + m['torchvision'] if 'torchvision' in m else ''}, on {result['date']}, "
             f"in {result['wall_s']:.0f} s.", "",
             "## Training speed of the cifar10 network", "",
             f"The cifar10 preset's network, DDPM's UNet (here {speed[0].get('parameters_m', '?')}M parameters), on "
             "random 32x32 images. Part time: "
             f"{result['speed_wall_s']:.0f} s.", "",
             "| update | precision | batch | updates/s | images/s | peak memory (GiB) |", "|---|---|---|---|---|---|"]
    for row in speed:
        if "skipped" in row:
            lines.append(f"| {row['update']} | {row['precision']} | {row['batch']} | skipped: {row['skipped']} | | |")
        else:
            lines.append(f"| {row['update']} | {row['precision']} | {row['batch']} | {row['updates_per_s']:.2f} | "
                         f"{row['images_per_s']:.0f} | {row['peak_memory_gib'] if row['peak_memory_gib'] else ''} |")
    up = pipe["updates"]
    presets = (train_teacher.TeacherConfig.from_preset("fmnist").iterations,
               progressive_distill.PDConfig.from_preset("fmnist").round_iterations,
               dmd.DMDConfig.from_preset("fmnist").dmd_iterations)
    lines += ["", "## The fmnist pipeline at a budget", "",
              f"Update counts from the updates/s measured first: teacher {up['teacher']} updates, progressive "
              f"distillation 32 -> 4 steps at {up['pd_round']} updates per halving, DMD {up['dmd']} updates, "
              f"against the fmnist preset's {presets[0]}, {presets[1]} per halving and {presets[2]}: the numbers "
              "show what this budget reaches. FD: Frechet distance in this project's classifier's features (its "
              "test accuracy "
              f"{pipe['teacher'].get('classifier', {}).get('test_accuracy', float('nan')):.1%}), not comparable with "
              "Inception FID.", "", "| part | command | wall time (s) |", "|---|---|---|"]
    lines += [f"| {name} | `{p['command']}` | {p['wall_s']} |" for name, p in pipe["parts"].items()]
    lines += ["", "| sampler | steps | FD | class accuracy |", "|---|---|---|---|"]
    lines += [f"| teacher DDIM | {n} | {fd_row(r)} |" for n, r in pipe["teacher"]["ddim"].items()]
    lines += [f"| PD student | {n} | {fd_row(r)} |" for n, r in pipe["pd"]["students"].items()]
    lines += [f"| DMD generator, update {h['step']} | 1 | {fd_row(h)} |" for h in pipe["dmd"]["history"]]
    lines += ["", "`evaluate.py`'s table:", "", *pipe["results_md"].split("\n", 2)[2].strip().splitlines(), "",
              "Sample grids (one column per class): " + ", ".join(f"[{p}](gpu/{p})" for p in pipe["pictures"]) + "."]
    (docs / "results-gpu.md").write_text("\n".join(lines) + "\n")


def finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="the whole check's time budget (default 8)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    parser.add_argument("--data-dir", default=None, help="where Fashion-MNIST's .gz files are (else Debian's package)")
    parser.add_argument("--out-dir", default="runs/gpu_check", help="run folder (emptied if this check made it)")
    parser.add_argument("--docs", default=str(HERE.parent / "docs"), help="where results-gpu.md/.json go (docs/)")
    parser.add_argument("--tiny", action="store_true", help="tiny networks and a few updates: the tests' settings")
    args = parser.parse_args(argv)
    require(args.minutes > 0, f"--minutes must be above 0, got {args.minutes:g}")
    device, budget, start = pick_device(args.device), args.minutes * 60, time.perf_counter()
    require(device.type == "cuda" or args.tiny, f"the GPU check measures a CUDA GPU, and this run's device is "
            f"{device.type}; run it where a GPU is, or pass --tiny to try it with tiny networks")
    check_writable(args.out_dir)
    check_writable(args.docs, "--docs")
    out, marker = Path(args.out_dir), Path(args.out_dir) / ".gpu_check"
    if out.exists() and any(out.iterdir()) and not marker.exists():  # a folder it did not make is never emptied
        raise UserError(f"--out-dir {out} holds files this check did not write; give an empty or new folder")
    if out.exists():
        shutil.rmtree(out)  # the check always starts afresh
    out.mkdir(parents=True)
    marker.write_text("written by tools/gpu_check.py, which empties this folder when it runs again\n")
    network = TINY_NET if args.tiny else {}
    print(f"GPU check on {device}, budget {args.minutes:g} minutes\n== part 1: training speed of the cifar10 network")
    speed = speed_part(args, device, 0.2 if args.tiny else SPEED_SHARE * budget / 6, network)
    speed_wall = time.perf_counter() - start
    print("== part 2: the fmnist pipeline")
    pipeline = pipeline_part(args, device, budget, network if args.tiny else {})
    result = {"command": "python tools/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "machine": machine(device), "speed": speed,
              "speed_wall_s": round(speed_wall, 1), "pipeline": pipeline,
              "wall_s": round(time.perf_counter() - start, 1)}
    assert finite(result), "a number of the check is not finite"
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results-gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, docs)
    print(f"\nwrote {docs / 'results-gpu.md'} and results-gpu.json in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    run_cli(main, interrupted="nothing to resume; rerun the command to measure again")
