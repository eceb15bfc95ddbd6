"""Distribution Matching Distillation: a one-step (or K-step) generator trained by the gap
between a real and a fake score, plus a regression loss to the teacher's own samples.

Papers: Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation"
(arXiv 2311.18828), and for K > 1 the multi-step generator of DMD2 (Yin et al. 2024,
arXiv 2405.14867). Formulas: docs/methods.md section 3.

Three networks, each a copy of the teacher:
    generator   G(z) = x_hat(z, t = 1): the teacher's network at the top time, trained
    real score  mu_real = the frozen teacher (guided with `--real-guidance w` if w > 0)
    fake score  mu_fake, trained online to denoise the generator's samples

Algorithm (per generator update):
    `fake_updates` times:  x = G(z) (no gradient); fake score <- Alg. 1's loss on x
    x = G(z)
    t ~ U[0.02, 0.98];  x_t = alpha_t x + sigma_t eps
    grad = (mu_fake(x_t) - mu_real(x_t)) / mean_{C,H,W} |x - mu_real(x_t)|
    loss_DM = 0.5 || x - stopgrad(x - grad) ||^2                 (its gradient in x is grad)
    loss_reg = d(G(z_ref), y_ref)  on fixed pairs y_ref = teacher's `reg_steps`-step DDIM from z_ref
    generator <- AdamW step on loss_DM + `reg_weight` * loss_reg

K > 1 (DMD2): fixed times t_k = 1 - k / K; sampling predicts x at t_k, re-noises it with fresh
noise to t_{k+1}, predicts again. Training uses backward simulation: k ~ U{0..K-1}, the first
k steps run without gradient from pure noise, and the k-th step's x prediction is trained.

Deliberate differences from the papers:
- The top time is t = 1 exactly (DMD2 uses 0.999): v-prediction is defined at alpha = 0.
- The regression pairs come from the teacher's deterministic DDIM (the paper used the
  teacher's ODE sampler; a re-implementation used 18 Heun steps), and for K > 1 the
  regression pins the generator's first step from pure noise.
- No GAN head (DMD2's optional extra); an EMA of the generator (`--gen-ema`) is evaluated.
- The gradient is the papers' pseudo-code, (mu_fake - mu_real) / mean |x - mu_real|. With Eq. (7)
  and (8) under this cosine schedule it would carry a factor alpha_t (docs/methods.md [3.5]); the
  papers' teachers have alpha_t = 1.
- Per update the fake score trains first, on fresh samples, then the generator (DMD's Alg. 1
  updates the generator first and reuses its samples for the fake score).
- On toy data the regression distance is MSE (LPIPS needs images and downloaded weights),
  with weight 4, lr 4e-3, batch 256 and 4000 updates, tuned there (README); the cifar10 preset keeps the paper's values.

    python dmd.py --steps 1                      # toy on the CPU: teacher first if missing
    python dmd.py --steps 4 --gen-lr 1e-3 --fake-lr 1e-3 --dmd-iterations 3000   # DMD2's multi-step
                                                 # generator (the toy default lr 4e-3 is too high for it)
    python dmd.py --steps 1 --reg-weight 0       # distribution matching alone
    python dmd.py --steps 1 --resume
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from common import (EMA, UserError, check_compatible, check_same_teacher, ddim_sample, diffuse,
                    diffusion_loss, guided, load_checkpoint, no_grad_fp32, pick_device, read_json, rng_state,
                    run_cli, save_checkpoint, seed_everything, set_rng_state, trainable_copy, write_json)
from metrics import evaluate_sampler
from presets import parse_config
from train_teacher import load_teacher, teacher_dir
from training import LogWriter, autocast, progress, samples_per_second

DMD_FIELDS = {
    "steps": (int, "generator steps K: 1 is DMD's one-step generator, 2 or 4 DMD2's multi-step one"),
    "dmd_iterations": (int, "generator updates"),
    "dmd_batch_size": (int, "generator batch size (the fake score trains on the same size)"),
    "gen_lr": (float, "generator AdamW learning rate"),
    "fake_lr": (float, "fake score AdamW learning rate"),
    "fake_updates": (int, "fake-score updates per generator update (1 = DMD, 5 = DMD2's TTUR)"),
    "reg_weight": (float, "weight of the regression loss (paper 0.25; 0 disables it, the DMD2 setting)"),
    "reg_loss": (str, "regression distance: mse, pseudo-huber or lpips (images, needs its weights)"),
    "reg_pairs": (int, "size of the regression set of (noise, teacher sample) pairs"),
    "reg_steps": (int, "teacher DDIM steps used to make the regression pairs"),
    "real_guidance": (float, "classifier-free guidance weight w of the real score (0: none)"),
    "gen_ema": (float, "EMA decay of the generator's weights (0: no EMA)"),
    "lr_decay": (bool, "anneal both learning rates linearly to 0 over the run"),
    "dmd_label_dropout": (float, "probability of training on the null label (1.0: unconditional)"),
    "eval_every": (int, "generator updates between metrics and pictures"),
    "tag": (str, "suffix of the run folder, to keep variants apart (e.g. noreg)"),
}
DMD_PRESETS = {
    # Toy values tuned on gaussians8 (README): lr 1e-4 -> 4e-3 and regression 0.25 -> 4 moved it most;
    # batch 256 reaches about what 512 does per update, in 0.6x the time.
    "toy": {"steps": 1, "dmd_iterations": 4000, "dmd_batch_size": 256, "gen_lr": 4e-3, "fake_lr": 4e-3,
            "fake_updates": 5, "reg_weight": 4.0, "reg_loss": "mse", "reg_pairs": 8192, "reg_steps": 256,
            "real_guidance": 0.0, "gen_ema": 0.99, "lr_decay": False, "dmd_label_dropout": 1.0, "eval_every": 500,
            "tag": ""},
    "fmnist": {"steps": 1, "dmd_iterations": 20_000, "dmd_batch_size": 128, "gen_lr": 5e-5, "fake_lr": 5e-5,
               "fake_updates": 5, "reg_weight": 0.25, "reg_loss": "pseudo-huber", "reg_pairs": 10_000,
               "reg_steps": 64, "real_guidance": 0.0, "gen_ema": 0.999, "lr_decay": False,
               "dmd_label_dropout": 0.1, "eval_every": 2000, "tag": ""},
    # The paper's CIFAR-10 settings (docs/methods.md section 3): AdamW 5e-5, wd 0.01, batch 392, LPIPS x 0.25.
    "cifar10": {"steps": 1, "dmd_iterations": 200_000, "dmd_batch_size": 392, "gen_lr": 5e-5, "fake_lr": 5e-5,
                "fake_updates": 1, "reg_weight": 0.25, "reg_loss": "lpips", "reg_pairs": 100_000,
                "reg_steps": 64, "real_guidance": 0.0, "gen_ema": 0.9999, "lr_decay": False,
                "dmd_label_dropout": 0.1, "eval_every": 10_000, "tag": ""},
}
REG_LOSSES = ("mse", "pseudo-huber", "lpips")
# A run's settings: resuming its checkpoint with other values would mix two runs. All of DMD's fields
# but these, which a resumed run may change (more updates, another evaluation cadence).
RESUMABLE_FIELDS = ("dmd_iterations", "eval_every", "tag")
RUN_KEYS = (*(k for k in DMD_FIELDS if k not in RESUMABLE_FIELDS), "seed", "grad_clip")
# What makes the regression pairs (besides the teacher's weights).
REGRESSION_KEYS = ("reg_pairs", "reg_steps", "real_guidance", "dmd_label_dropout", "num_classes", "seed")
DM_T_MIN, DM_T_MAX = 0.02, 0.98
NORMALISER_EPS = 1e-6


# ----------------------------------------------------------------------------------------
# The generator: K fixed times, fresh noise between steps
# ----------------------------------------------------------------------------------------


def generator_times(steps: int) -> list[float]:
    """t_k = 1 - k / K, k = 0..K-1: [1.0] for K = 1, [1, 0.75, 0.5, 0.25] for K = 4."""
    return [1.0 - k / steps for k in range(steps)]


@torch.no_grad()
def generate(generator, z: torch.Tensor, labels: torch.Tensor, steps: int, first: int | None = None):
    """Sample with K steps; with `first=k`, run only the first k steps (backward simulation)
    and return the latent z_{t_k} and t_k that the k-th step starts from."""
    times = generator_times(steps)
    assert first is None or 0 <= first < steps, "backward simulation stops before the last step"
    z_t = z  # z_{t_0} = pure noise (t_0 = 1)
    for k, t in enumerate(times):
        if first is not None and k == first:
            return z_t, t
        x = generator(z_t, torch.full((z.shape[0],), t, device=z.device), labels)  # x prediction at t_k
        if k + 1 < len(times):  # re-noise with fresh noise to the next time
            z_t = diffuse(x, times[k + 1], torch.randn_like(x))
    return x


def backward_simulation(generator, z: torch.Tensor, labels: torch.Tensor, steps: int):
    """DMD2's backward simulation: k ~ U{0..K-1}; the first k steps run from pure noise without
    gradient. Returns the latent z_{t_k} (B, ...) and t_k (B,) that the trained k-th step starts from."""
    k = int(torch.randint(steps, ()))
    z_k, t_k = generate(generator, z, labels, steps, first=k)
    return z_k, torch.full((z.shape[0],), t_k, device=z.device)


@torch.no_grad()
def generator_samples(generator, z: torch.Tensor, labels: torch.Tensor, steps: int) -> torch.Tensor:
    """The distribution the fake score must learn: the k-th step's x prediction under backward
    simulation, no gradient. For K = 1 these are G(z); for K > 1 a mix of all K steps' outputs.
    DisBack records its degradation path on the same samples."""
    z_k, t_k = backward_simulation(generator, z, labels, steps)
    return generator(z_k, t_k, labels)


# ----------------------------------------------------------------------------------------
# The losses (pure functions)
# ----------------------------------------------------------------------------------------


def dmd_generator_loss(x: torch.Tensor, real_score, fake_score, labels: torch.Tensor,
                       t: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
    """DMD's distribution-matching loss for generator samples x (B, ...), with gradient grad
    w.r.t. x (up to the mean over elements):

        grad = (mu_fake(x_t, t) - mu_real(x_t, t)) / mean_{C,H,W} |x - mu_real(x_t, t)|
        loss = 0.5 * mean || x - stopgrad(x - grad) ||^2
    """
    if t is None:
        t = DM_T_MIN + (DM_T_MAX - DM_T_MIN) * torch.rand(x.shape[0], device=x.device)  # t ~ U[0.02, 0.98]
    if eps is None:
        eps = torch.randn_like(x)
    with no_grad_fp32():  # both scores in fp32: grad is their (small) difference
        x_t = diffuse(x.detach(), t, eps)  # x_t = alpha_t x + sigma_t eps
        mu_real = real_score(x_t, t, labels)
        mu_fake = fake_score(x_t, t, labels)
        dims = tuple(range(1, x.dim()))
        normaliser = (x.detach() - mu_real).abs().mean(dim=dims, keepdim=True)  # per sample
        grad = (mu_fake - mu_real) / normaliser.clamp(min=NORMALISER_EPS)
        grad = torch.nan_to_num(grad)
    # stop-gradient trick: d/dx of 0.5 * (x - sg(x - grad))^2 is grad
    return 0.5 * (x - (x - grad).detach()).pow(2).mean()


def fake_score_loss(fake_score, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fake score learns to denoise the generator's samples: Alg. 1's loss on x (detached)."""
    return diffusion_loss(fake_score, x.detach(), labels)


def regression_loss(x: torch.Tensor, y: torch.Tensor, kind: str, lpips=None) -> torch.Tensor:
    """d(G(z_ref), y_ref): mse, pseudo-huber (sqrt(||x - y||^2 + c^2) - c, c = 0.00054 sqrt(d))
    or LPIPS (the paper's choice for images)."""
    if kind == "mse":
        return (x - y).pow(2).flatten(1).mean(1).mean()
    if kind == "pseudo-huber":
        c = 0.00054 * math.sqrt(x[0].numel())
        return (torch.sqrt((x - y).pow(2).flatten(1).sum(1) + c * c) - c).mean()
    if kind == "lpips":
        return lpips(x.clamp(-1, 1), y.clamp(-1, 1))
    raise UserError(f"unknown --reg-loss {kind!r}; choose one of {', '.join(REG_LOSSES)}")


def load_lpips(config: dict, device):
    """LPIPS through torchmetrics; its VGG weights must be downloadable or cached."""
    if config["net"] == "mlp":
        raise UserError("--reg-loss lpips needs images; use --reg-loss mse or pseudo-huber on toy data")
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    except ImportError:
        raise UserError("--reg-loss lpips needs torchmetrics (pip install torchmetrics); "
                        "or use --reg-loss pseudo-huber") from None
    try:
        metric = LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=False).to(device)
    except Exception as e:
        raise UserError(f"LPIPS weights cannot be loaded ({type(e).__name__}); "
                        "use --reg-loss pseudo-huber, which needs no download") from None

    def lpips(x, y):
        if x.shape[1] == 1:  # grey images: LPIPS's network wants three channels
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        with torch.autocast(x.device.type, enabled=False):  # the comparison in fp32
            return metric(x.float(), y.float())

    return lpips


# ----------------------------------------------------------------------------------------
# The regression set: (z, labels, y) with y the teacher's deterministic sample from z
# ----------------------------------------------------------------------------------------


def sample_labels(n: int, config: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """Class labels uniform over the classes, each replaced by the null label w.p. dmd_label_dropout."""
    labels = torch.randint(config["num_classes"], (n,), generator=generator)
    drop = torch.rand(n, generator=generator) < config["dmd_label_dropout"]
    return torch.where(drop, torch.full_like(labels, config["num_classes"]), labels)


def regression_pairs(teacher, config: dict, device) -> dict:
    """Generated once with a progress bar and cached beside the teacher, keyed on everything that
    makes the pairs: the teacher's weights, the real score's guidance, the labels, the sampler, the seed."""
    key = {"teacher": teacher.fingerprint, **{k: config[k] for k in REGRESSION_KEYS}}
    name = (f"regression_{config['reg_pairs']}x{config['reg_steps']}_null{config['dmd_label_dropout']:g}"
            f"_w{config['real_guidance']:g}.pt")
    path = teacher_dir(config) / name
    if path.exists():
        pairs = load_checkpoint(path, "regression set")
        if pairs.get("key") == key:
            return pairs  # made by this very teacher with these settings; otherwise made anew below
    g = torch.Generator().manual_seed(config["seed"] + 777)
    n = config["reg_pairs"]
    shape = (2,) if config["net"] == "mlp" else (config["in_ch"], 32, 32)
    z, labels = torch.randn(n, *shape, generator=g), sample_labels(n, config, g)
    ys, batch = [], 1024 if config["net"] == "mlp" else 256
    real = real_score_of(teacher, config)
    for i in progress(range(0, n, batch), f"regression set ({config['reg_steps']}-step teacher DDIM)"):
        zb, cb = z[i:i + batch].to(device), labels[i:i + batch].to(device)
        with no_grad_fp32():  # targets in fp32
            ys.append(ddim_sample(real, zb, config["reg_steps"], cb).cpu())
    pairs = {"z": z, "labels": labels, "y": torch.cat(ys), "key": key}
    save_checkpoint(path, pairs)
    return pairs


def real_score_of(teacher, config: dict):
    """mu_real: the teacher, guided with weight w when `real_guidance` > 0."""
    w = config["real_guidance"]
    return guided(teacher, w, teacher.null_label) if w > 0 else teacher


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


def check_config(config: dict) -> None:
    if config["steps"] < 1:
        raise UserError(f"--steps must be at least 1 (1 = one-step generator), got {config['steps']}")
    if config["reg_loss"] not in REG_LOSSES:
        raise UserError(f"unknown --reg-loss {config['reg_loss']!r}; choose one of {', '.join(REG_LOSSES)}")
    if config["fake_updates"] < 1:
        raise UserError(f"--fake-updates must be at least 1, got {config['fake_updates']}")
    if config["real_guidance"] < 0:
        raise UserError(f"--real-guidance must be >= 0, got {config['real_guidance']}")
    if config["reg_weight"] < 0:
        raise UserError(f"--reg-weight must be >= 0, got {config['reg_weight']}")
    if not 0.0 <= config["gen_ema"] < 1.0:
        raise UserError(f"--gen-ema must be in [0, 1), got {config['gen_ema']}")


def run_dir(config: dict) -> Path:
    return Path(config["out_dir"]) / (f"dmd_{config['steps']}step" + (f"_{config['tag']}" if config["tag"] else ""))


def adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.999))


def train_dmd(config: dict, resume: bool = False, out: Path | None = None, real_score_at=None,
              fake_start: dict | None = None, run_keys=RUN_KEYS) -> dict:
    """The loop above. DisBack (disback.py) reuses it unchanged apart from four arguments: its run
    folder `out`, `real_score_at(step)`, the real score for generator update `step` (DMD: always
    the teacher), `fake_start`, the fake score's initial weights (DMD: the teacher's), and
    `run_keys`, the settings a resumed checkpoint must share (DisBack adds its path's)."""
    check_config(config)
    device = pick_device(config["device"])
    out = out or run_dir(config)
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not resume:
        raise UserError(f"{out} holds an earlier run; pass --resume to continue it, or --tag for a new run")
    lpips = load_lpips(config, device) if config["reg_weight"] > 0 and config["reg_loss"] == "lpips" else None
    teacher = load_teacher(config, device)  # frozen, eval mode, no grads; trained first if missing
    if real_score_at is None:
        real_score = real_score_of(teacher, config)

        def real_score_at(step):
            return real_score
    pairs = regression_pairs(teacher, config, device) if config["reg_weight"] > 0 else None

    seed_everything(config["seed"])
    generator, fake_score = trainable_copy(teacher), trainable_copy(teacher)  # both start as the teacher
    if fake_start is not None:
        fake_score.load_state_dict(fake_start)
    gen_opt, fake_opt = adamw(generator, config["gen_lr"]), adamw(fake_score, config["fake_lr"])
    ema = EMA(generator, config["gen_ema"]) if config["gen_ema"] > 0 else None
    step, history, train_time = 0, [], 0.0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, "DMD checkpoint")
        check_compatible(state["config"], config, run_keys, "DMD checkpoint", ckpt_path)
        check_same_teacher(state.get("teacher"), teacher, "DMD checkpoint", ckpt_path)
        generator.load_state_dict(state["generator"])
        fake_score.load_state_dict(state["fake_score"])
        gen_opt.load_state_dict(state["gen_opt"])
        fake_opt.load_state_dict(state["fake_opt"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        step, history, train_time = state["step"], state["history"], state["train_time"]
        print(f"resuming {out} at generator update {step}")
    log = LogWriter(out / "log.jsonl", resume=step > 0)
    if step > 0:
        log.restore(state.get("log"))
    sampler = ema.model if ema is not None else generator
    batch, K = config["dmd_batch_size"], config["steps"]
    shape = (2,) if config["net"] == "mlp" else (config["in_ch"], 32, 32)

    def noise_and_labels():
        return torch.randn(batch, *shape, device=device), sample_labels(batch, config).to(device)

    def evaluate(tag_step: int) -> dict:
        sampler.eval()
        result = evaluate_sampler(lambda z, c, n: generate(sampler, z, c, n), config, out / f"eval_{tag_step:07d}",
                                  [K], device, title=f"DMD update {tag_step}: ")[K]
        sampler.train()
        return {"step": tag_step, **result}

    def checkpoint():
        save_checkpoint(ckpt_path, {"kind": "dmd", "config": config, "teacher": teacher.fingerprint,
                                    "step": step, "history": history,
                                    "train_time": train_time, "generator": generator.state_dict(),
                                    "fake_score": fake_score.state_dict(), "gen_opt": gen_opt.state_dict(),
                                    "fake_opt": fake_opt.state_dict(), "rng": rng_state(),
                                    "ema": ema.state_dict() if ema is not None else None, "log": log.records()})

    if step == 0:
        history.append(evaluate(0))
    bar = progress(range(step, config["dmd_iterations"]), f"DMD {K}-step", initial=step,
                   total=config["dmd_iterations"])
    start = time.perf_counter()
    for step in bar:
        if config["lr_decay"]:
            scale = 1.0 - step / config["dmd_iterations"]
            gen_opt.param_groups[0]["lr"], fake_opt.param_groups[0]["lr"] = (config["gen_lr"] * scale,
                                                                              config["fake_lr"] * scale)
        # The fake score tracks the generator's current distribution (TTUR: `fake_updates` times).
        for _ in range(config["fake_updates"]):
            z, labels = noise_and_labels()
            x = generator_samples(generator, z, labels, K)  # backward simulation, no gradient
            with autocast(config, device):
                loss_fake = fake_score_loss(fake_score, x, labels)
            fake_opt.zero_grad(set_to_none=True)
            loss_fake.backward()
            torch.nn.utils.clip_grad_norm_(fake_score.parameters(), config["grad_clip"])
            fake_opt.step()
        # The generator: distribution matching on its k-th step, plus regression.
        z, labels = noise_and_labels()
        z_k, t_k = backward_simulation(generator, z, labels, K)  # the first k steps without gradient
        with autocast(config, device):
            x = generator(z_k, t_k, labels)  # the k-th step, trained
            loss_dm = dmd_generator_loss(x, real_score_at(step), fake_score, labels)
            loss = loss_dm
            if pairs is not None:
                idx = torch.randint(len(pairs["y"]), (batch,))
                z_ref, c_ref, y_ref = (pairs[key][idx].to(device) for key in ("z", "labels", "y"))
                x_ref = generator(z_ref, torch.ones(batch, device=device), c_ref)  # G(z_ref) at the top time
                loss_reg = regression_loss(x_ref, y_ref, config["reg_loss"], lpips)
                loss = loss_dm + config["reg_weight"] * loss_reg
        gen_opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(generator.parameters(), config["grad_clip"])
        gen_opt.step()
        if ema is not None:
            ema.update(generator)
        step += 1
        if step % config["log_every"] == 0 or step == config["dmd_iterations"]:
            record = {"step": step, "loss_dm": loss_dm.item(), "loss_fake": loss_fake.item(),
                      "grad_norm": grad_norm.item()}
            if pairs is not None:
                record["loss_reg"] = loss_reg.item()
            log.write(record)
            bar.set_postfix(dm=f"{record['loss_dm']:.2e}", fake=f"{record['loss_fake']:.3f}")
        if step % config["eval_every"] == 0 or step == config["dmd_iterations"]:
            train_time += time.perf_counter() - start
            save_dm_view(generator, real_score_at(step - 1), fake_score, config, device,
                         out / f"eval_{step:07d}" / "dm_view.png")
            history.append(evaluate(step))
            start = time.perf_counter()
            if "off_mode" in history[-1]:
                bar.write(f"  update {step}: off-mode {history[-1]['off_mode']:.1%}  MMD {history[-1]['mmd']:.4f}")
        if step % config["ckpt_every"] == 0 or step == config["dmd_iterations"]:
            checkpoint()
    bar.close()
    log.plot(out / "loss.png", f"DMD {K}-step: losses")
    return finish(config, out, history, train_time, sampler, device)


# ----------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------


def save_dm_view(generator, real_score, fake_score, config: dict, device, png: Path) -> None:
    """DMD2's debugging view: the generator's output x beside the real and fake scores'
    predictions from the same noised x_t (t = 0.25). Where they differ is where G is pushed."""
    from common import save_image_grid, save_scatter

    g = torch.Generator().manual_seed(config["eval_seed"] + 1)
    n = 500 if config["net"] == "mlp" else 8
    shape = (2,) if config["net"] == "mlp" else (config["in_ch"], 32, 32)
    z, labels = torch.randn(n, *shape, generator=g).to(device), sample_labels(n, config, g).to(device)
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


def finish(config: dict, out: Path, history: list, train_time: float, sampler, device) -> dict:
    """metrics.json: the final generator beside the teacher's DDIM, the convergence history,
    and the sampling speed (samples/s, generator K steps vs the teacher's 256-step DDIM)."""
    teacher_metrics = read_json(teacher_dir(config) / "metrics.json")
    speed = sampling_speed(sampler, config, device)
    metrics = {"preset": config["preset"], "steps": config["steps"], "reg_weight": config["reg_weight"],
               "fake_updates": config["fake_updates"], "train_time_s": round(train_time, 1),
               "final": history[-1], "history": history, "teacher_ddim": teacher_metrics.get("ddim", {}),
               "samples_per_s": speed}
    write_json(out / "metrics.json", metrics)
    plot_history(history, teacher_metrics.get("ddim", {}), out / "convergence.png", config)
    return metrics


@torch.no_grad()
def sampling_speed(sampler, config: dict, device, teacher_steps: int = 256) -> dict:
    """Samples per second on one batch after a warm-up, synchronised on CUDA."""
    teacher = load_teacher(config, device, train_if_missing=False)
    n = 2000 if config["net"] == "mlp" else 64
    shape = (2,) if config["net"] == "mlp" else (config["in_ch"], 32, 32)
    z = torch.randn(n, *shape, device=device)
    labels = torch.full((n,), config["num_classes"], device=device)

    sampler.eval()
    gen = samples_per_second(lambda: generate(sampler, z, labels, config["steps"]), n, device)
    sampler.train()
    ddim = samples_per_second(lambda: ddim_sample(teacher, z, teacher_steps, labels), n, device)
    return {"batch": n, "generator": round(gen, 1), f"teacher_ddim_{teacher_steps}": round(ddim, 1),
            "speedup": round(gen / ddim, 1)}


def plot_history(history: list, teacher: dict, png: Path, config: dict) -> None:
    from matplotlib.figure import Figure

    key = "off_mode" if "off_mode" in history[-1] else "mmd"
    if key not in history[-1]:
        return
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    ax.plot([h["step"] for h in history], [h[key] for h in history], "o-", label=f"DMD {config['steps']}-step")
    for steps, style in (("1", ":"), ("4", "--"), ("256", "-")):
        if steps in teacher and key in teacher[steps]:
            ax.axhline(teacher[steps][key], ls=style, c="0.4", lw=1, label=f"teacher DDIM {steps}")
    ax.set_yscale("log")
    ax.set_xlabel("generator updates")
    ax.set_ylabel(key.replace("_", "-"))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> None:
    config = parse_config(__doc__.split("\n\n")[0], DMD_FIELDS, DMD_PRESETS, argv=argv,
                          flags={"resume": "continue the run from its checkpoint"})
    resume = config.pop("resume")
    check_config(config)
    print(f"DMD, {config['preset']}: {config['steps']}-step generator, {config['dmd_iterations']} updates, "
          f"{config['fake_updates']} fake-score updates each, regression weight {config['reg_weight']}")
    metrics = train_dmd(config, resume=resume)
    final, teacher = metrics["final"], metrics["teacher_ddim"]
    if "off_mode" in final:
        line = f"{config['steps']}-step generator: off-mode {final['off_mode']:.1%}, MMD {final['mmd']:.4f}"
        if "256" in teacher:
            line += f" (teacher DDIM 256 steps: {teacher['256']['off_mode']:.1%}, {teacher['256']['mmd']:.4f})"
        print(line)
    print(f"trained in {metrics['train_time_s']} s; {metrics['samples_per_s']['speedup']}x the samples/s of the "
          f"teacher's 256-step DDIM; everything in {run_dir(config)}")


if __name__ == "__main__":
    run_cli(main)
