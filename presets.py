"""Presets, the same names in every script, and a command line on which every field of the
resolved config can be overridden (`--batch-size 64`, `--ch-mult 1 2 2`, `--no-hflip`).

    toy      2-D data (gaussians8), an MLP, the CPU: a teacher in about 75 s on 2 cores
    fmnist   Fashion-MNIST padded to 32x32, a small UNet: minutes on a GPU
    cifar10  CIFAR-10, DDPM's 35.7M-parameter UNet, PD's training settings: hours on a GPU
    auto     cifar10 where CUDA is available, otherwise toy (the default)

A method script adds its own fields with their per-preset values via `parse_config`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import UserError

# name: (type, help). Type "ints" is a list of integers, "floats" a list of floats.
TEACHER_FIELDS = {
    "data": (str, "data set: gaussians8 | moons (toy), fmnist, cifar10"),
    "data_dir": (str, "where image data sets are looked for (and downloaded to)"),
    "net": (str, "network: mlp (toy) or unet"),
    "hidden": (int, "MLP width"),
    "depth": (int, "MLP hidden layers"),
    "channels": (int, "UNet base channels"),
    "ch_mult": ("ints", "UNet channel multipliers per resolution"),
    "num_res_blocks": (int, "UNet residual blocks per resolution"),
    "attn_res": ("ints", "UNet resolutions with self-attention"),
    "dropout": (float, "dropout in the UNet's residual blocks"),
    "batch_size": (int, "training batch size"),
    "lr": (float, "Adam learning rate"),
    "iterations": (int, "teacher training iterations"),
    "warmup": (int, "linear learning-rate warm-up iterations"),
    "ema_decay": (float, "EMA decay of the teacher's weights"),
    "grad_clip": (float, "global gradient-norm clip"),
    "label_dropout": (float, "probability of replacing a label by the null label (for guidance)"),
    "hflip": (bool, "random horizontal flips of training images"),
    "seed": (int, "seed for weights, noise and data order"),
    "device": (str, "auto (cuda, then mps, then cpu), cuda, mps or cpu"),
    "out_dir": (str, "run folder (default runs/<preset>)"),
    "teacher": (str, "teacher checkpoint (default <out_dir>/teacher.pt)"),
    "eval_steps": ("ints", "DDIM step counts measured at the end"),
    "eval_samples": (int, "samples per measurement"),
    "eval_seed": (int, "seed of the evaluation noise (the same in every script)"),
    "log_every": (int, "iterations between log lines"),
    "ckpt_every": (int, "iterations between checkpoints"),
    "sample_every": (int, "iterations between sample pictures"),
    "amp": (bool, "bf16 autocast on CUDA"),
    "compile": (bool, "torch.compile the network (CUDA)"),
}

_SHARED = dict(data_dir=None, device="auto", out_dir=None, teacher=None, seed=0, eval_seed=1234,
               hidden=256, depth=3, channels=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2,
               attn_res=[16], dropout=0.1, warmup=0, grad_clip=1.0, hflip=False, amp=True, compile=False)

TEACHER_PRESETS = {
    "toy": {**_SHARED, "data": "gaussians8", "net": "mlp", "batch_size": 512, "lr": 1e-3,
            "iterations": 20_000, "ema_decay": 0.999, "label_dropout": 0.3,
            "eval_steps": [1, 2, 4, 8, 64, 256], "eval_samples": 2000,
            "log_every": 500, "ckpt_every": 5000, "sample_every": 5000},
    "fmnist": {**_SHARED, "data": "fmnist", "net": "unet", "channels": 64, "ch_mult": [1, 2, 2],
               "num_res_blocks": 2, "attn_res": [16], "dropout": 0.1, "batch_size": 128, "lr": 2e-4,
               "iterations": 30_000, "warmup": 1000, "ema_decay": 0.9995, "label_dropout": 0.1,
               "eval_steps": [1, 2, 4, 8, 64, 256], "eval_samples": 64,
               "log_every": 200, "ckpt_every": 2000, "sample_every": 5000},
    # PD's official CIFAR-10 settings (docs/methods.md section 1) on DDPM's network.
    "cifar10": {**_SHARED, "data": "cifar10", "net": "unet", "dropout": 0.2, "hflip": True,
                "batch_size": 128, "lr": 2e-4, "iterations": 800_000, "warmup": 1000,
                "ema_decay": 0.9999, "label_dropout": 0.1,
                "eval_steps": [1, 2, 4, 8, 64, 256], "eval_samples": 64,
                "log_every": 500, "ckpt_every": 5000, "sample_every": 20_000},
}
PRESET_NAMES = ["auto", *TEACHER_PRESETS]
DATA_INFO = {"gaussians8": (8, 2), "moons": (2, 2), "fmnist": (10, 1), "cifar10": (10, 3)}
TEACHER_KEYS = ("data", "net", "hidden", "depth", "channels", "ch_mult", "num_res_blocks", "attn_res")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(description: str, fields: dict, flags: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="auto",
                        help=f"one of {', '.join(PRESET_NAMES)} (default auto); it sets every value below")
    for name, text in flags.items():
        parser.add_argument(_flag(name), action="store_true", help=text)
    group = parser.add_argument_group("config (each overrides the preset's value)")
    for name, (kind, text) in fields.items():
        if kind is bool:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind in ("ints", "floats"):
            group.add_argument(_flag(name), type=int if kind == "ints" else float, nargs="+", default=None, help=text)
        else:
            group.add_argument(_flag(name), type=kind, default=None, help=text)
    return parser


def resolve_preset(name: str) -> str:
    if name == "auto":
        chosen = "cifar10" if torch.cuda.is_available() else "toy"
        why = "CUDA is available" if chosen == "cifar10" else "no CUDA GPU found"
        print(f"preset: auto -> {chosen} ({why}; pass --preset to choose)")
        return chosen
    if name not in TEACHER_PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return name


def parse_config(description: str, method_fields: dict | None = None,
                 method_presets: dict | None = None, flags: dict | None = None, argv=None) -> dict:
    """Parse the command line into one flat config dict: preset values, then overrides.

    `method_fields` / `method_presets` add a method script's own fields, {preset: {field: value}};
    `flags` ({name: help}) are on/off switches that are not part of a preset (e.g. --resume),
    returned in the dict as booleans.
    """
    fields = {**TEACHER_FIELDS, **(method_fields or {})}
    flags = flags or {}
    parser = build_parser(description, fields, flags)
    args = parser.parse_args(argv)
    preset = resolve_preset(args.preset)
    config = {"preset": preset, **TEACHER_PRESETS[preset], **(method_presets or {}).get(preset, {})}
    for name in fields:
        value = getattr(args, name)
        if value is not None:
            config[name] = value
    config = finish_config(config)
    config.update({name: getattr(args, name) for name in flags})
    return config


def finish_config(config: dict) -> dict:
    """Derived fields and sanity checks, shared by the CLI and by code that builds configs."""
    if config["data"] not in DATA_INFO:
        raise UserError(f"unknown data set {config['data']!r}; choose one of {', '.join(DATA_INFO)}")
    toy = config["data"] in ("gaussians8", "moons")
    if toy != (config["net"] == "mlp"):
        raise UserError(f"--net {config['net']} does not fit --data {config['data']}: "
                        "toy data uses --net mlp, images --net unet")
    config["num_classes"], config["in_ch"] = DATA_INFO[config["data"]]
    config["out_dir"] = config["out_dir"] or str(Path("runs") / config["preset"])
    config["teacher"] = config["teacher"] or str(Path(config["out_dir"]) / "teacher.pt")
    for name in ("batch_size", "iterations", "eval_samples", "log_every", "ckpt_every", "sample_every"):
        if config[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {config[name]}")
    if not 0.0 <= config["label_dropout"] < 1.0:
        raise UserError(f"--label-dropout must be in [0, 1), got {config['label_dropout']}")
    if any(s < 1 for s in config["eval_steps"]):
        raise UserError("--eval-steps must all be at least 1")
    return config


def config_for(preset: str, **overrides) -> dict:
    """A resolved config without a command line (tests, notebooks)."""
    return finish_config({"preset": preset, **TEACHER_PRESETS[preset], **overrides})
