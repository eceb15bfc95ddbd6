"""The network a config describes, and a saved one rebuilt: what stands between the configs and
checkpoints of the plumbing and the two networks of `common.py` (the UNet and the toy MLP)."""

from __future__ import annotations

from common import Denoiser, MLPDenoiserNet, UNet
from plumbing.config import image_size
from plumbing.errors import UserError
from plumbing.pretrained import is_pretrained, load_pretrained


def build_network(config: dict):
    """The preset's network, from the resolved config; channel counts GroupNorm cannot split are one line."""
    if config["net"] == "mlp":
        return MLPDenoiserNet(config["num_classes"], hidden=config["hidden"], depth=config["depth"])
    try:
        return UNet(config["num_classes"], in_ch=config["in_ch"], channels=config["channels"],
                    ch_mult=tuple(config["ch_mult"]), num_res_blocks=config["num_res_blocks"],
                    attn_res=tuple(config["attn_res"]), dropout=config["dropout"],
                    resolution=image_size(config))  # attention placed by the real input size
    except ValueError as e:  # common.group_norm: a width its groups do not divide
        raise UserError(f"--channels {config['channels']} with --ch-mult {' '.join(map(str, config['ch_mult']))}: "
                        f"{e}; a --channels that is a multiple of 32 always splits") from None


def frozen_denoiser(config: dict, weights: dict, device, w_embedding: bool = False):
    """A saved denoiser rebuilt from its config and weights, frozen (eval mode, no grads);
    `w_embedding` for guided distillation's w-conditioned students. The students of a diffusers teacher are
    that teacher's wrapper (plumbing/pretrained.py) with their own weights."""
    if is_pretrained(config):
        model = load_pretrained(config, device, weights=False)
        model.load_state_dict(weights)
        return model.eval().requires_grad_(False)
    net = build_network(config)
    if w_embedding:
        net.enable_w_embedding()
    model = Denoiser(net)
    model.load_state_dict(weights)
    return model.to(device).eval().requires_grad_(False)
