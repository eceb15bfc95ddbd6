"""DisBack: distribution matching whose real score walks back along a recorded degradation path.

Paper: Zhang et al. 2024, "Distribution Backtracking Builds A Faster Convergence Trajectory for
Diffusion Distillation" (arXiv 2408.15991). Formulas: docs/methods.md section 4.
DisBack is DMD (dmd.py) plus a schedule of real scores, so this file holds only what it adds:
the recording of the path and the schedule. The losses and the training loop are dmd.py's.

Algorithm:
    stage 1, degradation recording:
        G_0 = the teacher used as a (one- or K-step) generator, before any distillation
        s' <- copy of the teacher (s'_0 = the teacher itself)
        for `record_iterations` updates:  x = G_0(z) (no gradient);  s' <- Alg. 1's loss on x
            every record_iterations / N updates, save a snapshot: s'_1, ..., s'_N (s'_N fits G_0)
    stage 2, distribution backtracking = dmd.train_dmd with
        fake score initialised from s'_N (it already fits the generator's start)
        real score for generator update i: s'_{N-1-floor(i / interval)}, never past s'_0 = the teacher

The snapshots stay on disk; one at a time is loaded onto the device. With N = 0 snapshots there
is no path, and DisBack is DMD exactly (a test checks it, bit for bit).

Deliberate differences from the paper:
- The toy preset records 1000 updates with a snapshot every 100 (N = 10), as the official code,
  at AdamW 1e-5: a slow rate makes the path gradual (the snapshots' loss on G_0's samples falls
  from 1.31 to 0.092 in ten even-looking steps; at 1e-4, 94% of the fall comes before the
  first snapshot, and the "path" is one jump; docs/results.md, DisBack). Every run prints this
  diagnostic (`path_losses`) and stores it in metrics.json: about 1/N of the fall before s'_1 is a path.
- fmnist16 records 200 updates at 1e-5 into N = 20 snapshots (17% of the fall before s'_1) and walks
  them 3 generator updates each, the first tenth of its 600.
- No SDXL: the official release is a patch on DMD2's SDXL code whose snapshot loading silently
  matched no keys; this follows the paper instead. Its stage 2 is DMD's loop with either recipe:
  `--recipe dmd2` gives DMD2's (no regression, TTUR, the GAN), as the official code uses.

    python disback.py --steps 1                  # toy: teacher if missing, record the path, backtrack
    python disback.py --steps 1 --snapshots 0 --tag nopath   # no path: plain DMD (same seed, same result)
    python disback.py --steps 1 --resume         # either stage
"""

from __future__ import annotations

import plumbing.interrupt  # noqa: F401  (first: Ctrl-C while torch loads is one line)
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from common import diffusion_loss, trainable_copy
from dmd import (DMDConfig, Variant, adamw, check_null_label, fake_score_loss, generator_samples, noise_and_labels,
                 sample_labels, train_dmd)
from plumbing.config import parse_config, sample_shape
from plumbing.errors import UserError, require
from plumbing.folders import check_start, disback_dir
from plumbing.loop import Loop
from plumbing.metrics import image_batch
from plumbing.reports import compare_with_dmd
from plumbing.training import (cached, check_same_teacher, load_checkpoint, optimizer_step, pick_device, run_cli,
                               save_checkpoint, seed_everything, write_json)
from train_teacher import TeacherConfig, load_teacher


@dataclass
class DisBackConfig(DMDConfig):
    """DisBack: DMD plus a recorded degradation path (docs/methods.md 4.3)"""

    snapshots: int = 10               # N: snapshots s'_1..s'_N recorded along the degradation path (0: plain DMD)
    record_iterations: int = 1000     # stage 1: updates of the teacher copy on G_0's samples (official code: ~1000)
    record_lr: float = 5e-5           # stage 1: AdamW learning rate
    interval: int = 2000              # stage 2: generator updates on each snapshot before stepping back

    PRESETS: ClassVar[dict] = {
        # Toy: a slow rate makes the path gradual; the teacher is reached after 9 x 100 of DMD's 4000 updates.
        "toy": dict(record_lr=1e-5, interval=100),
        # fmnist16: at 2e-4, 92% of the path's fall (its loss on G_0's samples) came before s'_1; at 1e-5 with 20
        # snapshots, 17% (docs/results.md). The path is walked in the first tenth of the run, as the official code.
        "fmnist16": dict(snapshots=20, record_iterations=200, record_lr=1e-5, interval=3),
        "fmnist": dict(interval=500),
    }

    def check(self) -> None:
        super().check()
        check_config(self)  # below the algorithm


# What a resumed run must share with its checkpoint: every DMD and DisBack field but DMD's resumable
# ones, the seed and the clip.
RUN_KEYS = (*DisBackConfig.run_keys(TeacherConfig), "grad_clip")
# What the recorded path depends on (besides the teacher's weights): DisBack's recording fields and G_0's samples.
PATH_KEYS = (*(k for k in DisBackConfig.own_fields() if k != "interval"), "steps", "dmd_batch_size",
             "dmd_label_dropout", "seed")
# What plain DMD's run must share with this one to be compared with it: every DMD setting (the budget, learning
# rates, evaluation cadence and tag among them), the seed, the clip and the evaluation's noise; and the teacher.
COMPARED_KEYS = (*DMDConfig.own_fields(), "seed", "grad_clip", "eval_samples", "eval_seed")


# ==== Stage 1: recording the degradation path s'_0 = teacher -> s'_N (fits G_0) =======================================


def record_degradation(teacher, config: DisBackConfig, device, folder: Path) -> list[Path]:
    """Fine-tune a copy of the teacher on the initial generator's samples with the denoising loss
    (dmd.fake_score_loss), saving a snapshot every record_iterations / N updates. Returns the paths
    of s'_1..s'_N; a run killed in between resumes from the last snapshot."""
    n, iterations = config.snapshots, config.record_iterations
    paths = [folder / f"snapshot_{i:02d}.pt" for i in range(1, n + 1)]
    for p in folder.glob("snapshot_*.pt"):  # a path recorded with other settings or teacher is not this run's
        saved = load_checkpoint(p, "DisBack snapshot")
        if any(saved["config"].get(k) != config[k] for k in PATH_KEYS):
            diff = ", ".join(f"{k}={saved['config'].get(k)}" for k in PATH_KEYS if saved["config"].get(k) != config[k])
            raise UserError(f"{folder} holds a path recorded with other settings ({diff}); "
                            "pass --tag for a new run folder, or delete it")
        check_same_teacher(saved.get("teacher"), teacher, "the DisBack path", folder)
    if all(p.exists() for p in paths):
        return paths
    every = iterations // n
    seed_everything(config.seed + 1)
    score = trainable_copy(teacher)  # s' starts as s'_0 = the teacher
    opt = adamw(score, config.record_lr)
    loop = Loop(folder / "record_progress.pt", config, "recording", every * n, {"model": score, "opt": opt},
                "stage 1: recording the path", keys=PATH_KEYS, ckpt_every=every)
    losses = loop.extra.setdefault("losses", [])
    for step in loop:
        z, labels = noise_and_labels(config, device)
        # G_0's samples, drawn as stage 2's fake score will see them (backward simulation for K > 1)
        x, _ = generator_samples(teacher, z, labels, config.steps)
        loss = fake_score_loss(score, x, labels)  # Alg. 1's denoising loss on G_0's samples
        optimizer_step(opt, loss, score, config.grad_clip)
        loop.log(loss=loss)
        if loop.due(every):  # s'_i, i = (step + 1) / every
            i = (step + 1) // every
            save_checkpoint(paths[i - 1], {"kind": "disback_snapshot", "config": config, "step": step + 1,
                                           "teacher": teacher.fingerprint, "model": score.state_dict()})
            losses.append({"snapshot": i, "step": step + 1, "loss": loss.item()})
            write_json(folder / "record_losses.json", {"losses": losses})
    loop.path.unlink(missing_ok=True)
    return paths


@torch.no_grad()
def path_losses(teacher, paths: list[Path], config: DisBackConfig, device, n: int = 1024) -> dict:
    """The path's diagnostic: the denoising loss of s'_0 (the teacher), s'_1, ..., s'_N on one fixed batch of
    G_0's samples, with the same t and eps for every j. A path is a path when the loss falls in even steps; at a
    recording rate too fast, most of the fall comes before s'_1 and the "path" is one jump (docs/results.md)."""
    with torch.random.fork_rng(devices=[]):  # fixed noise, and the run's own random stream left as it was
        torch.manual_seed(config.seed + 9)
        z, labels = torch.randn(n, *sample_shape(config)), sample_labels(n, config)
        t, eps = torch.rand(n), torch.randn(n, *sample_shape(config))
        batch = 1024 if config.net == "mlp" else image_batch(device)
        chunks = [slice(i, i + batch) for i in range(0, n, batch)]
        on = [(z[c].to(device), labels[c].to(device), t[c].to(device), eps[c].to(device)) for c in chunks]
        x0 = [generator_samples(teacher, z_c, c_c, config.steps)[0] for z_c, c_c, _, _ in on]  # G_0's samples
    path = BacktrackingPath(teacher, paths, interval=1)
    losses = []
    for j in range(len(paths) + 1):  # s'_0 = the teacher, then s'_1..s'_N
        score = path(len(paths) - 1 - j) if j else teacher
        per_chunk = [diffusion_loss(score, x, c_c, t_c, e_c) * len(x) for x, (_, c_c, t_c, e_c) in zip(x0, on)]
        losses.append(float(sum(per_chunk)) / n)
    fall = losses[0] - losses[-1]
    first = (losses[0] - losses[1]) / fall if fall > 1e-3 * abs(losses[0]) else None  # None: the path does not fall
    return {"losses": losses, "fall_before_first": first}


# ==== Stage 2: the real score walks back along the path ===============================================================


def snapshot_index(step: int, n_snapshots: int, interval: int) -> int:
    """The snapshot j whose s'_j is the real score at generator update `step` (0-based):
    N-1 for the first `interval` updates, then N-2, ..., then 0 (the teacher) for good."""
    ### BEGIN SOLUTION
    return max(n_snapshots - 1 - step // interval, 0)
    ### END SOLUTION


class BacktrackingPath:
    """`path(step)` -> the real score s'_j for generator update `step`. The teacher is s'_0; the
    other snapshots stay on disk and one at a time is loaded into a frozen network on the device."""

    def __init__(self, teacher, paths: list[Path], interval: int):
        self.teacher, self.paths, self.interval = teacher, paths, interval
        self.current, self.loaded = trainable_copy(teacher).eval().requires_grad_(False), None

    def index(self, step: int) -> int:
        return snapshot_index(step, len(self.paths), self.interval)

    def __call__(self, step: int):
        j = self.index(step)
        if j == 0:
            return self.teacher
        if j != self.loaded:
            self.current.load_state_dict(load_checkpoint(self.paths[j - 1], "DisBack snapshot")["model"])
            self.loaded = j
        return self.current


def train_disback(config: DisBackConfig, resume: bool = False) -> dict:
    """Stage 1 (skipped when recorded), then stage 2 = dmd.train_dmd with the path's real scores."""
    device = pick_device(config.device)
    out = disback_dir(config)
    started = (out / "checkpoint.pt").exists() or any((out / "snapshots").glob("*.pt"))
    check_start(out, started, resume, "--tag")
    check_null_label(config)  # before the path is recorded
    teacher = load_teacher(config, device)  # frozen, eval mode, no grads; trained first if missing
    paths = record_degradation(teacher, config, device, out / "snapshots") if config.snapshots else []
    path = BacktrackingPath(teacher, paths, config.interval)
    fake_start = load_checkpoint(paths[-1], "DisBack snapshot")["model"] if paths else None  # s'_N
    key = {"teacher": teacher.fingerprint, **{k: config[k] for k in PATH_KEYS}}  # what the path depends on
    diagnostic = None if not paths else {  # made once, not at every resume
        k: v for k, v in cached(out / "path_losses.pt", key, lambda: path_losses(teacher, paths, config, device),
                                "DisBack path diagnostic").items() if k != "key"}
    if diagnostic is not None:
        print("the path's denoising loss on G_0's samples, s'_0 (the teacher) to s'_N: "
              + " ".join(f"{v:.4f}" for v in diagnostic["losses"])
              + (f"; {diagnostic['fall_before_first']:.0%} of the fall before s'_1 (on a gradual path about 1/N = "
                 f"{1 / len(paths):.0%})" if diagnostic["fall_before_first"] is not None
                 else "; it does not fall (by less than 0.1%): the snapshots are the teacher, and there is no path"))
    stage_2_started = (out / "checkpoint.pt").exists()  # stage 2 continues its checkpoint, or starts after stage 1
    metrics = train_dmd(config, stage_2_started, Variant(out=out, real_score=path, fake_start=fake_start,
                                                         run_keys=RUN_KEYS))
    metrics["path"] = diagnostic
    metrics["teacher_reached_at"] = max(len(paths) - 1, 0) * config.interval
    metrics["comparison"] = compare_with_dmd(config, metrics, COMPARED_KEYS)
    write_json(out / "metrics.json", metrics)
    return metrics


# ==== Checks and the command line =====================================================================================


def check_config(config: DisBackConfig) -> None:
    """One-line errors for values that make no sense (called when a config is made)."""
    require(config.snapshots >= 0, f"--snapshots must be >= 0 (0: plain DMD), got {config.snapshots}")
    n, m = config.snapshots, config.record_iterations
    require(not (n > 0 and (m < n or m % n)),
            f"--record-iterations {config.record_iterations} cannot hold {config.snapshots} "
            "snapshots evenly; give a multiple of --snapshots")
    require(config.interval >= 1, f"--interval must be at least 1, got {config.interval}")
    require(n == 0 or (n - 1) * config.interval < config.dmd_iterations,  # s'_0 (the teacher) from (N - 1) x interval
            f"the path's {n} snapshots at --interval {config.interval} reach the teacher only at update "
            f"{(n - 1) * config.interval}, and the run has {config.dmd_iterations} (--dmd-iterations); lower "
            "--interval or --snapshots, or raise --dmd-iterations")
    require(config.real_guidance <= 0, "DisBack's path is recorded from the unguided teacher; use --real-guidance 0")


def main(argv=None) -> None:
    config, flags = parse_config(DisBackConfig, __doc__.split("\n\n")[0], argv,
                                 {"resume": "continue the run (recording or backtracking) from its checkpoint"})
    resume = flags["resume"]
    print(f"DisBack, {config.preset}: {config.snapshots} snapshots from {config.record_iterations} "
          f"recording updates, {config.interval} generator updates per snapshot, then DMD's loop "
          f"({config.dmd_iterations} updates)")
    metrics = train_disback(config, resume=resume)
    final = metrics["final"]
    if "off_mode" in final:
        print(f"{config.steps}-step generator: off-mode {final['off_mode']:.1%}, MMD {final['mmd']:.4f}")
    c = metrics["comparison"]
    if c["compared"]:
        print(f"against DMD's run in {c['dmd_run']}: updates to reach {c['metric']} {c['target']:.4f}: "
              f"{c['updates_to_target']}")
    else:
        print(f"not compared with DMD: {c['why']}")
    print(f"everything in {disback_dir(config)}")


if __name__ == "__main__":
    run_cli(main)
