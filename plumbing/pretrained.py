"""A pretrained teacher: a diffusers DDPM checkpoint read as the project's denoiser (docs/pretrained.md).

    --teacher diffusers:google/ddpm-cifar10-32     a hub id (needs internet the first time)
    --teacher diffusers:path/to/folder             a folder written by save_pretrained

A DDPM is trained at K discrete steps k = 0..K-1 with alpha_bar_k = prod_{i <= k} (1 - beta_i); the project
runs in continuous time t in [0, 1] on the cosine schedule. Both are variance preserving (alpha^2 + sigma^2 = 1),
so one number fixes a noise level, its log-SNR lambda = log(alpha^2 / sigma^2), and a z_t of ours is a z of the
DDPM's at the same lambda as it is: no rescaling. For our t the wrapper

    1. finds the fractional step tau with lambda_DDPM(tau) = lambda_t, linear in lambda between the two
       neighbouring steps (k-diffusion's discrete-time wrappers interpolate the same way, in log sigma = -lambda/2);
    2. calls the network at tau (its sinusoidal time embedding takes fractional steps);
    3. turns its prediction (epsilon, v_prediction or sample, from the scheduler's config) into x_hat.

Outside the trained range [lambda_{K-1}, lambda_0] (for DDPM's linear betas: t < 0.0064 or t > 0.9960 of our
time) the rule is: **lambda is clamped to the range**, so the teacher reads z_t as if it were at the nearest
trained level, x_hat(z_t, t) = x_hat(z_t, clamp(t, t_min, t_max)). At t = 1, where alpha_1 = 0 and
x = (z - sigma eps) / alpha has no value, x_hat(z_1, 1) = x_hat(z_1, t_max) is finite.

Students and generators are copies of this wrapper (`common.trainable_copy`) that read an epsilon network
with alpha floored at 0.1: x_hat = (z - sigma eps_hat) / max(alpha, 0.1). Where alpha >= 0.1 (t <= 0.936)
they start as exactly the teacher. Above, the teacher's own reading divides by alpha down to
alpha_{K-1} = 0.0064 (157x for DDPM's betas), and a student's error in eps_hat there would cost 157 times as
much in x: with the floor it costs at most 10 times. docs/pretrained.md has the measurement behind the choice.

diffusers is imported only here, and only when a `diffusers:` teacher is asked for.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import torch
import torch.nn as nn

from common import bcast, logsnr, v_from_x
from plumbing.config import image_size
from plumbing.errors import UserError, require

PREFIX = "diffusers:"
PREDICTIONS = ("epsilon", "v_prediction", "sample")
STUDENT_ALPHA_FLOOR = 0.1  # students divide by max(alpha, 0.1): at most 10x, where the teacher reaches 157x


def is_pretrained(config: dict) -> bool:
    """Whether --teacher names a diffusers checkpoint rather than a teacher.pt of train_teacher.py."""
    return str(config["teacher"]).startswith(PREFIX)


def pretrained_name(config: dict) -> str:
    """'google/ddpm-cifar10-32' for --teacher diffusers:google/ddpm-cifar10-32."""
    return str(config["teacher"])[len(PREFIX):]


class DiscreteTimeTeacher(nn.Module):
    """A discrete-time DDPM network (a diffusers UNet2DModel) in the denoiser protocol:
    forward(z_t, t, labels) -> x_hat for continuous t in [0, 1]. Unconditional: labels are ignored, so every
    label, the null label included, gives the same x_hat(z_t)."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str, num_classes: int):
        super().__init__()
        require(prediction_type in PREDICTIONS,
                f"the diffusers scheduler predicts {prediction_type!r}; supported are {', '.join(PREDICTIONS)}")
        self.net, self.prediction_type = unet, prediction_type
        self.num_classes = self.null_label = num_classes  # labels are ignored (an unconditional teacher)
        alphas_cumprod = alphas_cumprod.double()  # (K,); fp64 here, then fp32 (MPS has no fp64)
        # lambda_k = log(alpha_bar_k / (1 - alpha_bar_k)), decreasing in k
        lambdas = torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)
        self.register_buffer("lambdas", lambdas.float(), persistent=False)
        # x from epsilon divides by max(alpha, alpha_floor): 0 for the teacher, STUDENT_ALPHA_FLOOR for its
        # students (`as_student`); saved with the weights, so a student's checkpoint reads as it trained
        self.register_buffer("alpha_floor", torch.tensor(0.0))

    def as_student(self) -> None:
        """Read the network as a student does: x_hat = (z - sigma eps_hat) / max(alpha, 0.1) for an epsilon
        network. Equal to the teacher wherever alpha >= 0.1 (t <= 0.936); above, an error in eps_hat costs at
        most 10 times as much in x, not 157 times (docs/pretrained.md). Called by `common.trainable_copy`."""
        if self.prediction_type == "epsilon":
            self.alpha_floor.fill_(STUDENT_ALPHA_FLOOR)

    @property
    def steps(self) -> int:
        return self.lambdas.shape[0]

    def time_of_step(self, k) -> torch.Tensor:
        """Our t for the DDPM's step k: tan(pi t / 2) = sigma / alpha = exp(-lambda_k / 2)."""
        lam = self.lambdas[torch.as_tensor(k, device=self.lambdas.device)]
        return (2 / math.pi * torch.atan(torch.exp(-0.5 * lam))).float()

    def step_of(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tau, lambda_c): the fractional step of our t, and the clamped log-SNR it stands for, both (B,)."""
        lam_max, lam_min = self.lambdas[0], self.lambdas[-1]
        lam = logsnr(t).clamp(lam_min, lam_max)  # the rule outside the trained range: clamp
        # lambdas decrease in k: k = the last step with lambda_k >= lam; interpolate linearly towards k + 1
        k = (torch.searchsorted(-self.lambdas, -lam, right=True) - 1).clamp(0, self.steps - 2)
        lam_k, lam_k1 = self.lambdas[k], self.lambdas[k + 1]
        tau = k + (lam_k - lam) / (lam_k - lam_k1)
        return tau.float(), lam

    def forward(self, z_t, t, labels=None, w=None):
        require(w is None, "a diffusers teacher has no guidance-weight embedding")
        t = torch.as_tensor(t, dtype=torch.float32, device=z_t.device).expand(z_t.shape[0])
        tau, lam = self.step_of(t)
        # alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda): the clamped level's (= ours inside the range)
        alpha, sigma = bcast(torch.sigmoid(lam).sqrt(), z_t), bcast(torch.sigmoid(-lam).sqrt(), z_t)
        out = self.net(z_t, tau).sample.float()  # (B, C, H, W), the network's prediction at step tau
        if self.prediction_type == "epsilon":  # x_hat = (z - sigma eps_hat) / alpha; a student floors alpha
            return (z_t - sigma * out) / alpha.clamp(min=self.alpha_floor)
        if self.prediction_type == "v_prediction":
            return alpha * z_t - sigma * out  # x_hat = alpha z - sigma v_hat
        return out  # "sample": the network predicts x itself

    def bottleneck(self, z_t, t, labels=None, w=None):
        """The UNet2DModel's middle features (its `mid_block`'s output), what DMD2's GAN classifier reads:
        caught by a forward hook while the whole network runs."""
        caught = []
        hook = self.net.mid_block.register_forward_hook(lambda module, args, out: caught.append(out))
        try:
            self.forward(z_t, t, labels, w)
        finally:
            hook.remove()
        return caught[0]

    def predict_v(self, z_t, t, labels=None, w=None):
        """v_hat for Alg. 1's v-MSE (DMD's fake score): from x_hat at the true t (t > 0)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=z_t.device).expand(z_t.shape[0])
        return v_from_x(z_t, self.forward(z_t, t, labels, w), t)


def require_diffusers():
    """The diffusers package, or a one-line error that says how to install it."""
    try:
        import diffusers
    except ImportError:
        raise UserError("a diffusers teacher needs the diffusers package: `pip install diffusers`") from None
    return diffusers


@functools.cache
def _folder(name: str) -> Path:
    """The folder of --teacher diffusers:<name>: a local one as it is; a hub id (owner/name) downloaded once
    into the Hugging Face cache, which later runs read without internet. Resolved once per process: every
    student a run rebuilds (`frozen_denoiser`) would otherwise ask the hub again."""
    if Path(name).exists():
        require(Path(name).is_dir(), f"--teacher diffusers:{name} is a file; pass the folder save_pretrained wrote")
        return Path(name)
    require(re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None,
            f"--teacher diffusers:{name}: no such folder, and not a hub id (owner/name)")
    require_diffusers()
    import huggingface_hub  # diffusers' own dependency
    try:
        return Path(huggingface_hub.snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as e:
        raise UserError(f"cannot download {name} from the Hugging Face hub (a hub id needs internet the first time; "
                        f"or pass a folder written by save_pretrained): {str(e).splitlines()[0]}") from None


def _locate(folder: Path) -> tuple[dict, dict]:
    """from_pretrained's keywords for the UNet and the scheduler: at the folder's top (as google/ddpm-cifar10-32)
    or in unet/ and scheduler/ (a pipeline's layout)."""
    unet = {} if (folder / "config.json").exists() else {"subfolder": "unet"}
    scheduler = {} if (folder / "scheduler_config.json").exists() else {"subfolder": "scheduler"}
    require((folder / unet.get("subfolder", "") / "config.json").exists(),
            f"{folder} holds no UNet config.json (at its top or in unet/); pass a folder save_pretrained wrote")
    require((folder / scheduler.get("subfolder", "") / "scheduler_config.json").exists(),
            f"{folder} holds no scheduler_config.json (at its top or in scheduler/); the noise schedule is needed")
    return unet, scheduler


def load_pretrained(config: dict, device, weights: bool = True) -> DiscreteTimeTeacher:
    """The wrapped diffusers model of --teacher diffusers:<name>, in eval mode (the caller freezes or copies it);
    `weights=False` builds the architecture alone, for a student's checkpoint to be loaded into."""
    diffusers, name = require_diffusers(), pretrained_name(config)
    where = _folder(name)
    unet_kw, scheduler_kw = _locate(where)
    try:
        if weights:
            unet = diffusers.UNet2DModel.from_pretrained(where, low_cpu_mem_usage=False, **unet_kw)
        else:
            unet = diffusers.UNet2DModel.from_config(diffusers.UNet2DModel.load_config(where, **unet_kw))
        scheduler = diffusers.DDPMScheduler.from_config(diffusers.DDPMScheduler.load_config(where, **scheduler_kw))
    except Exception as e:  # a folder diffusers cannot read: one line
        raise UserError(f"cannot load the diffusers teacher {name!r}: {str(e).splitlines()[0]}") from None
    require(type(unet).__name__ == "UNet2DModel", f"{name} is not a UNet2DModel")
    require(unet.config.num_class_embeds is None and unet.config.class_embed_type is None,
            f"{name} is class-conditional; only unconditional diffusers UNets are supported as teachers")
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    require((unet.config.in_channels, size) == (config["in_ch"], image_size(config)),
            f"the diffusers teacher {name} takes {unet.config.in_channels}x{size}x{size} images, but --data "
            f"{config['data']} --image-size {image_size(config)} gives {config['in_ch']}x{image_size(config)}x"
            f"{image_size(config)}; pass the --data and --image-size it was trained on")
    model = DiscreteTimeTeacher(unet, scheduler.alphas_cumprod, scheduler.config.prediction_type,
                                config["num_classes"])
    return model.to(device).eval()
