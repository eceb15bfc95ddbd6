"""The checker's own closed forms: what the exercises should compute, written independently of them.

Everything here uses only torch and works in float64 where it matters; nothing is imported from the
reference code or from the exercise files. It holds

- the cosine schedule and the exercises that other code calls, by hand (`by_hand_alpha_sigma`,
  `by_hand_ddim_step`, `by_hand_invert_ddim`, `by_hand_cfg`; `BY_HAND` maps their names to them), and
  the forward process `by_hand_diffuse`;
- the expected answers of the other exercises (`two_teacher_steps` for PD's target, `snr`,
  `by_hand_renoise`, `dmd_expected`);
- `Mixture`, a Gaussian mixture with its exact denoiser E[x | z_t, c] (MIX, the data; WIDE, a blurrier
  generator), the perfect teacher and scores the checks need;
- the stand-ins handed to the student's functions, each recording how it was called: `Teacher` (the
  exact denoiser of MIX behind the denoiser protocol), `TinyScore` (a small v-predicting network),
  `LinearScore` and `Generator`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------------
# The schedule, and the exercises that other code calls, by hand (float64)
# ----------------------------------------------------------------------------------------


def schedule(t) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t = cos(pi t / 2) (exactly 0 at t = 1), sigma_t = sin(pi t / 2), in float64."""
    t = torch.as_tensor(t, dtype=torch.float64)
    alpha = torch.where(t >= 1, torch.zeros_like(t), torch.cos(0.5 * math.pi * t))
    return alpha, torch.sin(0.5 * math.pi * t)


def rows(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar, or a per-example (B,) quantity shaped to broadcast against x (B, ...)."""
    v = torch.as_tensor(v, dtype=torch.float64)
    return v if v.dim() == 0 else v.reshape(-1, *([1] * (x.dim() - 1)))


def coefficients(t, x):
    """alpha_t, sigma_t (float64), shaped to broadcast against x."""
    alpha, sigma = schedule(t)
    return rows(alpha, x), rows(sigma, x)


def by_hand_alpha_sigma(t):
    """The schedule as the exercise returns it: two fp32 tensors of t's shape, alpha_1 exactly 0."""
    alpha, sigma = schedule(t)
    return alpha.float(), sigma.float()


def by_hand_ddim_step(x_hat, z_t, t, s):
    """z_s = alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t."""
    (a_t, s_t), (a_s, s_s) = coefficients(t, z_t), coefficients(s, z_t)
    x_hat, z_t = x_hat.double(), z_t.double()
    return (a_s * x_hat + s_s * (z_t - a_t * x_hat) / s_t).float()


def by_hand_invert_ddim(z_t, z_s, t, s):
    """The x whose DDIM step t -> s from z_t lands on z_s (the step solved for x)."""
    (a_t, s_t), (a_s, s_s) = coefficients(t, z_t), coefficients(s, z_t)
    z_t, z_s = z_t.double(), z_s.double()
    return ((z_s - s_s / s_t * z_t) / (a_s - s_s / s_t * a_t)).float()


def by_hand_cfg(x_cond, x_uncond, w):
    """(1 + w) x_cond - w x_uncond, w a float or a (B,) tensor."""
    w = rows(w, x_cond)
    return ((1 + w) * x_cond.double() - w * x_uncond.double()).float()


def by_hand_diffuse(x, t, eps):
    """z_t = alpha_t x + sigma_t eps: the forward process."""
    alpha, sigma = coefficients(t, x)
    return (alpha * x.double() + sigma * eps.double()).float()


# The exercises that other code calls; while another function is graded, these stand in for them.
BY_HAND = {"alpha_sigma": by_hand_alpha_sigma, "ddim_step": by_hand_ddim_step,
           "invert_ddim": by_hand_invert_ddim, "cfg": by_hand_cfg}


# ----------------------------------------------------------------------------------------
# A Gaussian mixture and its exact denoiser: the perfect teacher, the real and the fake score
# ----------------------------------------------------------------------------------------


class Mixture:
    """Equally weighted Gaussians of standard deviation `std` around 8 points on the unit circle, with
    their exact denoiser E[x | z_t, c]; label k is component k, labels >= 8 are unconditional."""

    num_classes = 8

    def __init__(self, std: float):
        angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
        self.means, self.std = torch.stack([torch.cos(angles), torch.sin(angles)], 1), std

    def sample(self, n: int, g: torch.Generator, labels=None):
        labels = torch.randint(8, (n,), generator=g) if labels is None else labels
        return (self.means[labels] + self.std * torch.randn(n, 2, generator=g, dtype=torch.float64)).float(), labels

    def denoiser(self, z_t, t, labels):
        """Given component k, E[x | z_t, k] = m_k + alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2) (z_t - alpha_t m_k);
        unconditionally the posteriors p(k | z_t) weight these means."""
        alpha, sigma = schedule(t)
        alpha, sigma = alpha.expand(z_t.shape[0])[:, None, None], sigma.expand(z_t.shape[0])[:, None, None]
        var = alpha**2 * self.std**2 + sigma**2
        diff = z_t.detach().double()[:, None, :] - alpha * self.means[None]  # (B, K, 2)
        logits = -0.5 * (diff**2).sum(-1, keepdim=True) / var  # (B, K, 1)
        given = labels[:, None, None] == torch.arange(8)[None, :, None]
        known = (labels < 8)[:, None, None]
        logits = torch.where(known & ~given, torch.full_like(logits, -math.inf), logits)
        x_k = self.means[None] + alpha * self.std**2 / var * diff
        return (torch.softmax(logits, 1) * x_k).sum(1).to(z_t.dtype)


MIX, WIDE = Mixture(0.08), Mixture(0.2)  # the data (the real score) and a blurrier generator (the fake score)


# ----------------------------------------------------------------------------------------
# The expected answers of the other exercises
# ----------------------------------------------------------------------------------------


def two_teacher_steps(z_t, t, labels, n: int):
    """x_tilde by hand: two DDIM steps of the exact teacher t -> t - 1/(2N) -> t - 1/N, then the inversion."""
    t1, t2 = t - 0.5 / n, t - 1.0 / n
    z1 = by_hand_ddim_step(MIX.denoiser(z_t, t, labels), z_t, t, t1)
    z2 = by_hand_ddim_step(MIX.denoiser(z1, t1, labels), z1, t1, t2)
    return by_hand_invert_ddim(z_t, z2, t, t2)


def snr(t):
    """SNR = alpha_t^2 / sigma_t^2 (0 at t = 1), in float64."""
    alpha, sigma = schedule(t)
    return (alpha / sigma) ** 2


def by_hand_renoise(z_s, s: float, t: float, eps):
    """A draw from q(z_t | z_s), in float64: (alpha_t / alpha_s) z_s + sigma_t|s eps, with
    sigma_t|s^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2."""
    (a_s, s_s), (a_t, s_t) = schedule(s), schedule(t)
    ratio = a_t / a_s
    return ratio * z_s.double() + (s_t**2 - ratio**2 * s_s**2).clamp(min=0).sqrt() * eps.double()


def dmd_expected(x, t, eps, real, fake, labels):
    """(mu_fake - mu_real) / mean_{all but batch} |x - mu_real| at x_t = alpha_t x + sigma_t eps."""
    x_t = by_hand_diffuse(x.detach(), t, eps)
    mu_real, mu_fake = real(x_t, t, labels).double(), fake(x_t, t, labels).double()
    normaliser = (x.detach().double() - mu_real).abs().flatten(1).mean(1)
    return (mu_fake - mu_real) / rows(normaliser, x)


def by_hand_gan_losses(logits_real, logits_fake):
    """DMD2's non-saturating GAN losses in float64, from D = sigmoid(logit) itself:
    classifier -mean log D(real) - mean log(1 - D(fake)), generator -mean log D(fake)."""
    d_real, d_fake = torch.sigmoid(logits_real.double()), torch.sigmoid(logits_fake.double())
    return -(d_real.log().mean() + (1 - d_fake).log().mean()), -d_fake.log().mean()


# ----------------------------------------------------------------------------------------
# Stand-ins handed to the student's functions; each records how it is called
# ----------------------------------------------------------------------------------------


class WrongCall(Exception):
    """A stand-in was called in a way the exercise rules out; the checker reports it as a failed check."""


class Teacher:
    """The exact denoiser of MIX behind the denoiser protocol, with null label 11 (not 8, not 0: code that
    guesses the null label is caught). It records every call."""

    null_label = 11

    def __init__(self):
        self.calls = []

    def __call__(self, z_t, t, labels, w=None):
        self.calls.append((torch.as_tensor(t).detach().clone(), labels.clone()))
        bad = labels[(labels >= 8) & (labels != self.null_label)]
        if len(bad):
            raise WrongCall(f"the teacher was called with label {bad[0].item()}, neither a class (0-7) nor "
                       f"its null label teacher.null_label = {self.null_label}")
        return MIX.denoiser(z_t, t, labels)


class TinyScore(nn.Module):
    """A small v-predicting network behind the denoiser protocol (`predict_v`, and forward -> x_hat);
    it records what `predict_v` is called with."""

    def __init__(self):
        super().__init__()
        self.null_label = 8
        self.embed = nn.Embedding(9, 8)
        self.body = nn.Sequential(nn.Linear(11, 32), nn.SiLU(), nn.Linear(32, 2))
        self.calls = []

    def predict_v(self, z_t, t, labels, w=None):
        t = torch.as_tensor(t, dtype=torch.float32).expand(z_t.shape[0])
        self.calls.append((z_t.detach().clone(), t.detach().clone(), labels.clone()))
        return self.body(torch.cat([z_t, t[:, None], self.embed(labels)], 1))

    def forward(self, z_t, t, labels, w=None):
        alpha, sigma = coefficients(torch.as_tensor(t).expand(z_t.shape[0]), z_t)
        return (alpha * z_t.double() - sigma * self.predict_v(z_t, t, labels).double()).float()


class LinearScore(nn.Module):
    """mu(z_t, t, c) = a z_t + b: a score for any shape, with parameters (that must get no gradient)."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(a)), nn.Parameter(torch.tensor(b))
        self.calls = []

    def forward(self, z_t, t, labels):
        self.calls.append((z_t.detach().clone(), torch.as_tensor(t).detach().clone(), labels.clone()))
        return self.a * z_t + self.b


class Generator:
    """Records every call (t, z_t, labels) and predicts x = 1 + z_t / 4 (any known function will do)."""

    def __init__(self):
        self.calls, self.outputs = [], []

    def __call__(self, z_t, t, labels):
        self.calls.append((torch.as_tensor(t).detach().clone(), z_t.detach().clone(), labels.clone()))
        self.outputs.append(1.0 + 0.25 * z_t.detach())
        return self.outputs[-1].clone()
