"""What DMD2 adds to DMD: a GAN classifier on the fake score's bottleneck, its two non-saturating
losses, and the recipe that drops the regression loss for a two time-scale update rule.

Paper: Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis"
(arXiv 2405.14867), Sec. 4.2 (TTUR) and Sec. 4.3 (the GAN loss and real data). Formulas:
docs/methods.md 3.3. The loop that uses all of this is dmd.py's `train_dmd`; this file holds
only what DMD2 adds to it.

The GAN (Sec. 4.3): a small classifier D reads the fake score's middle features of an image
diffused to a random time t, F(x, t) = alpha_t x + sigma_t eps. Its noise levels are those of DMD2's
code: a uniform index into EDM's grid of 1000 Karras sigmas (sigma_min 0.002, sigma_max 80, rho 7),
which puts a fifth of the draws below sigma 0.1, where fine detail is still visible (`gan_times`):

    L_GAN = E_{x ~ real, t}[log D(F(x, t))] + E_{z, t}[-log D(F(G(z), t))]

The fake score and D maximise it: the classifier's loss is the non-saturating pair
    loss_cls = softplus(-D(F(x_real, t))) + softplus(D(F(sg(G(z)), t')))      (= -log D, -log(1 - D))
and is added, times `cls_gan_weight` (1e-2), to the fake score's denoising loss, so the fake
score's encoder learns from it too. The generator minimises it, non-saturating:
    loss_G_GAN = softplus(-D(F(G(z), t)))                                       (= -log D)
times `gen_gan_weight` (3e-3), beside distribution matching. D is D(logit) = sigmoid(logit).

The classifier (DMD2's official code, main/edm/: on the bottleneck, 8x8 at ImageNet-64):
Conv 4x4 stride 2, GroupNorm, SiLU, Conv 4x4 stride 4, GroupNorm, SiLU, Conv 1x1 -> one logit.
Here the second convolution's kernel and stride are half the bottleneck's size, so that any
bottleneck ends in one logit (4x4/4 at 8x8, as DMD2's). On toy data the head is an MLP on the fake
MLP's last hidden layer.

The recipes (one switch, `--recipe`):
    dmd   the DMD paper: regression loss, fake_updates per generator update as tuned per preset
    dmd2  DMD2: no regression loss, five fake-score updates per generator update (TTUR), the GAN

Deliberate difference from DMD2's code: the real images' labels are dropped to the null label as
often as the generator's (`dmd_label_dropout`), so that the label cannot tell the classifier which is
which. (Uniform times t ~ U[0, 1] instead of the Karras grid leave the classifier near chance and the
GAN no help on fmnist16: docs/results.md, DMD2 on fmnist16.)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import diffuse, group_norm
from plumbing.config import sample_shape
from plumbing.data import BatchStream
from plumbing.errors import UserError

# DMD2's recipe on top of each preset's DMD values (dmd.DMDConfig.PRESETS): the fields it changes.
DMD2_RECIPE = {
    # DMD2's ImageNet-64 values (main/edm/ of its code): no regression, TTUR 5, GAN weights 3e-3 and 1e-2
    "all": dict(reg_weight=0.0, fake_updates=5, gen_gan_weight=3e-3, cls_gan_weight=1e-2),
}


# EDM's Karras grid of noise levels, whose uniform index DMD2's GAN draws (its code: main/edm/edm_guidance.py)
SIGMA_MIN, SIGMA_MAX, RHO, GRID = 0.002, 80.0, 7.0, 1000


def gan_times(n: int, device) -> torch.Tensor:
    """(n,) times of DMD2's GAN noise: at a uniform index i in 0..999,
        sigma_i = (sigma_min^(1/rho) + i / 999 (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,
    as this schedule's t, where sigma_t / alpha_t = tan(pi t / 2) is EDM's sigma."""
    i = torch.randint(GRID, (n,), device=device)
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    sigma = (lo + i / (GRID - 1) * (hi - lo)) ** RHO
    return 2 / math.pi * torch.atan(sigma)


# ==== The classifier on the fake score's bottleneck ===================================================================


class ImageHead(nn.Module):
    """(B, C, r, r) bottleneck features -> (B,) logits: Conv 4x4/2, GN, SiLU, Conv (r/2)x(r/2)/(r/2), GN, SiLU,
    Conv 1x1 (DMD2's, sized to any bottleneck: at its 8x8 one the second convolution is 4x4/4, down to 1x1)."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        k = max(size // 2, 1)  # after the first convolution the map is size / 2; this brings it to 1x1
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 4, stride=2, padding=1), group_norm(channels), nn.SiLU(),
            nn.Conv2d(channels, channels, k, stride=k), group_norm(channels), nn.SiLU(),
            nn.Conv2d(channels, 1, 1))

    def forward(self, h):
        return self.body(h).mean(dim=(1, 2, 3))  # (B,): one logit (a mean only where an odd size leaves more)


class PointHead(nn.Module):
    """(B, hidden) features of the toy MLP -> (B,) logits."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, h):
        return self.body(h).squeeze(1)  # (B,)


def gan_head(fake_score, config, device) -> nn.Module:
    """The classifier that fits the fake score's bottleneck, found by one call on zeros (no randomness)."""
    with torch.no_grad():
        z = torch.zeros(2, *sample_shape(config), device=device)
        h = fake_score.bottleneck(z, torch.full((2,), 0.5, device=device), torch.zeros(2, dtype=torch.long,
                                                                                         device=device))
    head = ImageHead(h.shape[1], h.shape[-1]) if h.dim() == 4 else PointHead(h.shape[1])
    return head.to(device)


def gan_logits(fake_score, head, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor | None = None,
               eps: torch.Tensor | None = None, w: torch.Tensor | None = None) -> torch.Tensor:
    """D's logits (B,) for images (or points) x: x diffused to t (DMD2's `gan_times`), F(x, t) = alpha_t x +
    sigma_t eps, then the fake score's bottleneck, then the head. Gradients flow to whatever requires them.
    `w`: the generator step t_k of each sample, for a fake score that is told it (dmd.py, `fake_knows_step`)."""
    if t is None:
        t = gan_times(x.shape[0], x.device)
    if eps is None:
        eps = torch.randn_like(x)
    return head(fake_score.bottleneck(diffuse(x, t, eps), t, labels, w))


# ==== The two losses (pure functions of the logits) ===================================================================


def gan_classifier_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The classifier's side of L_GAN, non-saturating: -log D(real) - log(1 - D(fake)), D = sigmoid(logit)."""
    ### BEGIN SOLUTION
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
    ### END SOLUTION


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of L_GAN, non-saturating: -log D(F(G(z), t)) = softplus(-logit)."""
    ### BEGIN SOLUTION
    return F.softplus(-logits_fake).mean()
    ### END SOLUTION


# ==== What the loop holds when the GAN is on ==========================================================================


class GAN:
    """The classifier head, the stream of real training data, and the module the fake score's optimiser
    steps (`critic`: the fake score and the head together, clipped as one, as DMD2 clips its fake network)."""

    def __init__(self, fake_score, config, device):
        self.config, self.fake_score = config, fake_score
        self.head = gan_head(fake_score, config, device)
        self.critic = nn.ModuleList([fake_score, self.head])
        # real images from the teacher's training data (--data-dir for a diffusers teacher), a global batch
        # of dmd_batch_size; resumable with the run
        try:
            self.data = BatchStream(config.replace(batch_size=config.dmd_batch_size), device, seed=config.seed + 4099)
        except UserError as e:
            raise UserError(f"DMD2's GAN needs real images from the teacher's training data (--data-dir): {e}; "
                            "or pass --recipe dmd, which needs none") from None

    def real_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Real x and labels, each label dropped to the null label as often as the generator's are."""
        x, labels = self.data.next()
        drop = torch.rand(labels.shape[0], device=labels.device) < self.config.dmd_label_dropout
        return x, torch.where(drop, torch.full_like(labels, self.config.num_classes), labels)

    def classifier_loss(self, x_fake: torch.Tensor, labels: torch.Tensor, w: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """loss_cls on a real batch and the generator's samples x_fake (detached here: only D learns). With the
        samples' steps `w` (a fake score told them), each real image gets the step of a random sample, so that
        the step says nothing about which is which and D judges each step's samples against the data."""
        x_real, c_real = self.real_batch()
        w_real = None if w is None else w[torch.randint(len(w), (len(x_real),), device=w.device)]
        return gan_classifier_loss(gan_logits(self.fake_score, self.head, x_real, c_real, w=w_real),
                                   gan_logits(self.fake_score, self.head, x_fake.detach(), labels, w=w))

    def generator_loss(self, x: torch.Tensor, labels: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """loss_G_GAN on the generator's samples x; the fake score and head are frozen for it, so the gradient
        reaches the generator only."""
        self.critic.requires_grad_(False)
        try:
            return gan_generator_loss(gan_logits(self.fake_score, self.head, x, labels, w=w))
        finally:
            self.critic.requires_grad_(True)
