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

import time
from pathlib import Path

import torch

from common import (EMA, Denoiser, UserError, check_compatible, ddim_sample, diffusion_loss, drop_labels,
                    fingerprint, frozen_denoiser, load_checkpoint, loss_by_t_bucket, pick_device, rng_state,
                    run_cli, save_checkpoint, seed_everything, set_rng_state, write_json)
from data import BatchStream, toy_dataset
from metrics import evaluate_sampler
from networks import build_network
from presets import TEACHER_KEYS, parse_config
from training import LogWriter, autocast, prepare_network, progress


def teacher_dir(config: dict) -> Path:
    """Where the teacher's pictures, samples, log and metrics.json go: beside its checkpoint."""
    return Path(config["teacher"]).with_suffix("")


def train_teacher(config: dict, resume: bool = False) -> Path:
    """Alg. 1 with label dropout and EMA; checkpoints every `ckpt_every`; returns the path."""
    device = pick_device(config["device"])
    path = Path(config["teacher"])
    seed_everything(config["seed"])
    net = build_network(config).to(device)
    model = Denoiser(net)
    ema = EMA(model, config["ema_decay"])
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    stream = BatchStream(config, device, config["seed"])
    step, train_time = 0, 0.0
    if path.exists() and not resume:
        raise UserError(f"{path} exists; pass --resume to continue it, or --out-dir for a new run")
    if resume and path.exists():
        state = load_checkpoint(path, "teacher checkpoint")
        check_compatible(state["config"], config, TEACHER_KEYS, "teacher checkpoint", path)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        step, train_time = state["step"], state["train_time"]
        print(f"resuming {path} at iteration {step}")

    def checkpoint():
        save_checkpoint(path, {"kind": "teacher", "config": config, "step": step, "train_time": train_time,
                               "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                               "stream": stream.state_dict(), "rng": rng_state(), "log": log.records()})

    out = teacher_dir(config)
    log = LogWriter(out / "log.jsonl", resume=step > 0)
    if step > 0:
        log.restore(state.get("log"))
    prepare_network(model, config, device)
    null = model.null_label
    model.train()
    bar = progress(range(step, config["iterations"]), "teacher", initial=step, total=config["iterations"])
    start = time.perf_counter()
    for step in bar:
        x, labels = stream.next()
        labels = drop_labels(labels, config["label_dropout"], null)
        for group in opt.param_groups:  # linear warm-up
            group["lr"] = config["lr"] * min(1.0, (step + 1) / max(1, config["warmup"]))
        t = torch.rand(x.shape[0], device=device)  # t ~ U[0, 1]
        with autocast(config, device):
            per_example = diffusion_loss(model, x, labels, t=t, reduce=False)  # (B,)
        loss = per_example.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        opt.step()
        ema.update(model)
        step += 1
        if step % config["log_every"] == 0 or step == config["iterations"]:
            record = {"step": step, "loss": loss.item(), "grad_norm": grad_norm.item(),
                      **loss_by_t_bucket(per_example, t)}
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        if step % config["sample_every"] == 0 and config["net"] != "mlp":
            evaluate_sampler(lambda z, c, n: ddim_sample(ema.model, z, n, c), config,
                             out / f"during/{step:07d}", [64], device)
        if step % config["ckpt_every"] == 0 or step == config["iterations"]:
            train_time += time.perf_counter() - start
            start = time.perf_counter()
            checkpoint()
    bar.close()
    log.plot(out / "loss.png", "teacher: v-MSE by t bucket")
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

    results = evaluate_sampler(sample, config, out, config["eval_steps"], device, title="teacher DDIM ")
    state = load_checkpoint(config["teacher"], "teacher checkpoint")
    metrics = {"preset": config["preset"], "sampler": "ddim", "unconditional": config["net"] == "mlp",
               "train_time_s": round(state["train_time"], 1), "iterations": state["step"],
               "device": str(device),
               "ddim": {str(k): {**v, "sample_time_s": round(timings[k], 3)} for k, v in results.items()}}
    if config["data"] == "gaussians8":  # the same DDIM with the exact denoiser: the best any teacher can do
        exact = toy_dataset("gaussians8").denoiser
        results = evaluate_sampler(lambda z, c, n: ddim_sample(exact, z, n, c), config, out / "exact_denoiser",
                                   config["eval_steps"], device, title="exact DDIM ")
        metrics["exact_denoiser_ddim"] = {str(k): v for k, v in results.items()}
    write_json(out / "metrics.json", metrics)
    return metrics


def load_teacher(config: dict, device: torch.device, train_if_missing: bool = True) -> Denoiser:
    """The frozen teacher (EMA weights, eval mode, no grads); trained first if missing."""
    path = Path(config["teacher"])
    if train_if_missing:
        state = load_checkpoint(path, "teacher checkpoint") if path.exists() else None
        if state is None or state["step"] < config["iterations"]:
            print(f"teacher checkpoint {path} is {'missing' if state is None else 'unfinished'}: training it first")
            train_teacher(config, resume=state is not None)
            evaluate_teacher(config, device)
    state = load_checkpoint(path, "teacher checkpoint")
    if state.get("kind") != "teacher":
        raise UserError(f"{path} is not a teacher checkpoint (it holds a {state.get('kind')!r})")
    check_compatible(state["config"], config, TEACHER_KEYS, "teacher checkpoint", path)
    teacher = frozen_denoiser(state["config"], state["ema"]["model"], device)
    teacher.checkpoint, teacher.fingerprint = str(path), fingerprint(state["ema"]["model"])  # what it is, for caches
    prepare_network(teacher, config, device, compile=False)  # students are copies of it
    return teacher


def main(argv=None) -> None:
    config = parse_config(__doc__.split("\n\n")[0], argv=argv,
                          flags={"resume": "continue the run from its checkpoint"})
    resume = config.pop("resume")
    device = pick_device(config["device"])
    print(f"training the {config['preset']} teacher on {device}: {config['iterations']} iterations "
          f"-> {config['teacher']}")
    train_teacher(config, resume=resume)
    metrics = evaluate_teacher(config, device)
    print(f"trained in {metrics['train_time_s']} s; samples and metrics in {teacher_dir(config)}")
    for steps, m in metrics["ddim"].items():
        if "off_mode" in m:
            print(f"  DDIM {steps:>3} steps: off-mode {m['off_mode']:.1%}  MMD {m['mmd']:.4f}  W2 {m['w2']:.3f}")


if __name__ == "__main__":
    run_cli(main)
