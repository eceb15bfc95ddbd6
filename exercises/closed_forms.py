"""The checker's own closed forms: what the exercises should compute, written independently of them.

Everything here uses only torch and works in float64 where it matters; nothing is imported from the
reference code or from the exercise files. It holds

- the cosine schedule and the exercises that other code calls, by hand (`by_hand_alpha_sigma`,
  `by_hand_ddim_step`, `by_hand_invert_ddim`, `by_hand_cfg`; `BY_HAND` maps their names to them), and
  the forward process `by_hand_diffuse`;
- the expected answers of the other exercises (`two_teacher_steps` for PD's target, `snr`,
  `by_hand_renoise`, `dmd_expected`);
- `Mixture`, a Gaussian mixture with its exact denoiser E[x | z_t, c] (MIX, the 2-D data; WIDE, a blurrier
  generator; IMAGES, a mixture of (3, 4, 4) "images"), the perfect teacher and scores the checks need;
- the stand-ins handed to the student's functions, each recording how it was called: `Teacher` (the
  exact denoiser of a mixture behind the denoiser protocol), `TinyScore` (a small v-predicting network),
  `PixelScore` (one for any shape), `LinearScore` and `Generator`;
- the algorithms each exercise is part of, written out with that exercise as a parameter (`ddim_sampler`,
  `pd_loss`, `stage_one_loss`, `stochastic_sampler`, `dmd_update`, `disback_path`): a check runs one with the
  student's function and with the closed form, and compares what comes out.
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
    dtype, x_hat, z_t = z_t.dtype, x_hat.double(), z_t.double()
    return (a_s * x_hat + s_s * (z_t - a_t * x_hat) / s_t).to(dtype)


def by_hand_invert_ddim(z_t, z_s, t, s):
    """The x whose DDIM step t -> s from z_t lands on z_s (the step solved for x)."""
    (a_t, s_t), (a_s, s_s) = coefficients(t, z_t), coefficients(s, z_t)
    dtype, z_t, z_s = z_t.dtype, z_t.double(), z_s.double()
    return ((z_s - s_s / s_t * z_t) / (a_s - s_s / s_t * a_t)).to(dtype)


def by_hand_cfg(x_cond, x_uncond, w):
    """(1 + w) x_cond - w x_uncond, w a float or a (B,) tensor."""
    w = rows(w, x_cond)
    return ((1 + w) * x_cond.double() - w * x_uncond.double()).to(x_cond.dtype)


def by_hand_diffuse(x, t, eps):
    """z_t = alpha_t x + sigma_t eps: the forward process."""
    alpha, sigma = coefficients(t, x)
    return (alpha * x.double() + sigma * eps.double()).to(x.dtype)


# The exercises that other code calls; while another function is graded, these stand in for them.
BY_HAND = {"alpha_sigma": by_hand_alpha_sigma, "ddim_step": by_hand_ddim_step,
           "invert_ddim": by_hand_invert_ddim, "cfg": by_hand_cfg}


# ----------------------------------------------------------------------------------------
# A Gaussian mixture and its exact denoiser: the perfect teacher, the real and the fake score
# ----------------------------------------------------------------------------------------


class Mixture:
    """Equally weighted Gaussians of standard deviation `std` around 8 means (the points of the unit circle, or
    8 fixed images), with their exact denoiser E[x | z_t, c]; label k is component k, labels >= 8 are
    unconditional."""

    num_classes = 8

    def __init__(self, std: float, means: torch.Tensor | None = None):
        if means is None:
            angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
            means = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
        self.means, self.std = means.double(), std

    def sample(self, n: int, g: torch.Generator, labels=None):
        labels = torch.randint(8, (n,), generator=g) if labels is None else labels
        noise = torch.randn(n, *self.means.shape[1:], generator=g, dtype=torch.float64)
        return (self.means[labels] + self.std * noise).float(), labels

    def denoiser(self, z_t, t, labels):
        """Given component k, E[x | z_t, k] = m_k + alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2) (z_t - alpha_t m_k);
        unconditionally the posteriors p(k | z_t) weight these means."""
        plain(z_t, t, labels)
        alpha, sigma = schedule(t)
        alpha, sigma = alpha.expand(z_t.shape[0])[:, None, None], sigma.expand(z_t.shape[0])[:, None, None]
        var = alpha**2 * self.std**2 + sigma**2
        means = self.means.flatten(1)  # (K, D)
        diff = z_t.detach().double().flatten(1)[:, None, :] - alpha * means[None]  # (B, K, D)
        logits = -0.5 * (diff**2).sum(-1, keepdim=True) / var  # (B, K, 1)
        given = labels[:, None, None] == torch.arange(8)[None, :, None]
        known = (labels < 8)[:, None, None]
        logits = torch.where(known & ~given, torch.full_like(logits, -math.inf), logits)
        x_k = means[None] + alpha * self.std**2 / var * diff
        return (torch.softmax(logits, 1) * x_k).sum(1).reshape(z_t.shape).to(z_t.dtype)


MIX, WIDE = Mixture(0.08), Mixture(0.2)  # the data (the real score) and a blurrier generator (the fake score)
IMAGES = Mixture(0.3, 0.7 * torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))


# ----------------------------------------------------------------------------------------
# The expected answers of the other exercises
# ----------------------------------------------------------------------------------------


def two_teacher_steps(z_t, t, labels, n: int, teacher=MIX.denoiser, step=by_hand_ddim_step,
                      invert=by_hand_invert_ddim):
    """x_tilde by hand: two DDIM steps of the exact teacher t -> t - 1/(2N) -> t - 1/N, then the inversion
    (`step` and `invert` the DDIM step and its inversion to use)."""
    t1, t2 = t - 0.5 / n, t - 1.0 / n
    z1 = step(teacher(z_t, t, labels), z_t, t, t1)
    z2 = step(teacher(z1, t1, labels), z1, t1, t2)
    return invert(z_t, z2, t, t2)


def snr(t):
    """SNR = alpha_t^2 / sigma_t^2 (0 at t = 1), in float64."""
    alpha, sigma = schedule(t)
    return (alpha / sigma) ** 2


def by_hand_renoise(z_s, s: float, t: float, eps):
    """A draw from q(z_t | z_s), in float64: (alpha_t / alpha_s) z_s + sigma_t|s eps, with
    sigma_t|s^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2."""
    (a_s, s_s), (a_t, s_t) = schedule(s), schedule(t)
    ratio = a_t / a_s
    return (ratio * z_s.double() + (s_t**2 - ratio**2 * s_s**2).clamp(min=0).sqrt() * eps.double()).to(z_s.dtype)


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


def plain(*values) -> None:
    """A WrongCall if a tensor handed to a stand-in is a subclass of torch.Tensor (whose operators are its own)."""
    for value in values:
        if isinstance(value, torch.Tensor) and type(value) is not torch.Tensor:
            raise WrongCall(f"a stand-in was called with a {type(value).__name__}, a subclass of torch.Tensor: pass "
                            "plain tensors")


class Teacher:
    """The exact denoiser of a mixture (MIX, or IMAGES) behind the denoiser protocol, with null label 11 (not 8,
    not 0: code that guesses the null label is caught). It records every call."""

    null_label = 11

    def __init__(self, mixture: Mixture = MIX):
        self.calls, self.mixture = [], mixture

    def __call__(self, z_t, t, labels, w=None):
        plain(z_t, t, labels)
        self.calls.append((torch.as_tensor(t).detach().clone(), labels.clone()))
        bad = labels[(labels >= 8) & (labels != self.null_label)]
        if len(bad):
            raise WrongCall(f"the teacher was called with label {bad[0].item()}, neither a class (0-7) nor "
                       f"its null label teacher.null_label = {self.null_label}")
        return self.mixture.denoiser(z_t, t, torch.where(labels == self.null_label, 8, labels))


class NetTeacher(nn.Module):
    """The exact teacher behind a trainable layer (the identity, as a network's last layer): it has parameters
    that would get a gradient through a target made with gradient on."""

    null_label = Teacher.null_label

    def __init__(self, mixture: Mixture = MIX):
        super().__init__()
        self.exact, dim = Teacher(mixture), mixture.means[0].numel()
        self.layer = nn.Linear(dim, dim)
        with torch.no_grad():
            self.layer.weight.copy_(torch.eye(dim))
            self.layer.bias.zero_()

    @property
    def calls(self):
        return self.exact.calls

    def forward(self, z_t, t, labels, w=None):
        x = self.exact(z_t, t, labels)
        return self.layer(x.flatten(1)).reshape(x.shape)


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
        plain(z_t, t, labels)
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
        plain(z_t, t, labels)
        self.calls.append((z_t.detach().clone(), torch.as_tensor(t).detach().clone(), labels.clone()))
        return self.a * z_t + self.b


class PixelScore(nn.Module):
    """A v-predicting score for samples of any shape, entry by entry v_hat = a z_t + b t + c[label], behind the
    denoiser protocol; it records what `predict_v` is called with."""

    def __init__(self):
        super().__init__()
        self.null_label = 8
        self.a, self.b, self.c = nn.Parameter(torch.tensor(0.7)), nn.Parameter(torch.tensor(-0.3)), \
            nn.Parameter(torch.linspace(-0.4, 0.4, 9))
        self.calls = []

    def predict_v(self, z_t, t, labels, w=None):
        plain(z_t, t, labels)
        t = torch.as_tensor(t, dtype=torch.float32).expand(z_t.shape[0])
        self.calls.append((z_t.detach().clone(), t.detach().clone(), labels.clone()))
        return self.a * z_t + rows(t, z_t).float() * self.b + rows(self.c[labels], z_t).float()

    def forward(self, z_t, t, labels, w=None):
        alpha, sigma = coefficients(torch.as_tensor(t).expand(z_t.shape[0]), z_t)
        return (alpha * z_t.double() - sigma * self.predict_v(z_t, t, labels).double()).float()


class Generator(nn.Module):
    """Records every call (t, z_t, labels) and predicts x = 1 + scale z_t, scale = 0.25 a trainable parameter (a
    gradient that reaches it through an earlier step of backward simulation shows)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.25))
        self.calls, self.outputs = [], []

    def forward(self, z_t, t, labels):
        plain(z_t, t, labels)
        self.calls.append((torch.as_tensor(t).detach().clone(), z_t.detach().clone(), labels.clone()))
        x = 1.0 + self.scale * z_t
        self.outputs.append(x.detach().clone())
        return x


# ----------------------------------------------------------------------------------------
# The algorithms each exercise is part of, with that exercise as a parameter
# ----------------------------------------------------------------------------------------


def ddim_sampler(denoiser, z, steps: int, labels, step=by_hand_ddim_step):
    """N-step deterministic DDIM from z_1 (common.ddim_sample): x_hat at t = i/N as a (B,) tensor, then
    `step(x_hat, z, t, s)` with float times."""
    for i in range(steps, 0, -1):
        t, s = i / steps, (i - 1) / steps
        z = step(denoiser(z, torch.full((z.shape[0],), t), labels), z, t, s)
    return z


def ddim_step_on(alpha_sigma):
    """The DDIM step on the schedule `alpha_sigma` (a function of a float or a (B,) tensor of times)."""

    def step(x_hat, z_t, t, s):
        (a_t, s_t), (a_s, s_s) = alpha_sigma(t), alpha_sigma(s)
        a_t, s_t, a_s, s_s = (rows(v, z_t) for v in (a_t, s_t, a_s, s_s))
        return (a_s * x_hat.double() + s_s * (z_t.double() - a_t * x_hat.double()) / s_t).to(z_t.dtype)

    return step


def guided_by(cfg, teacher, w, null_label: int):
    """A guided denoiser (common.guided) whose combination is `cfg(x_cond, x_uncond, w)`."""
    return lambda z_t, t, labels: cfg(teacher(z_t, t, labels), teacher(z_t, t, torch.full_like(labels, null_label)),
                                      w)


def pd_loss(student, teacher, x, labels, n: int, i, eps, target=two_teacher_steps,
            weight=lambda t: snr(t).clamp(min=1)):
    """PD's loss (progressive_distill.pd_loss) with given i and eps: t = i / N, z_t = alpha_t x + sigma_t eps,
    x_tilde = target(teacher, z_t, t, labels, N), then mean_b w(t_b) mean ||student(z_t, t) - x_tilde||^2. t and z_t
    are read after the target is made, as the repository does."""
    t = i.float() / n
    z_t = by_hand_diffuse(x, t, eps)
    x_tilde = target(teacher, z_t, t, labels, n)
    x_hat = student(z_t, t, labels)
    per_example = (x_hat.double() - x_tilde.double()).pow(2).flatten(1).mean(1)
    return (weight(t).double() * per_example).mean()


def stage_one_loss(student, teacher, x, labels, w, t, eps, target):
    """Guided distillation's stage one (guided_distill.guided_loss) with given t and eps: the truncated-SNR
    weighted ||student(z_t, t, w) - target(teacher, z_t, t, labels, w)||^2."""
    z_t = by_hand_diffuse(x, t, eps)
    x_target = target(teacher, z_t, t, labels, w)
    per_example = (student(z_t, t, labels).double() - x_target.double()).pow(2).flatten(1).mean(1)
    return (snr(t).clamp(min=1) * per_example).mean()


def stochastic_sampler(denoiser, z, steps: int, labels, noise: list, renoise=by_hand_renoise):
    """Meng et al.'s N-step stochastic sampler (guided_distill.stochastic_sample) with its noise given: a DDIM
    step of twice the length t -> t - 2/N, then `renoise` forward to t - 1/N; the last step is plain DDIM."""
    for i in range(steps, 0, -1):
        t = i / steps
        x_hat = denoiser(z, torch.full((z.shape[0],), t), labels)
        if i == 1:
            z = by_hand_ddim_step(x_hat, z, t, 0.0)
        else:
            s2, s = (i - 2) / steps, (i - 1) / steps
            z = renoise(by_hand_ddim_step(x_hat, z, t, s2), s2, s, noise[i])
    return z


def dmd_update(loss_fn, z, real, fake, labels, t, eps):
    """One DMD generator update's gradient: x = G(z) = a z + b with parameters a, b; loss_fn(x, real, fake, labels,
    t, eps) backpropagated. Returns the loss and the gradients (d/da, d/db)."""
    a, b = torch.tensor(0.9, requires_grad=True), torch.tensor(0.1, requires_grad=True)
    loss = loss_fn(a * z + b, real, fake, labels, t, eps)
    return loss, a, b


def dmd_update_expected(z, real, fake, labels, t, eps):
    """What `dmd_update` gives for the right loss: d/da = sum(g z), d/db = sum(g), g = dmd_expected / x.numel()."""
    x = 0.9 * z + 0.1
    g = dmd_expected(x, t, eps, real, fake, labels) / x.numel()
    return (g * z.double()).sum(), g.sum()


def disback_path(snapshot_index, n: int, interval: int, updates: int) -> tuple[list, int | None]:
    """DisBack's stage two (disback.BacktrackingPath): the snapshot each generator update uses, and the first
    update that uses the teacher s'_0 (disback.py records max(N - 1, 0) * interval)."""
    used = [snapshot_index(step, n, interval) for step in range(updates)]
    return used, next((step for step, j in enumerate(used) if j == 0), None)
