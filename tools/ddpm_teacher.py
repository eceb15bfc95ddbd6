"""Train a small discrete-time DDPM in diffusers' format, to stand in for google/ddpm-cifar10-32 where it
cannot be downloaded: a pretrained teacher a CPU can make in minutes, for `--teacher diffusers:<folder>`.

It is Ho et al.'s DDPM as google/ddpm-cifar10-32 was trained: a diffusers UNet2DModel predicting epsilon
at K = 1000 discrete steps of linear betas from 1e-4 to 0.02, with DDPM's simple loss

    k ~ U{0, ..., K-1},  eps ~ N(0, I),  z_k = sqrt(alpha_bar_k) x + sqrt(1 - alpha_bar_k) eps
    loss = || eps_hat(z_k, k) - eps ||^2

It shares nothing with this project's continuous-time teacher but the data, the optimiser settings and
the network's shape (the preset's --channels, --ch-mult, --num-res-blocks and --attn-res, read as
diffusers blocks). The EMA weights and the scheduler's config are written with save_pretrained to
<out_dir>/ddpm/; a killed run resumes from <out_dir>/ddpm/progress.pt with --resume.

    python tools/ddpm_teacher.py --preset fmnist16 --out-dir runs/fmnist16_ddpm      # 2 CPU cores: minutes
    python dmd.py --preset fmnist16 --out-dir runs/fmnist16_ddpm --teacher diffusers:runs/fmnist16_ddpm/ddpm
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import plumbing.interrupt  # noqa: E402, F401  (first: Ctrl-C while torch loads is one line)

import torch  # noqa: E402

from plumbing.config import image_size, parse_config  # noqa: E402
from plumbing.data import BatchStream  # noqa: E402
from plumbing.errors import require  # noqa: E402
from plumbing.loop import Loop  # noqa: E402
from plumbing.pretrained import require_diffusers  # noqa: E402
from plumbing.training import EMA, optimizer_step, pick_device, run_cli, seed_everything  # noqa: E402
from train_teacher import TeacherConfig  # noqa: E402


def ddpm_unet(config: TeacherConfig):
    """The preset's UNet shape as a diffusers UNet2DModel: one block per --ch-mult level, attention at the
    --attn-res resolutions, GroupNorm of 8 groups."""
    diffusers = require_diffusers()
    widths = tuple(config.channels * m for m in config.ch_mult)
    require(all(w % 8 == 0 for w in widths), f"--channels {config.channels} with --ch-mult "
            f"{' '.join(map(str, config.ch_mult))} gives widths {widths}; GroupNorm's 8 groups need multiples of 8")
    size = image_size(config)
    sizes = [size // 2 ** i for i in range(len(config.ch_mult))]
    down = tuple("AttnDownBlock2D" if s in config.attn_res else "DownBlock2D" for s in sizes)
    up = tuple("AttnUpBlock2D" if s in config.attn_res else "UpBlock2D" for s in reversed(sizes))
    return diffusers.UNet2DModel(sample_size=size, in_channels=config.in_ch, out_channels=config.in_ch,
                                 block_out_channels=widths,
                                 layers_per_block=config.num_res_blocks, down_block_types=down, up_block_types=up,
                                 norm_num_groups=8, attention_head_dim=8, dropout=config.dropout)


def train_ddpm(config: TeacherConfig, resume: bool = False) -> Path:
    """DDPM's training with Adam, warm-up, clip and EMA as the preset's teacher; returns the saved folder."""
    diffusers = require_diffusers()
    require(config.net == "unet", "a DDPM teacher is an image model; pass an image --preset")
    device = pick_device(config.device)
    out = Path(config.out_dir) / "ddpm"
    seed_everything(config.seed)
    unet = ddpm_unet(config).to(device)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                        beta_end=0.02, prediction_type="epsilon", clip_sample=True)
    ema = EMA(unet, config.ema_decay)
    opt = torch.optim.Adam(unet.parameters(), lr=config.lr)
    stream = BatchStream(config, device, config.seed)
    loop = Loop(out / "progress.pt", config, "ddpm", config.iterations,
                {"model": unet, "ema": ema, "opt": opt, "stream": stream}, "DDPM teacher", resume=resume,
                checkpoint_at_end=True, kind="ddpm_teacher")
    alpha_bar = scheduler.alphas_cumprod.to(device)  # (K,)
    unet.train()
    for step in loop:
        x, _ = stream.next()  # unconditional: labels unused
        for group in opt.param_groups:  # linear warm-up
            group["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup))
        k = torch.randint(0, scheduler.config.num_train_timesteps, (x.shape[0],), device=device)  # k ~ U{0..K-1}
        eps = torch.randn_like(x)
        a = alpha_bar[k].view(-1, 1, 1, 1)
        z_k = a.sqrt() * x + (1 - a).sqrt() * eps  # z_k = sqrt(alpha_bar_k) x + sqrt(1 - alpha_bar_k) eps
        loss = (unet(z_k, k).sample - eps).pow(2).mean()  # DDPM's simple loss
        grad_norm = optimizer_step(opt, loss, unet, config.grad_clip)
        ema.update(unet)
        loop.log(loss=loss, grad_norm=grad_norm)
    ema.model.save_pretrained(out)
    scheduler.save_pretrained(out)
    return out


def main(argv=None) -> None:
    config, flags = parse_config(TeacherConfig, __doc__.split("\n\n")[0], argv,
                                 {"resume": "continue the run from its checkpoint"})
    folder = train_ddpm(config, resume=flags["resume"])
    print(f"DDPM teacher in {folder}: pass --teacher diffusers:{folder}")


if __name__ == "__main__":
    run_cli(main)
