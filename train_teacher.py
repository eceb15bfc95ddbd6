"""Train the diffusion teacher that every distillation method starts from.

Paper: Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"
(arXiv 2202.00512), Alg. 1 (standard diffusion training), with classifier-free guidance's
label dropout (Ho & Salimans 2022) so that one network gives both x_hat(z_t, c) and
x_hat(z_t, null). Formulas: docs/methods.md section 0.

Algorithm (per iteration):
    x, c ~ data;  c <- null with probability `label_dropout`
    t ~ U[0, 1];  eps ~ N(0, I);  z_t = alpha_t x + sigma_t eps
    loss = || v_hat(z_t, t, c) - v ||^2,  v = alpha_t eps - sigma_t x
    Adam step (warm-up, gradient clip), EMA of the weights

Writes <out_dir>/teacher.pt (the EMA weights are the teacher), and in <out_dir>/teacher/
the DDIM samples at each `--eval-steps` count (samples.png or samples_<steps>.png),
`metrics.json`, `samples_<steps>.npz` (toy), `log.jsonl` and `loss.png`.

Deliberate differences from the paper:
- The cosine schedule's logSNR is not clipped for sampling; alpha_1 = 0 exactly (v-prediction
  is well defined there). Time enters the network as sinusoidal features of 1000 t, not logSNR.
- DDPM's UNet (35.7M parameters) instead of PD's wider 3-level network; same optimiser.
- The toy preset drops labels with probability 0.3 (not 0.1) so that its unconditional
  model, the one the toy goals are stated for, is good.

    python train_teacher.py                      # toy on the CPU, about 75 s on 2 cores
    python train_teacher.py --preset fmnist      # a GPU for minutes
    python train_teacher.py --preset toy --resume
"""

from __future__ import annotations

import plumbing.interrupt  # noqa: F401  (first: Ctrl-C while torch loads is one line)
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from common import Denoiser, ddim_sample, diffusion_loss, drop_labels, loss_by_t_bucket
from plumbing.config import NetworkConfig, RunConfig, parse_config
from plumbing.data import BatchStream, toy_dataset
from plumbing.errors import UserError, require
from plumbing.folders import teacher_dir
from plumbing.image_metrics import image_quality
from plumbing.loop import Loop
from plumbing.metrics import describe, evaluate_sampler, sample_count, within_share
from plumbing.networks import build_network, frozen_denoiser
from plumbing.pretrained import is_pretrained, load_pretrained
from plumbing.training import (EMA, autocast, check_compatible, fingerprint, load_checkpoint,
                               optimizer_step, pick_device, prepare_network, run_cli, seed_everything, write_json)


@dataclass
class TeacherConfig(RunConfig):
    """Alg. 1: training the teacher (defaults: the PD paper's CIFAR-10 settings, docs/methods.md 1.2)"""

    batch_size: int = 128             # training batch size, global under torchrun (paper: 128)
    lr: float = 2e-4                  # Adam learning rate (paper: 2e-4)
    iterations: int = 800_000         # training iterations (paper: 800k)
    warmup: int = 1000                # linear learning-rate warm-up iterations (paper: 1000)
    ema_decay: float = 0.9999         # EMA decay of the weights; the EMA is the teacher (paper: 0.9999)
    grad_clip: float = 1.0            # global gradient-norm clip, also in every distillation loop (paper: 1)
    label_dropout: float = 0.1        # probability of the null label, for classifier-free guidance (0.1)
    hflip: bool = True                # random horizontal flips of training images (paper: on)
    dropout: float = 0.2              # dropout in the UNet's residual blocks (paper: 0.2 on CIFAR-10)

    PRESETS: ClassVar[dict] = {
        # Toy: labels dropped w.p. 0.3 so that the unconditional model, which the toy goals are stated for, is good.
        "toy": dict(batch_size=512, lr=1e-3, iterations=20_000, warmup=0, ema_decay=0.999, label_dropout=0.3,
                    hflip=False, dropout=0.1),
        # 2 CPU cores: 1500 updates of 0.31 s; Adam 1e-3 and EMA 0.999 make a short run good (docs/results.md).
        "fmnist16": dict(iterations=1500, lr=1e-3, warmup=100, ema_decay=0.999, hflip=False, dropout=0.1),
        "fmnist": dict(iterations=30_000, ema_decay=0.9995, hflip=False, dropout=0.1),
    }
    RESUMABLE: ClassVar[tuple] = ("iterations",)

    def check(self) -> None:
        super().check()
        for name in ("batch_size", "iterations"):
            require(self[name] >= 1, f"--{name.replace('_', '-')} must be at least 1, got {self[name]}")
        require(0.0 <= self.label_dropout < 1.0, f"--label-dropout must be in [0, 1), got {self.label_dropout}")
        require(0.0 <= self.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        require(self.grad_clip > 0, f"--grad-clip must be above 0 (the largest norm kept), got {self.grad_clip}")
        require(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}")
        require(self.warmup >= 0, f"--warmup must be 0 or more, got {self.warmup}")


def train_teacher(config: TeacherConfig, resume: bool = False,
                  rerun: str = "rerun the command with --resume to continue") -> Path:
    """Alg. 1 with label dropout and EMA; checkpoints every `ckpt_every`; returns the path. `rerun`: how to continue
    after Ctrl-C."""
    device = pick_device(config.device)
    path = Path(config.teacher)
    seed_everything(config.seed)
    model = Denoiser(build_network(config).to(device))
    ema = EMA(model, config.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    stream = BatchStream(config, device, config.seed)
    keys = (*NetworkConfig.network_keys(), *TeacherConfig.run_keys(RunConfig))  # what a resumed run must share
    loop = Loop(path, config, "teacher", config.iterations, {"model": model, "ema": ema, "opt": opt, "stream": stream},
                "teacher", keys=keys, log=teacher_dir(config) / "log.jsonl", resume=resume, checkpoint_at_end=True,
                kind="teacher", rerun=rerun,
                new_run=None if is_default_teacher(config) else "another --teacher path")
    prepare_network(model, config, device)
    model.train()
    for step in loop:
        x, labels = stream.next()
        labels = drop_labels(labels, config.label_dropout, model.null_label)  # c <- null w.p. label_dropout
        for group in opt.param_groups:  # linear warm-up
            group["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup))
        t = torch.rand(x.shape[0], device=device)  # t ~ U[0, 1]
        with autocast(config, device):
            per_example = diffusion_loss(model, x, labels, t=t, reduce=False)  # || v_hat - v ||^2, (B,)
        loss = per_example.mean()
        grad_norm = optimizer_step(opt, loss, model, config.grad_clip)
        ema.update(model)
        loop.log(loss=loss, grad_norm=grad_norm, **loss_by_t_bucket(per_example, t))
        if loop.due(config.sample_every) and config.net != "mlp" and step + 1 < config.iterations:
            # images: the EMA's 64-step DDIM, measured (the last update's is the final evaluation's)
            with loop.off_the_clock():  # at most eval_share of the training since the last check
                measured = within_share(config, [64], training_calls(config, config.sample_every))
                result = evaluate_sampler(lambda z, c, n: ddim_sample(ema.model, z, n, c), measured,
                                          teacher_dir(config) / f"during/{step + 1:07d}", [64], device)[64]
                loop.extra.setdefault("history", []).append({"step": step + 1, **result})
                loop.write(f"  update {step + 1}: DDIM 64 steps {describe(result)}")
    loop.log_writer.plot(teacher_dir(config) / "loss.png", "teacher: v-MSE by t bucket")
    return path


def evaluate_teacher(config: dict, device: torch.device) -> dict:
    """The teacher's DDIM at each `eval_steps` count: pictures, samples and metrics.json."""
    teacher = load_teacher(config, device, train_if_missing=False)
    out = teacher_dir(config)
    timings = {}

    def sample(z, labels, steps):
        t0 = time.perf_counter()
        x = ddim_sample(teacher, z, steps, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings[steps] = time.perf_counter() - t0
        return x

    start = time.perf_counter()
    state = load_checkpoint(config.teacher, "teacher checkpoint")
    measured = within_share(config, config.eval_steps, training_calls(config, state["step"]))
    if config.net != "mlp":  # images: say what the measurement costs before it starts
        print(evaluation_cost(measured, training_calls(config, state["step"])))
    results = evaluate_sampler(sample, measured, out, config.eval_steps, device, title="teacher DDIM ",
                               weights=f"ddim:{teacher.fingerprint}")  # evaluate.py reads these back
    metrics = {"preset": config.preset, "sampler": "ddim", "unconditional": config.net == "mlp",
               "train_time_s": round(state.get("seconds", state.get("train_time", 0.0)), 1),  # (older files)
               "eval_time_s": round(state.get("eval_seconds", 0.0) + time.perf_counter() - start, 1),
               "iterations": state["step"], "device": str(device),
               "ddim": {str(k): {**v, "sample_time_s": round(timings[k], 3)} for k, v in results.items()},
               "history": state.get("extra", {}).get("history", [])}  # images: the 64-step DDIM while training
    if results.get(64) and config.net != "mlp":  # the last update's point: the final evaluation's own
        metrics["history"].append({"step": state["step"], **results[64]})
    if config.net != "mlp" and config.fd_max_steps > 0:  # the metric's own quality, to judge it by
        metrics["classifier"] = image_quality(config, device).info
    if config.data == "gaussians8":  # the same DDIM with the exact denoiser: the best any teacher can do
        exact = toy_dataset("gaussians8").denoiser
        results = evaluate_sampler(lambda z, c, n: ddim_sample(exact, z, n, c), config, out / "exact_denoiser",
                                   config.eval_steps, device, title="exact DDIM ")
        metrics["exact_denoiser_ddim"] = {str(k): v for k, v in results.items()}
    write_json(out / "metrics.json", metrics)
    return metrics


def training_calls(config: TeacherConfig, iterations: int) -> int:
    """Alg. 1's cost in network calls: an update costs about three (forward and backward)."""
    return 3 * iterations * config.batch_size


def evaluation_cost(config: dict, training: int) -> str:
    """The teacher's image evaluation in network calls, beside its training's."""
    n = config["eval_samples"]
    calls = sum(steps * sample_count(config, steps) for steps in config["eval_steps"])
    return (f"measuring the teacher's DDIM at {config['eval_steps']} steps on {n} samples: {calls:,} network calls, "
            f"{calls / training:.0%} of its training's ~{training:,} (--eval-samples and --eval-steps set it)")


def is_default_teacher(config: TeacherConfig) -> bool:
    """Whether the teacher is <out_dir>/teacher.pt, the only one a method script trains or continues: a teacher
    named with --teacher elsewhere is read, never written."""
    return Path(config.teacher).resolve() == (Path(config.out_dir) / "teacher.pt").resolve()


def check_named_teacher(config: TeacherConfig) -> None:
    """A teacher named with --teacher must be there: it is never trained in its place."""
    folder = Path(config.teacher)
    beside = folder.with_suffix(".pt")  # <name>/ is the picture folder of the checkpoint <name>.pt beside it
    require(is_pretrained(config) or not folder.is_dir(),
            f"--teacher {config.teacher} is a folder; name the checkpoint"
            + (f" beside it, {beside}" if beside.is_file() else f" in it (e.g. {folder / 'teacher.pt'})"))
    require(is_pretrained(config) or is_default_teacher(config) or Path(config.teacher).exists(),
            f"no teacher at {config.teacher} (--teacher); check the path, or leave --teacher out to train one at "
            f"{Path(config.out_dir) / 'teacher.pt'}")


def read_teacher(path: Path) -> dict:
    """A teacher checkpoint; anything else this project writes is refused with what it is."""
    state = load_checkpoint(path, "teacher checkpoint")
    kind = str(state.get("kind"))
    if kind != "teacher":
        what = {"dmd": "a DMD or DisBack run's checkpoint", "stage1": "guided distillation's stage-one student"}.get(
            kind, "a distilled student" if kind.startswith("student") else f"not a teacher (it holds a {kind!r})")
        raise UserError(f"{path} is {what}, not a teacher; pass --teacher the teacher.pt it was distilled from "
                        "(or leave --teacher out), and compare students with evaluate.py")
    return state


def load_teacher(config: TeacherConfig, device: torch.device, train_if_missing: bool = True) -> Denoiser:
    """The frozen teacher (EMA weights, eval mode, no grads); at <out_dir>/teacher.pt trained first if missing, or
    trained on to its own update count if it was stopped before it (a finished one is never trained on here, whatever
    --iterations says), and a teacher named with --teacher used as it is. A diffusers checkpoint (--teacher
    diffusers:<hub id or folder>) comes wrapped as a denoiser (plumbing/pretrained.py) and is never trained here."""
    if is_pretrained(config):
        require(config.net == "unet", "a diffusers teacher is an image model; pass an image --preset or --data")
        teacher = load_pretrained(config, device).requires_grad_(False)  # eval mode, no grads
        teacher.checkpoint, teacher.fingerprint = config.teacher, fingerprint(teacher.state_dict())
        prepare_network(teacher, config, device, compile=False)  # students are copies of it
        return teacher
    path = Path(config.teacher)
    check_named_teacher(config)
    if train_if_missing and is_default_teacher(config):
        state = read_teacher(path) if path.exists() else None
        own = config if state is None else config.replace(iterations=state["config"]["iterations"])
        if state is None or state["step"] < own.iterations:  # missing, or stopped before its own update count
            print(f"teacher checkpoint {path} is {'missing' if state is None else 'unfinished'}: training it first, "
                  f"{own.iterations} updates at batch {own.batch_size} (its projected time follows a warm-up)")
            train_teacher(own, resume=state is not None,
                          rerun="rerun the command to continue (the teacher's training resumes by itself)")
            evaluate_teacher(own, device)
        elif own.iterations != config.iterations:  # a finished teacher is never trained on here
            print(f"note: the teacher {path} finished its {own.iterations} updates and is used as it is (--iterations "
                  f"{config.iterations} is for a teacher trained here; `python train_teacher.py --iterations N "
                  "--resume` trains this one on)")
    state = read_teacher(path)
    if state["step"] < state["config"]["iterations"] and not is_default_teacher(config):
        print(f"note: the teacher {path} has {state['step']} of its {state['config']['iterations']} updates; a named "
              "teacher is used as it is (continue it with `python train_teacher.py --teacher ... --resume`)")
    check_compatible(state["config"], config, NetworkConfig.network_keys(), "teacher checkpoint", path)
    teacher = frozen_denoiser(state["config"], state["ema"]["model"], device)
    teacher.checkpoint, teacher.fingerprint = str(path), fingerprint(state["ema"]["model"])  # what it is, for caches
    prepare_network(teacher, config, device, compile=False)  # students are copies of it
    return teacher


def require_null_label(config: TeacherConfig, why: str) -> None:
    """x_hat(z_t, null), the unconditional model, exists only in a teacher trained with label dropout: a method
    that will sample the null label (guidance, PD's probe, unconditional toy evaluation; `why` says which)
    refuses any other teacher, before any work. A teacher still to be trained is judged by this config.
    An unconditional teacher (a diffusers one) ignores labels: every label is its null label."""
    if is_pretrained(config):
        return
    check_named_teacher(config)
    path = Path(config.teacher)
    trained = read_teacher(path)["config"] if path.exists() else config
    if trained["label_dropout"] <= 0:
        raise UserError(f"the teacher {'at ' + str(path) if path.exists() else 'to be trained'} has no null class "
                        f"(it was trained with --label-dropout 0), so {why}; train one with "
                        "`python train_teacher.py --label-dropout 0.1` or pass another --teacher")


def main(argv=None) -> None:
    config, flags = parse_config(TeacherConfig, __doc__.split("\n\n")[0], argv,
                                 {"resume": "continue the run from its checkpoint"})
    resume = flags["resume"]
    require(not is_pretrained(config), f"--teacher {config.teacher} is already trained; distil it (e.g. "
            f"`python dmd.py --teacher {config.teacher}`) or measure it with `python evaluate.py --teacher ...`")
    require(Path(config.teacher).suffix == ".pt", f"--teacher {config.teacher} names the checkpoint to write: give it "
            f"the .pt suffix ({Path(config.teacher).with_suffix('.pt')}); its pictures go to the folder of that name")
    device = pick_device(config.device)
    print(f"training the {config.preset} teacher on {device}: {config.iterations} iterations "
          f"-> {config.teacher}")
    train_teacher(config, resume=resume)
    metrics = evaluate_teacher(config, device)
    print(f"trained in {metrics['train_time_s']} s; samples and metrics in {teacher_dir(config)}")
    for steps, m in metrics["ddim"].items():
        print(f"  DDIM {steps:>3} steps: {describe(m)}")


if __name__ == "__main__":
    run_cli(main)
