"""Distribution Matching Distillation: a one-step (or K-step) generator trained by the gap
between a real and a fake score, plus a regression loss to the teacher's own samples (DMD) or a
GAN term on real data (DMD2).

Papers: Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation"
(arXiv 2311.18828), and DMD2 (Yin et al. 2024, arXiv 2405.14867): its two time-scale update
rule, its GAN (dmd2.py) and its K-step generator. Formulas: docs/methods.md section 3.

Three networks, each a copy of the teacher:
    generator   G(z) = x_hat(z, t = 1): the teacher's network at the top time, trained
    real score  mu_real = the frozen teacher (guided with `--real-guidance w` if w > 0)
    fake score  mu_fake, trained online to denoise the generator's samples

Algorithm (per generator update):
    `fake_updates` times (DMD: 1; DMD2's TTUR: 5):
        x = G(z) (no gradient); fake score <- Alg. 1's loss on x
                                 + `cls_gan_weight` * loss_cls(x_real, x)    (DMD2: dmd2.GAN.classifier_loss)
    x = G(z)
    t ~ U[0.02, 0.98];  x_t = alpha_t x + sigma_t eps
    grad = (mu_fake(x_t) - mu_real(x_t)) / mean_{C,H,W} |x - mu_real(x_t)|
    loss_DM = 0.5 || x - stopgrad(x - grad) ||^2                 (its gradient in x is grad)
    loss_reg = d(G(z_ref), y_ref)  on fixed pairs y_ref = teacher's `reg_steps`-step DDIM from z_ref
    loss_G_GAN = softplus(-D(F(x, t')))  the classifier on the fake score's bottleneck (DMD2: dmd2.py)
    generator <- AdamW step on `dm_weight` * loss_DM + `reg_weight` * loss_reg + `gen_gan_weight` * loss_G_GAN

`--recipe dmd` is the DMD paper (regression, no GAN); `--recipe dmd2` is DMD2 (no regression,
five fake-score updates per generator update, the GAN): dmd2.DMD2_RECIPE holds what it changes.

K > 1 (DMD2): fixed times t_k = 1 - k / K; sampling predicts x at t_k, re-noises it with fresh
noise to t_{k+1}, predicts again. Training uses backward simulation: k ~ U{0..K-1}, the first
k steps run without gradient from pure noise, and the k-th step's x prediction is trained. The fake
score is told each sample's step, mu_fake(x_t, t | t_k) (`StepAware`).

Deliberate differences from the papers:
- The top time is t = 1 exactly (DMD2 uses 0.999): v-prediction is defined at alpha = 0.
- The regression pairs come from the teacher's deterministic DDIM (the paper used the
  teacher's ODE sampler; a re-implementation used 18 Heun steps), and for K > 1 the
  regression pins the generator's first step from pure noise.
- An EMA of the generator (`--gen-ema`) is evaluated.
- Backward simulation draws k for each sample; DMD2's code draws one k per batch, which at our
  learning rates makes the fake score chase one step at a time (`backward_simulation`).
- For K > 1 the fake score is told the step t_k that made each sample (`StepAware`; DMD2's is not,
  `--no-fake-knows-step`): a fake score of the K steps' mix lets the steps drift apart as long as
  they average out (fmnist16, 4 steps: FD 5.63 not told, 0.83 told; docs/results.md).
- The gradient is the papers' pseudo-code, (mu_fake - mu_real) / mean |x - mu_real|. With Eq. (7)
  and (8) under this cosine schedule it would carry a factor alpha_t (docs/methods.md [3.5]); the
  papers' teachers have alpha_t = 1.
- Per update the fake score trains first, on fresh samples, then the generator (DMD's Alg. 1
  updates the generator first and reuses its samples for the fake score).
- On toy data the regression distance is MSE (LPIPS needs images and downloaded weights),
  with weight 4, lr 4e-3, batch 256 and 4000 updates, tuned there (docs/results.md); the cifar10
  preset keeps the paper's values.

    python dmd.py --steps 1                      # toy on the CPU: teacher first if missing
    python dmd.py --steps 1 --recipe dmd2        # DMD2: no regression, TTUR, GAN
    python dmd.py --steps 4 --gen-lr 1e-3 --fake-lr 1e-3 --dmd-iterations 3000   # DMD2's multi-step
                                                 # generator (the toy default lr 4e-3 is too high for it)
    python dmd.py --steps 1 --reg-weight 0       # distribution matching alone
    python dmd.py --steps 1 --resume
"""

from __future__ import annotations

import plumbing.interrupt  # noqa: F401  (first: Ctrl-C while torch loads is one line)
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from common import ddim_sample, diffuse, diffusion_loss, guided, no_grad_fp32, trainable_copy
from dmd2 import DMD2_RECIPE, GAN
from plumbing.config import parse_config, sample_shape
from plumbing.distributed import per_process
from plumbing.errors import UserError, require
from plumbing.folders import cache_dir, check_start, check_teacher_path, dmd_dir, hold
from plumbing.image_metrics import load_lpips
from plumbing.loop import Loop
from plumbing.metrics import image_batch
from plumbing.pretrained import is_pretrained
from plumbing.reports import DMDMonitor, print_dmd_summary
from plumbing.training import (EMA, autocast, cached, check_same_teacher, load_checkpoint, optimizer_step, pick_device,
                               progress, run_cli, seed_everything)
from train_teacher import TeacherConfig, load_teacher, require_null_label

REG_LOSSES = ("mse", "pseudo-huber", "lpips")
RECIPES = {"dmd": {}, "dmd2": DMD2_RECIPE}  # what each recipe changes of a preset's DMD values
DM_T_MIN, DM_T_MAX = 0.02, 0.98  # the distribution-matching loss's time range (paper: 0.02 T to 0.98 T)
NORMALISER_EPS = 1e-6


@dataclass
class DMDConfig(TeacherConfig):
    """DMD (defaults: the paper's CIFAR-10 settings where it states them, docs/methods.md 3.4)

    Each field's comment says where its default comes from: the DMD paper, DMD2, a public
    re-implementation, or this project (where neither paper states a value). `recipe` picks DMD's values or
    DMD2's (dmd2.DMD2_RECIPE on top of the preset's): fmnist16 runs DMD2, measured better there (FD 0.82
    against 0.99 after 600 updates, docs/results.md); the toy preset runs DMD, ahead on toy data; the GPU
    presets keep DMD's until measured. Two defaults are not DMD's:
    - `dmd_label_dropout` 0.1: DMD's CIFAR-10 generator is class-conditional (DMD2's code draws class
      labels only, never a null label); 0.1 is the teacher's label dropout, so that the unconditional
      model is distilled beside the conditional one.
    - `grad_clip` 1.0 (inherited from TeacherConfig: the PD paper's clip for teacher training) clips both
      the generator's and the fake score's gradient norm. DMD states no clip; DMD2's code clips both at
      10 (`--max_grad_norm`'s default in main/edm/train_edm.py of tianweiy/DMD2, kept by its ImageNet scripts).
    """

    steps: int = 1                    # generator steps K (DMD's one-step generator: 1; DMD2's multi-step one: 2, 4)
    dmd_iterations: int = 200_000     # generator updates (this project's budget: docs/methods.md 3.4 lists none)
    dmd_batch_size: int = 392         # generator batch (global under torchrun), also the fake score's (paper: 392)
    gen_lr: float = 5e-5              # generator AdamW learning rate, weight decay 0.01 (paper: 5e-5)
    fake_lr: float = 5e-5             # fake score AdamW learning rate (paper: 5e-5)
    fake_updates: int = 1             # fake-score updates per generator update (DMD: 1; DMD2's TTUR: 5)
    reg_weight: float = 0.25          # weight of the regression loss (paper: 0.25; 0 disables it, as DMD2)
    reg_loss: str = "lpips"           # regression distance: lpips, mse or pseudo-huber (paper: lpips; needs weights)
    reg_pairs: int = 100_000          # (noise, teacher sample) pairs in the regression set (a re-implementation: 100k)
    reg_steps: int = 64               # teacher DDIM steps that make the pairs (this project; the paper: an ODE solver)
    real_guidance: float = 0.0        # classifier-free guidance weight w of the real score (0: none, as on CIFAR-10)
    gen_ema: float = 0.9999           # EMA decay of the generator's weights, which is evaluated (0: none; this project)
    lr_decay: bool = False            # anneal both learning rates linearly to 0 over the run (DMD2's code: constant)
    dmd_label_dropout: float = 0.1    # probability of training on the null label (1.0: unconditional; not DMD's, above)
    eval_every: int = 10_000          # generator updates between metrics and pictures (this project)
    tag: str = ""                     # suffix of the run folder, to keep variants apart (e.g. noreg)
    recipe: str = "dmd"               # dmd: DMD's paper; dmd2: no regression, TTUR, GAN; fmnist16: dmd2 (this project)
    dm_weight: float = 1.0            # weight of the distribution-matching loss (0: DMD2 Table 3's GAN alone; paper: 1)
    gen_gan_weight: float = 0.0       # weight of the generator's GAN loss (DMD: none; DMD2's code: 3e-3, its recipe)
    cls_gan_weight: float = 0.0       # weight of the classifier's GAN loss in the fake score's (DMD: none; DMD2: 1e-2)
    fake_knows_step: bool = True      # K > 1: the fake score is told each sample's step t_k (this project, not DMD2)

    PRESETS: ClassVar[dict] = {
        # Toy values tuned on gaussians8 (docs/results.md): lr 4e-3 and regression weight 4 moved it most;
        # batch 256 reaches about what 512 does per update, in 0.6x the time. Its default recipe is DMD's: after
        # 500 updates DMD2's was at 22.1% off-mode against DMD's 9.8% (docs/results.md, DMD2 on fmnist16).
        "toy": dict(dmd_iterations=4000, dmd_batch_size=256, gen_lr=4e-3, fake_lr=4e-3, fake_updates=5,
                    reg_weight=4.0, reg_loss="mse", reg_pairs=8192, reg_steps=256, gen_ema=0.99,
                    dmd_label_dropout=1.0, eval_every=500),
        # 2 CPU cores: 2000 regression pairs, two fake-score updates per generator update. After 600 updates
        # (docs/results.md): 16-step pairs at 2e-4 FD 1.25; 64-step pairs at 5e-4 1.00 (0.87 after 1200);
        # 64-step pairs at 1e-3 annealed to 0 0.96.
        # Its default recipe is DMD2's (dmd2.DMD2_RECIPE: no regression, TTUR 5, the GAN): after 600 updates FD 0.81
        # against DMD's 0.94 from the same teacher and seed, 0.82 against 0.99 over three evaluation seeds
        # (docs/results.md, DMD2 on fmnist16; 0.77 and 0.80 with an earlier classifier head).
        "fmnist16": dict(recipe="dmd2", dmd_iterations=600, dmd_batch_size=64, gen_lr=1e-3, fake_lr=1e-3,
                         lr_decay=True, fake_updates=2, reg_weight=1.0, reg_loss="mse", reg_pairs=2000, reg_steps=64,
                         gen_ema=0.999, eval_every=100),
        "fmnist": dict(dmd_iterations=20_000, dmd_batch_size=128, fake_updates=5, reg_loss="pseudo-huber",
                       reg_pairs=10_000, gen_ema=0.999, eval_every=2000),
    }
    RESUMABLE: ClassVar[tuple] = ("dmd_iterations", "eval_every", "tag")  # more updates, another cadence
    ADDED: ClassVar[dict] = {"fake_knows_step": False}  # what a run saved before the field existed had in effect

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """The preset's DMD values, then DMD2's recipe where `recipe` is dmd2 (dmd2.DMD2_RECIPE), then
        `overrides`."""
        preset = [k.__dict__.get("PRESETS", {}).get(name, {}) for k in cls.__mro__]  # subclass first
        recipe = overrides.get("recipe") or next((p["recipe"] for p in preset if "recipe" in p),
                                                 cls.__dataclass_fields__["recipe"].default)
        require(recipe in RECIPES, f"unknown --recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        values = {**RECIPES[recipe].get("all", {}), **RECIPES[recipe].get(name, {})}
        return super().from_preset(name, **{**values, **overrides})

    def check(self) -> None:
        super().check()
        check_config(self)  # below the algorithm
        if self.steps == 1:  # one step: no step to tell the fake score (and one-step runs match the earlier ones)
            self.fake_knows_step = False


# ==== The losses (pure functions) =====================================================================================


def dmd_generator_loss(x: torch.Tensor, real_score, fake_score, labels: torch.Tensor,
                       t: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
    """DMD's distribution-matching loss for generator samples x (B, ...), with gradient grad
    w.r.t. x (up to the mean over elements):

        grad = (mu_fake(x_t, t) - mu_real(x_t, t)) / mean_{C,H,W} |x - mu_real(x_t, t)|
        loss = 0.5 * mean || x - stopgrad(x - grad) ||^2
    """
    ### BEGIN SOLUTION
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
    ### END SOLUTION


def fake_score_loss(fake_score, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fake score learns to denoise the generator's samples: Alg. 1's loss on x (detached)."""
    ### BEGIN SOLUTION
    return diffusion_loss(fake_score, x.detach(), labels)
    ### END SOLUTION


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


# ==== The generator: K fixed times, fresh noise between steps =========================================================


def generator_times(steps: int) -> list[float]:
    """t_k = 1 - k / K, k = 0..K-1: [1.0] for K = 1, [1, 0.75, 0.5, 0.25] for K = 4."""
    return [1.0 - k / steps for k in range(steps)]


@torch.no_grad()
def generate(generator, z: torch.Tensor, labels: torch.Tensor, steps: int, first: int | None = None):
    """Sample with K steps; with `first=k`, run only the first k steps (backward simulation)
    and return the latent z_{t_k} and t_k that the k-th step starts from."""
    ### BEGIN SOLUTION
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
    ### END SOLUTION


@torch.no_grad()
def backward_simulation(generator, z: torch.Tensor, labels: torch.Tensor, steps: int):
    """DMD2's backward simulation: k ~ U{0..K-1}, drawn for each sample; the first k steps run from pure noise
    without gradient, as `generate` runs them. Returns the latents z_{t_k} (B, ...) and times t_k (B,) that the
    trained k-th step starts from. (DMD2's code draws one k per batch, shared by every GPU; at its learning rate of
    5e-7 the fake score averages many batches, but at ours it chases the last batch's step, and a per-batch k loses
    modes: docs/results.md, "DMD2's 4-step generator".)"""
    n, times = z.shape[0], generator_times(steps)
    if steps == 1:  # nothing to simulate (the one draw keeps one-step runs' random stream as it was measured)
        torch.randint(1, ())
        return z, torch.ones(n, device=z.device)
    k = torch.randint(steps, (n,)).to(z.device)  # (B,): each sample's step
    z_k, idx, z_t = z.clone(), torch.arange(n, device=z.device), z  # z_{t_0} = pure noise; idx: still running
    for j in range(1, int(k.max()) + 1):  # step j - 1 of the sampler, run for the samples with k >= j only
        keep = k[idx] >= j
        idx, z_t = idx[keep], z_t[keep]
        x = generator(z_t, torch.full((len(idx),), times[j - 1], device=z.device), labels[idx])
        z_t = diffuse(x, times[j], torch.randn_like(x))  # re-noised with fresh noise to t_j
        done = k[idx] == j  # the samples whose step starts here
        z_k[idx[done]] = z_t[done]
    return z_k, torch.tensor(times, device=z.device)[k]


@torch.no_grad()
def generator_samples(generator, z: torch.Tensor, labels: torch.Tensor, steps: int):
    """The distribution the fake score must learn: the k-th step's x prediction under backward simulation, no
    gradient, and the step t_k (B,) that made each. For K = 1 these are G(z); for K > 1 a mix of all K steps'
    outputs. DisBack records its degradation path on the same samples."""
    z_k, t_k = backward_simulation(generator, z, labels, steps)
    return generator(z_k, t_k, labels), t_k


class StepAware:
    """The fake score of a K-step generator, told which step t_k made each sample: mu_fake(x_t, t, c | t_k),
    through the extra embedding guided distillation uses for w (zero at first: the teacher's output). Without
    it, the fake score learns the mix of all K steps' outputs, distribution matching pulls only that mix to
    the data, and the steps can drift apart as long as they average out (fmnist16: the first step too dark,
    the last too bright; docs/results.md, "DMD2's 4-step generator"). With it, each step's samples are
    compared with the data on their own. DMD2 does not do this (its fake score has no step input)."""

    def __init__(self, fake_score, t_k: torch.Tensor):
        self.fake_score, self.t_k = fake_score, t_k

    def __call__(self, z_t, t, labels):
        return self.fake_score(z_t, t, labels, w=self.t_k)

    def predict_v(self, z_t, t, labels, w=None):
        return self.fake_score.predict_v(z_t, t, labels, self.t_k)


def knows_step(config: DMDConfig) -> bool:
    """Whether the fake score is told the generator's step (K > 1, `fake_knows_step`, one of our networks)."""
    return config.fake_knows_step and not is_pretrained(config)  # False for K = 1 (DMDConfig.check)


def at_step(fake_score, t_k: torch.Tensor, config: DMDConfig):
    """The fake score as the losses call it: told the step t_k (B,) when `knows_step`, else itself."""
    return StepAware(fake_score, t_k) if knows_step(config) else fake_score


# ==== The regression set: (z, labels, y) with y the teacher's deterministic sample from z =============================


def sample_labels(n: int, config: DMDConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Class labels uniform over the classes, each replaced by the null label w.p. dmd_label_dropout."""
    labels = torch.randint(config.num_classes, (n,), generator=generator)
    drop = torch.rand(n, generator=generator) < config.dmd_label_dropout
    return torch.where(drop, torch.full_like(labels, config.num_classes), labels)


# What makes the regression pairs (besides the teacher's weights).
REGRESSION_KEYS = ("reg_pairs", "reg_steps", "real_guidance", "dmd_label_dropout", "num_classes", "seed")


def regression_pairs(teacher, config: DMDConfig, device) -> dict:
    """{z, labels, y}: y_ref = the real score's `reg_steps`-step DDIM from z_ref, in fp32. Made once with a
    progress bar and cached (`cache_dir`: beside the run's own teacher), keyed on its weights and on
    REGRESSION_KEYS."""

    def make():
        g = torch.Generator().manual_seed(config.seed + 777)
        n, batch = config.reg_pairs, 1024 if config.net == "mlp" else image_batch(device)
        shape = sample_shape(config)
        z, labels, ys = torch.randn(n, *shape, generator=g), sample_labels(n, config, g), []
        for i in progress(range(0, n, batch), f"regression set ({config.reg_steps}-step teacher DDIM)"):
            with no_grad_fp32():  # targets in fp32
                ys.append(ddim_sample(real_score_of(teacher, config), z[i:i + batch].to(device), config.reg_steps,
                                      labels[i:i + batch].to(device)).cpu())
        return {"z": z, "labels": labels, "y": torch.cat(ys)}

    name = (f"regression_{config.reg_pairs}x{config.reg_steps}_null{config.dmd_label_dropout:g}"
            f"_w{config.real_guidance:g}.pt")
    key = {"teacher": teacher.fingerprint, **{k: config[k] for k in REGRESSION_KEYS}}
    return cached(cache_dir(config) / name, key, make, "regression set")


def real_score_of(teacher, config: DMDConfig):
    """mu_real: the teacher, guided with weight w when `real_guidance` > 0."""
    w = config.real_guidance
    return guided(teacher, w, teacher.null_label) if w > 0 else teacher


# ==== Training ========================================================================================================


def adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.999))


def noise_and_labels(config: DMDConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of generator inputs: z ~ N(0, I) and labels (null w.p. dmd_label_dropout); under torchrun,
    this process's share of the batch (plumbing/distributed.py)."""
    n, shape = per_process(config.dmd_batch_size), sample_shape(config)
    return torch.randn(n, *shape, device=device), sample_labels(n, config).to(device)


def fake_score_update(fake_score, opt, generator, z, labels, config: DMDConfig, gan: GAN | None = None) -> dict:
    """One step of the fake score on the generator's current samples (Alg. 1's loss), plus, with DMD2's GAN,
    its classifier's loss on real and generated images (dmd2.py)."""
    x, t_k = generator_samples(generator, z, labels, config.steps)  # backward simulation, no gradient
    w = t_k if knows_step(config) else None  # the step that made each sample, if the fake score is told it
    with autocast(config, z.device):
        losses = {"loss_fake": fake_score_loss(at_step(fake_score, t_k, config), x, labels)}
        if gan is not None:
            losses["loss_cls"] = gan.classifier_loss(x, labels, w)
        loss = losses["loss_fake"] + config.cls_gan_weight * losses.get("loss_cls", 0.0)
    optimizer_step(opt, loss, gan.critic if gan is not None else fake_score, config.grad_clip)
    return losses


def generator_update(generator, opt, real_score, fake_score, z, labels, pairs: dict | None, config: DMDConfig,
                     lpips=None, gan: GAN | None = None) -> dict:
    """One generator step on dm_weight * loss_DM + reg_weight * loss_reg + gen_gan_weight * loss_G_GAN, at the
    k-th of its K steps."""
    z_k, t_k = backward_simulation(generator, z, labels, config.steps)  # the first k steps without gradient
    w = t_k if knows_step(config) else None
    with autocast(config, z.device):
        x = generator(z_k, t_k, labels)  # the k-th step, trained
        losses = ({"loss_dm": dmd_generator_loss(x, real_score, at_step(fake_score, t_k, config), labels)}
                  if config.dm_weight > 0 else {})
        if gan is not None:  # DMD2: the classifier, frozen, judges the generator's samples (dmd2.py)
            losses["loss_gan"] = gan.generator_loss(x, labels, w)
        if pairs is not None:  # G(z_ref) at the top time against the teacher's sample y_ref from z_ref
            idx = torch.randint(len(pairs["y"]), (len(z),))
            z_ref, c_ref, y_ref = (pairs[key][idx].to(z.device) for key in ("z", "labels", "y"))
            x_ref = generator(z_ref, torch.ones(len(z), device=z.device), c_ref)
            losses["loss_reg"] = regression_loss(x_ref, y_ref, config.reg_loss, lpips)
        loss = (config.dm_weight * losses.get("loss_dm", 0.0) + config.reg_weight * losses.get("loss_reg", 0.0)
                + config.gen_gan_weight * losses.get("loss_gan", 0.0))
    losses["grad_norm"] = optimizer_step(opt, loss, generator, config.grad_clip)
    return losses


# What a resumed run must share with its checkpoint: every DMD field but RESUMABLE's, the seed and the clip.
RUN_KEYS = (*DMDConfig.run_keys(TeacherConfig), "grad_clip")


@dataclass
class Variant:
    """What a variant of DMD changes in its loop, in one place: DisBack (disback.py), whose real score
    walks back along a recorded path. `Variant()` is DMD itself."""

    out: Path | None = None                  # the run folder (DMD: dmd_dir(config))
    real_score: Callable | None = None       # real_score(i) -> mu_real for generator update i (DMD: the teacher)
    fake_start: dict | None = None           # the fake score's first weights (DMD: the teacher's)
    run_keys: tuple = RUN_KEYS               # what a resumed checkpoint must share (DisBack adds its path's)


def train_dmd(config: DMDConfig, resume: bool = False, variant: Variant | None = None) -> dict:
    """The loop above; DisBack runs it with its `variant` (disback.py)."""
    variant, device = variant or Variant(), pick_device(config.device)
    out = variant.out or dmd_dir(config)
    check_start(out, (out / "checkpoint.pt").exists(), resume, "--tag")  # like the rest, before any teacher work
    if resume and not Path(config.teacher).exists():  # a teacher to be trained: is it the one the run was made from?
        check_teacher_path(load_checkpoint(out / "checkpoint.pt", "DMD checkpoint")["config"].get("teacher"), config,
                           out / "checkpoint.pt")
    check_null_label(config)
    if config.steps > 1 and config.fake_knows_step and not knows_step(config):
        print("note: a diffusers teacher's network has no input for the generator's step, so its fake score learns "
              "the mix of the steps' samples, as DMD2's does (--fake-knows-step is for this project's networks)")
    hold(out)  # the run folder is this run's alone
    lpips = load_lpips(config, device) if config.reg_weight > 0 and config.reg_loss == "lpips" else None
    teacher = load_teacher(config, device)  # frozen, eval mode, no grads; trained first if missing
    mu_real = real_score_of(teacher, config)
    real_score = variant.real_score or (lambda step: mu_real)  # DMD: the teacher at every update
    pairs = regression_pairs(teacher, config, device) if config.reg_weight > 0 else None

    seed_everything(config.seed)
    generator, fake_score = trainable_copy(teacher), trainable_copy(teacher)  # both start as the teacher
    if variant.fake_start is not None:
        fake_score.load_state_dict(variant.fake_start)
    gan = GAN(fake_score, config, device) if uses_gan(config) else None  # DMD2's classifier and real data
    if knows_step(config):
        fake_score.net.enable_w_embedding()  # the step's embedding (StepAware), zero at first
    gen_opt, fake_opt = adamw(generator, config.gen_lr), adamw(gan.critic if gan else fake_score, config.fake_lr)
    ema = EMA(generator, config.gen_ema) if config.gen_ema > 0 else None
    nets = {"generator": generator, "fake_score": fake_score, "gen_opt": gen_opt, "fake_opt": fake_opt}
    if gan is not None:
        nets.update(gan_head=gan.head, real_data=gan.data)
    loop = Loop(out / "checkpoint.pt", config, "dmd", config.dmd_iterations,
                {**nets, **({"ema": ema} if ema is not None else {})}, f"DMD {config.steps}-step",
                keys=variant.run_keys, resume=resume, checkpoint_at_end=True, kind="dmd")
    if loop.resumed:
        check_same_teacher(loop.saved.get("teacher"), teacher, "DMD checkpoint", loop.path)
    loop.more["teacher"] = teacher.fingerprint
    sampler = ema.model if ema is not None else generator  # what is evaluated
    monitor = DMDMonitor(config, out, sampler, device, loop.extra.setdefault("history", []), generate,
                         lambda n, g: sample_labels(n, config, g))
    if not loop.resumed:
        with loop.off_the_clock():
            monitor(0)

    for step in loop:
        if config.lr_decay:
            for opt, lr in ((gen_opt, config.gen_lr), (fake_opt, config.fake_lr)):
                opt.param_groups[0]["lr"] = lr * (1.0 - step / config.dmd_iterations)
        for _ in range(config.fake_updates):  # the fake score tracks the generator (TTUR)
            z, labels = noise_and_labels(config, device)
            fake_losses = fake_score_update(fake_score, fake_opt, generator, z, labels, config, gan)
        z, labels = noise_and_labels(config, device)
        losses = generator_update(generator, gen_opt, real_score(step), fake_score, z, labels, pairs, config, lpips,
                                  gan)
        if ema is not None:
            ema.update(generator)
        loop.log(**losses, **fake_losses)
        if loop.due(config.eval_every):
            with loop.off_the_clock():
                last = torch.full((1,), generator_times(config.steps)[-1], device=device)  # the sample's step
                loop.write(monitor(step + 1, generator, real_score(step), at_step(fake_score, last, config)))
    loop.log_writer.plot(out / "loss.png", f"DMD {config.steps}-step: losses")
    return monitor.report(loop, teacher)


# ==== Checks and the command line =====================================================================================


def check_config(config: DMDConfig) -> None:
    """One-line errors for values that make no sense (called when a config is made)."""
    require(config.steps >= 1, f"--steps must be at least 1 (1 = one-step generator), got {config.steps}")
    require(config.recipe in RECIPES, f"unknown --recipe {config.recipe!r}; choose one of {', '.join(RECIPES)}")
    require(config.reg_loss in REG_LOSSES,
            f"unknown --reg-loss {config.reg_loss!r}; choose one of {', '.join(REG_LOSSES)}")
    require(config.fake_updates >= 1, f"--fake-updates must be at least 1, got {config.fake_updates}")
    require(config.real_guidance >= 0, f"--real-guidance must be >= 0, got {config.real_guidance}")
    require(config.reg_weight >= 0, f"--reg-weight must be >= 0, got {config.reg_weight}")
    require(config.reg_weight == 0 or min(config.reg_pairs, config.reg_steps) >= 1,
            f"the regression loss needs --reg-pairs and --reg-steps of at least 1 (got {config.reg_pairs} and "
            f"{config.reg_steps}); or pass --reg-weight 0 to train without it")
    require(config.dmd_iterations >= 1 and config.dmd_batch_size >= 1 and config.eval_every >= 1,
            "--dmd-iterations, --dmd-batch-size and --eval-every must be at least 1")
    require(0.0 <= config.dmd_label_dropout <= 1.0,
            f"--dmd-label-dropout must be in [0, 1], got {config.dmd_label_dropout}")
    require(not set(config.tag) & {"/", "\\"} and len(config.tag) <= 64, f"--tag {config.tag[:70]!r} names a run "
            "folder's suffix: use no path separators, and at most 64 characters")
    require(0.0 <= config.gen_ema < 1.0, f"--gen-ema must be in [0, 1), got {config.gen_ema}")
    for name in ("dm_weight", "gen_gan_weight", "cls_gan_weight"):
        require(config[name] >= 0, f"--{name.replace('_', '-')} must be >= 0, got {config[name]}")
    require(config.dm_weight > 0 or uses_gan(config) or config.reg_weight > 0,
            "with --dm-weight 0 the generator needs another loss: --gen-gan-weight or --reg-weight above 0")


def uses_gan(config: DMDConfig) -> bool:
    """DMD2's GAN is on when either of its weights is (both 0: DMD exactly, no classifier, no real data)."""
    return config.gen_gan_weight > 0 or config.cls_gan_weight > 0


def samples_null_label(config: DMDConfig) -> bool:
    """Whether the run asks the teacher for x_hat(z_t, null): labels dropped (--dmd-label-dropout), a guided
    real score (--real-guidance), or toy data, whose evaluation is unconditional."""
    return config.dmd_label_dropout > 0 or config.real_guidance > 0 or config.net == "mlp"


def check_null_label(config: DMDConfig) -> None:
    """A teacher without the null label is refused where the run would sample it (DMD and DisBack); an
    unconditional one (a diffusers teacher) ignores labels, so guiding it would change nothing."""
    require(not (is_pretrained(config) and config.real_guidance > 0),
            f"{config.teacher} is unconditional, so it cannot be guided; pass --real-guidance 0")
    if samples_null_label(config):
        require_null_label(config, "DMD cannot sample the null label from it (--dmd-label-dropout, "
                                   "--real-guidance or toy data's unconditional evaluation ask for it)")


def main(argv=None) -> None:
    config, flags = parse_config(DMDConfig, __doc__.split("\n\n")[0], argv,
                                 {"resume": "continue the run from its checkpoint"})
    resume = flags["resume"]
    gan = f", GAN weights {config.gen_gan_weight:g} / {config.cls_gan_weight:g}" if uses_gan(config) else ""
    print(f"DMD, {config.preset}, recipe {config.recipe}: {config.steps}-step generator, {config.dmd_iterations} "
          f"updates, {config.fake_updates} fake-score updates each, regression weight {config.reg_weight}{gan}")
    print_dmd_summary(config, train_dmd(config, resume=resume), dmd_dir(config))


if __name__ == "__main__":
    run_cli(main)
