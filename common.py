"""The shared core of the four distillation scripts: the cosine schedule, DDIM, target inversion,
guidance, the denoiser protocol, Alg. 1's loss, and the two networks every method copies (a
DDPM-style UNet for images and a small MLP for 2-D toy data). It imports nothing of the project:
the plumbing (plumbing/) stands on it, not the other way round.

Formulas: docs/methods.md section 0 (variance-preserving, continuous time t in [0, 1]).

Notation (names in the code follow the papers' symbols):

| code            | math                            | meaning                                            |
|-----------------|---------------------------------|----------------------------------------------------|
| `x`             | x                               | clean data (images in [-1, 1], toy points in R^2)  |
| `t`, `s`        | t, s                            | times in [0, 1], s < t; t = 1 is pure noise        |
| `alpha_t`       | alpha_t = cos(pi t / 2)         | signal scale; exactly 0 at t = 1                   |
| `sigma_t`       | sigma_t = sin(pi t / 2)         | noise scale; exactly 0 at t = 0                    |
| `logsnr(t)`     | lambda_t = log(alpha^2/sigma^2) | log signal-to-noise ratio (clipped to [-20, 20])   |
| `eps`           | eps ~ N(0, I)                   | Gaussian noise                                     |
| `z_t`           | z_t = alpha_t x + sigma_t eps   | noisy latent                                       |
| `v`             | v = alpha_t eps - sigma_t x     | what the networks predict                          |
| `x_hat`         | x_hat(z_t)                      | a denoiser's estimate of x (every method's currency)|
| `x_tilde`       | x_tilde                         | the inverted target of progressive distillation    |
| `w`             | w                               | guidance weight, (1 + w) cond - w uncond           |
| `labels`        | c                               | class labels; `null label` = num_classes           |

The denoiser protocol: anything called as `denoiser(z_t, t, labels) -> x_hat`, with `t` a
tensor of shape (B,) and `labels` (B,) ints, is a denoiser. Networks predict v;
`Denoiser` wraps a network and turns v_hat into x_hat. The closed-form Gaussian-mixture
denoiser in `plumbing/data.py` follows the same protocol, so tests can use it as a perfect teacher.
The networks are called as `net(z_t, t, labels, w=None) -> v_hat`, with w an optional guidance
weight (B,) read only once `enable_w_embedding()` has been called.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

LOGSNR_CLIP = 20.0


# ==== Schedule and parameterisations (docs/methods.md section 0). Schedule math stays in fp32. ========================


def _as_time(t, like: torch.Tensor | None = None) -> torch.Tensor:
    """A float or tensor time -> fp32 tensor (on `like`'s device when given)."""
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=torch.float32, device=device)


def alpha_sigma(t) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine schedule: alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2).

    alpha is clamped at 0 so that alpha_1 is exactly 0 (fp32 cos(pi/2) is -4e-8).
    """
    ### BEGIN SOLUTION
    t = _as_time(t)
    alpha_t = torch.cos(0.5 * math.pi * t).clamp(min=0.0)
    sigma_t = torch.sin(0.5 * math.pi * t)
    return alpha_t, sigma_t
    ### END SOLUTION


def logsnr(t, clip: float = LOGSNR_CLIP) -> torch.Tensor:
    """lambda_t = log(alpha_t^2 / sigma_t^2), clipped to [-clip, clip] like the official code."""
    alpha_t, sigma_t = alpha_sigma(t)
    lam = 2.0 * (torch.log(alpha_t) - torch.log(sigma_t))
    return lam.clamp(-clip, clip)


def bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-example quantity (B,) or a scalar to broadcast against x (B, ...)."""
    t = t.to(device=x.device, dtype=torch.float32)
    if t.dim() == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def _coeffs(t, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha_t, sigma_t = alpha_sigma(_as_time(t, x))
    return bcast(alpha_t, x), bcast(sigma_t, x)


def diffuse(x: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
    """z_t = alpha_t x + sigma_t eps."""
    alpha_t, sigma_t = _coeffs(t, x)
    return alpha_t * x + sigma_t * eps


def v_from_x_eps(x: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """v = alpha_t eps - sigma_t x."""
    alpha_t, sigma_t = _coeffs(t, x)
    return alpha_t * eps - sigma_t * x


def x_from_v(z_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    """x_hat = alpha_t z_t - sigma_t v_hat (well defined for every t, also alpha_t = 0)."""
    alpha_t, sigma_t = _coeffs(t, z_t)
    return alpha_t * z_t - sigma_t * v


def eps_from_v(z_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    """eps_hat = sigma_t z_t + alpha_t v_hat."""
    alpha_t, sigma_t = _coeffs(t, z_t)
    return sigma_t * z_t + alpha_t * v


def eps_from_x(z_t: torch.Tensor, x_hat: torch.Tensor, t) -> torch.Tensor:
    """eps_hat = (z_t - alpha_t x_hat) / sigma_t: undefined at t = 0 (sigma_0 = 0)."""
    alpha_t, sigma_t = _coeffs(t, z_t)
    return (z_t - alpha_t * x_hat) / sigma_t


def x_from_eps(z_t: torch.Tensor, eps_hat: torch.Tensor, t) -> torch.Tensor:
    """x_hat = (z_t - sigma_t eps_hat) / alpha_t: blows up at t = 1 (alpha_1 = 0).

    This is why eps-prediction cannot start a few-step sampler (PD paper, Sec. 4).
    """
    alpha_t, sigma_t = _coeffs(t, z_t)
    return (z_t - sigma_t * eps_hat) / alpha_t


def v_from_x(z_t: torch.Tensor, x_hat: torch.Tensor, t) -> torch.Tensor:
    """v_hat = (alpha_t z_t - x_hat) / sigma_t (inverse of `x_from_v`; undefined at t = 0)."""
    alpha_t, sigma_t = _coeffs(t, z_t)
    return (alpha_t * z_t - x_hat) / sigma_t


# ==== DDIM, its inversion, guidance ===================================================================================


def ddim_step(x_hat: torch.Tensor, z_t: torch.Tensor, t, s) -> torch.Tensor:
    """One deterministic DDIM step from t to s < t (Song et al. 2021):

        z_s = alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t

    At s = 0 this returns x_hat exactly (alpha_0 = 1, sigma_0 = 0).
    """
    ### BEGIN SOLUTION
    alpha_t, sigma_t = _coeffs(t, z_t)
    alpha_s, sigma_s = _coeffs(s, z_t)
    eps_hat = (z_t - alpha_t * x_hat) / sigma_t
    return alpha_s * x_hat + sigma_s * eps_hat
    ### END SOLUTION


def invert_ddim(z_t: torch.Tensor, z_s: torch.Tensor, t, s) -> torch.Tensor:
    """Target inversion (PD Appendix G): the x_tilde whose single DDIM step from z_t lands on z_s.

        x_tilde = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)

    The denominator is sin(pi (t - s) / 2) / sigma_t > 0 for t > s. At s = 0, x_tilde = z_0.
    """
    ### BEGIN SOLUTION
    alpha_t, sigma_t = _coeffs(t, z_t)
    alpha_s, sigma_s = _coeffs(s, z_t)
    ratio = sigma_s / sigma_t
    return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)
    ### END SOLUTION


def cfg(x_cond: torch.Tensor, x_uncond: torch.Tensor, w) -> torch.Tensor:
    """Classifier-free guidance in x-space (Meng et al.'s convention):

        x_hat^w = (1 + w) x_hat(z_t, c) - w x_hat(z_t, null)        (w = 0: the conditional model)
    """
    ### BEGIN SOLUTION
    w = bcast(_as_time(w, x_cond), x_cond)
    return (1.0 + w) * x_cond - w * x_uncond
    ### END SOLUTION


def guided(denoiser, w: float, null_label: int):
    """A denoiser that applies classifier-free guidance with weight w (two network calls; one at w = 0,
    where cfg's (1 + w) x_cond - w x_uncond is x_cond exactly)."""
    if isinstance(w, (int, float)) and w == 0:
        return denoiser

    def guided_denoiser(z_t, t, labels):
        x_cond = denoiser(z_t, t, labels)
        x_uncond = denoiser(z_t, t, torch.full_like(labels, null_label))
        return cfg(x_cond, x_uncond, w)

    return guided_denoiser


class Denoiser(nn.Module):
    """Wraps a v-predicting network into the denoiser protocol: forward returns x_hat.

    `predict_v` exposes the raw network output for Alg. 1's v-MSE.
    `w` is passed through to networks with a guidance-weight embedding (guided distillation).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_classes = net.num_classes
        self.null_label = net.num_classes

    def predict_v(self, z_t, t, labels, w=None):
        return self.net(z_t, _as_time(t, z_t).expand(z_t.shape[0]), labels, w)

    def forward(self, z_t, t, labels, w=None):
        t = _as_time(t, z_t).expand(z_t.shape[0])
        v_hat = self.predict_v(z_t, t, labels, w).float()
        return x_from_v(z_t, v_hat, t)  # x_hat = alpha_t z_t - sigma_t v_hat

    def bottleneck(self, z_t, t, labels, w=None):
        """The network's middle features: what DMD2's GAN classifier reads (dmd2.py)."""
        return self.net.bottleneck(z_t, _as_time(t, z_t).expand(z_t.shape[0]), labels, w)


@contextlib.contextmanager
def no_grad_fp32():
    """Where a distillation target is made: no gradient, and autocast off, so the teacher (and DMD's
    real and fake scores) run in fp32 even inside a bf16 training step. A target is often the small
    difference of two teacher predictions (PD at N = 4096: about 1e-4), below bf16's rounding
    (8-bit mantissa); the student's own forward may stay in bf16 (docs/precision.md).
    A decorator (`@no_grad_fp32()`) or a `with` block."""
    with torch.no_grad(), torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        yield


def trainable_copy(teacher: nn.Module) -> nn.Module:
    """A student (or generator, or fake score) starts as a copy of its teacher, in train mode
    with gradients on and dropout off: every distillation method trains without dropout. A teacher whose
    students read its network their own way says so with `as_student()` (a pretrained epsilon teacher)."""
    model = copy.deepcopy(teacher).train().requires_grad_(True)
    if hasattr(model, "as_student"):
        model.as_student()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def time_grid(steps: int) -> list[float]:
    """The N-step DDIM grid from t = 1 down to t = 0: [1, (N-1)/N, ..., 0]."""
    return [i / steps for i in range(steps, -1, -1)]


@torch.no_grad()
def ddim_sample(denoiser, z: torch.Tensor, steps: int, labels: torch.Tensor,
                return_trajectory: bool = False, progress: bool = False, grid: list[float] | None = None):
    """N-step deterministic DDIM from z = z_1 ~ N(0, I); returns the final x_hat.

    With `return_trajectory`, also returns the list [z_1, z_{(N-1)/N}, ..., z_0]. `grid` replaces the uniform
    times by given ones, decreasing to 0 (a discrete-time sampler's steps in our time, for comparisons).
    """
    assert z.shape[0] == labels.shape[0], "one label per sample"
    grid = time_grid(steps) if grid is None else grid
    assert len(grid) == steps + 1 and grid[-1] == 0, "a grid of steps + 1 times ending at 0"
    trajectory = [z]
    pairs = list(zip(grid[:-1], grid[1:]))
    for t, s in tqdm(pairs, desc=f"DDIM {steps}", leave=False, disable=not progress):
        t_vec = torch.full((z.shape[0],), t, device=z.device)
        x_hat = denoiser(z, t_vec, labels)
        z = ddim_step(x_hat, z, t, s)  # at s = 0 this is x_hat
        trajectory.append(z)
    return (z, trajectory) if return_trajectory else z


# ==== The networks: v-prediction, a DDPM/PD-style UNet for images and a small MLP for 2-D points ======================


def sinusoidal_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Transformer-style Fourier features of a scalar per example: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = scale * t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class Conditioning(nn.Module):
    """Time (and optional guidance-weight) Fourier features through an MLP, plus a learned
    class embedding with one extra row for the null label. Output: (B, dim)."""

    def __init__(self, base: int, dim: int, num_classes: int):
        super().__init__()
        self.base = base
        self.time = nn.Sequential(nn.Linear(base, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(num_classes + 1, dim)
        self.guidance = None  # switched on by guided distillation

    def enable_w_embedding(self) -> None:
        """Add w's embedding (Meng et al.: Fourier features added to the time embedding).
        Its output layer starts at zero, so the network's output is unchanged at first."""
        dim = self.time[-1].out_features
        ref = self.time[0].weight
        self.guidance = nn.Sequential(nn.Linear(self.base, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.guidance.to(device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(self.guidance[-1].weight)
        nn.init.zeros_(self.guidance[-1].bias)

    def forward(self, t, labels, w=None):
        emb = self.time(sinusoidal_embedding(t, self.base)) + self.label(labels)
        if self.guidance is not None:
            if w is None:
                raise ValueError("this network was trained with a guidance-weight input: pass w")
            w = torch.as_tensor(w, dtype=torch.float32, device=t.device).expand(t.shape[0])
            emb = emb + self.guidance(sinusoidal_embedding(w, self.base, scale=100.0))
        return emb


class MLPDenoiserNet(nn.Module):
    """v-prediction MLP for 2-D points: [z_t, embedding] -> hidden x depth (SiLU) -> v_hat."""

    def __init__(self, num_classes: int, hidden: int = 256, depth: int = 3, dim: int = 2, emb: int = 64):
        super().__init__()
        self.num_classes = num_classes
        self.cond = Conditioning(emb, emb, num_classes)
        layers, width = [], dim + emb
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers, nn.Linear(hidden, dim))

    def enable_w_embedding(self) -> None:
        self.cond.enable_w_embedding()

    def forward(self, z_t, t, labels, w=None):
        emb = self.cond(t, labels, w)  # (B, emb)
        return self.body(torch.cat([z_t, emb], dim=1))  # (B, 2)

    def bottleneck(self, z_t, t, labels, w=None):
        """The last hidden layer's features (B, hidden) that DMD2's GAN classifier reads (dmd2.py)."""
        return self.body[:-1](torch.cat([z_t, self.cond(t, labels, w)], dim=1))


def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with min(32, ch / 4) groups (DDPM's 32 on its wide layers), which must divide the channels."""
    groups = min(32, ch // 4)
    if groups < 1 or ch % groups:
        raise ValueError(f"a layer of {ch} channels does not split into GroupNorm's {groups} groups")
    return nn.GroupNorm(groups, ch)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.drop = group_norm(cout), nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, residual, zero-initialised output."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x, emb=None):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)  # (B, HW, C)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """DDPM-style UNet: residual blocks, self-attention at the listed resolutions,
    sinusoidal time embedding, class embedding with a null class, dropout,
    zero-initialised output convolution. `channels=128, ch_mult=(1, 2, 2, 2),
    num_res_blocks=2, attn_res=(16,)` is DDPM's CIFAR-10 network (35.7M parameters)."""

    def __init__(self, num_classes: int, in_ch: int = 3, channels: int = 128, ch_mult=(1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_res=(16,), dropout: float = 0.1, resolution: int = 32):
        super().__init__()
        self.num_classes, self.resolution = num_classes, resolution
        emb = 4 * channels
        self.cond = Conditioning(channels, emb, num_classes)
        self.stem = nn.Conv2d(in_ch, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch, res = [channels], channels, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, channels * mult, emb, dropout)]
                ch = channels * mult
                if res in attn_res:
                    blocks.append(Attention(ch))
                self.down.append(nn.ModuleList(blocks))
                skips.append(ch)
            if level != len(ch_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb, dropout), Attention(ch), ResBlock(ch, ch, emb, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skips.pop(), channels * mult, emb, dropout)]
                ch = channels * mult
                if res in attn_res:
                    blocks.append(Attention(ch))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, in_ch, 3, padding=1)))

    def enable_w_embedding(self) -> None:
        self.cond.enable_w_embedding()

    def forward(self, z_t, t, labels, w=None):
        h, hs, emb = self.encode(z_t, t, labels, w)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = torch.cat([h, hs.pop()], dim=1)  # skip connection: channels add
                for block in layer:
                    h = block(h, emb)
            else:
                h = layer(h)  # upsample: H, W double
        return self.out(h)  # (B, in_ch, H, W)

    def encode(self, z_t, t, labels, w=None):
        """The way down and the middle: (h, the skips, the embedding). h is the bottleneck,
        (B, channels * ch_mult[-1], H / 2^(levels - 1), W / 2^(levels - 1))."""
        if z_t.shape[-2:] != (self.resolution, self.resolution):  # attention sits at sizes counted from it
            raise ValueError(f"this UNet was built for {self.resolution}x{self.resolution} inputs, "
                             f"got {tuple(z_t.shape[-2:])} (set --image-size)")
        emb = self.cond(t, labels, w)  # (B, 4 * channels)
        h = self.stem(z_t)  # (B, channels, H, W)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                for block in layer:
                    h = block(h, emb)
            else:
                h = layer(h)  # downsample: H, W halve
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        return h, hs, emb

    def bottleneck(self, z_t, t, labels, w=None):
        """The middle features (B, C, h, w) that DMD2's GAN classifier reads (dmd2.py)."""
        return self.encode(z_t, t, labels, w)[0]


# ==== Alg. 1 (PD paper): the standard diffusion loss ==================================================================


def drop_labels(labels: torch.Tensor, p: float, null_label: int) -> torch.Tensor:
    """Classifier-free guidance training: replace each label by the null label w.p. p."""
    drop = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def diffusion_loss(denoiser: Denoiser, x: torch.Tensor, labels: torch.Tensor,
                   t: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                   reduce: bool = True) -> torch.Tensor:
    """Alg. 1 of the PD paper: t ~ U[0, 1], z_t = alpha_t x + sigma_t eps, || v_hat - v ||^2.

    (v-MSE equals x-MSE weighted by SNR + 1.) Returns the mean, or with `reduce=False`
    the per-example loss (B,), which the loops use to log losses by t bucket.
    """
    if t is None:
        t = torch.rand(x.shape[0], device=x.device)
    if eps is None:
        eps = torch.randn_like(x)
    z_t = diffuse(x, t, eps)
    v = v_from_x_eps(x, eps, t)  # v = alpha_t eps - sigma_t x
    v_hat = denoiser.predict_v(z_t, t, labels).float()
    per_example = (v_hat - v).pow(2).flatten(1).mean(1)  # (B,)
    return per_example.mean() if reduce else per_example


def loss_by_t_bucket(per_example: torch.Tensor, t: torch.Tensor, buckets: int = 4) -> dict:
    """Mean per-example loss in `buckets` equal bins of t: {'t<0.25': ..., ...}."""
    out = {}
    idx = (t.detach() * buckets).long().clamp(max=buckets - 1)
    for b in range(buckets):
        mask = idx == b
        if mask.any():
            out[f"t{b / buckets:.2f}-{(b + 1) / buckets:.2f}"] = per_example.detach()[mask].mean().item()
    return out
