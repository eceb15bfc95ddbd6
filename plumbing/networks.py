"""The two v-predicting networks: a DDPM/PD-style UNet for images (32x32 by default) and a small MLP
for 2-D toy data. Both are called as `net(z_t, t, labels, w=None) -> v_hat`, with
t of shape (B,) in [0, 1], labels (B,) ints where `num_classes` is the null label, and w
an optional guidance weight (B,) read only once `enable_w_embedding()` has been called.
The method scripts never care which of the two they hold (`common.Denoiser` wraps both).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing.config import image_size


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


# ----------------------------------------------------------------------------------------
# 2-D toy data
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# Images (DDPM / PD style)
# ----------------------------------------------------------------------------------------


def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4), ch)


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
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = torch.cat([h, hs.pop()], dim=1)  # skip connection: channels add
                for block in layer:
                    h = block(h, emb)
            else:
                h = layer(h)  # upsample: H, W double
        return self.out(h)  # (B, in_ch, H, W)


def build_network(config: dict) -> nn.Module:
    """The preset's network, from the resolved config."""
    if config["net"] == "mlp":
        return MLPDenoiserNet(config["num_classes"], hidden=config["hidden"], depth=config["depth"])
    return UNet(config["num_classes"], in_ch=config["in_ch"], channels=config["channels"],
                ch_mult=tuple(config["ch_mult"]), num_res_blocks=config["num_res_blocks"],
                attn_res=tuple(config["attn_res"]), dropout=config["dropout"],
                resolution=image_size(config))  # attention placed by the real input size
