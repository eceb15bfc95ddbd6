"""Configs as plain dataclasses, presets as small overrides of their defaults, and a command line
on which every field can be overridden (`--batch-size 64`, `--ch-mult 1 2 2`, `--no-hflip`).

Each script declares its hyperparameters as a dataclass whose defaults are its paper's values,
one commented line per field; the comment is the field's `--help`. A class's `PRESETS` holds
only what a preset changes:

    @dataclass
    class PDConfig(TeacherConfig):
        start_steps: int = 8192   # the teacher's DDIM steps N in the first round (paper: 8192)
        PRESETS: ClassVar[dict] = {"toy": dict(start_steps=64)}

    PDConfig.from_preset("toy", round_iterations=500)   # toy values, then field overrides
    parse_config(PDConfig, __doc__)                # the same from the command line

Presets: toy (2-D data, an MLP, the CPU), fmnist16 (Fashion-MNIST at 16x16, a 0.7M UNet, 2 CPU cores),
fmnist (Fashion-MNIST at 32x32, a small UNet, a GPU), cifar10 (DDPM's UNet, the papers' settings),
auto (cifar10 where CUDA is available, otherwise toy).

A config also reads like the dict it is saved as (`config["lr"]`, `{**config}`), so the plumbing
and the checkpoints need not care which script made it. Whether a checkpoint fits a run is
derived from the fields: the network's fields for a teacher, and `run_keys()` for a method.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import math
import os
import re
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from plumbing.errors import UserError, require

PRESET_NAMES = ["auto", "toy", "fmnist16", "fmnist", "cifar10"]
DATA_INFO = {"gaussians8": (8, 2), "moons": (2, 2), "fmnist": (10, 1), "cifar10": (10, 3)}  # (classes, channels)


def flag(name: str) -> str:
    """A field's command-line flag: `pd_lr` -> `--pd-lr`."""
    return "--" + name.replace("_", "-")


def flag_words(name: str, value) -> list[str]:
    """A config field and value as the command line's words: --hidden 32, --ch-mult 1 2, --no-hflip."""
    if isinstance(value, bool):
        return [flag(name) if value else "--no-" + flag(name)[2:]]
    return [flag(name), *map(str, value if isinstance(value, list) else [value])]


class Config:
    """Dict-like access, presets, checks and the keys that tie a checkpoint to a run."""

    PRESETS: ClassVar[dict] = {}
    RESUMABLE: ClassVar[tuple] = ()  # own fields a resumed run may change (more updates, another cadence)
    ADDED: ClassVar[dict] = {}  # fields added since runs were saved: the value a saved run without them had in effect

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """One-line errors for values that make no sense; each class adds its own. Here, for every class:
        numbers are finite, and learning rates (`lr`, `*_lr`) above 0."""
        for f in dataclasses.fields(self):
            value = self[f.name]
            for v in value if isinstance(value, list) else [value]:
                require(not isinstance(v, float) or math.isfinite(v),
                        f"{flag(f.name)} must be a finite number, got {v}")
            if f.name == "lr" or f.name.endswith("_lr"):
                require(value > 0, f"{flag(f.name)} must be above 0, got {value}")

    # -- presets ---------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """The preset's values of every class in the hierarchy, then `overrides`."""
        if name not in PRESET_NAMES[1:]:
            raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES[1:])}")
        values = {"preset": name}
        for klass in reversed(cls.__mro__):
            values.update(klass.__dict__.get("PRESETS", {}).get(name, {}))
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"unknown config fields {sorted(unknown)} for {cls.__name__}")
        return cls(**{**values, **overrides})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    # -- reading like a dict -----------------------------------------------------------------

    def __getitem__(self, name: str):
        return getattr(self, name)

    def get(self, name: str, default=None):
        return getattr(self, name, default)

    def keys(self):
        return [*(f.name for f in dataclasses.fields(self)), "num_classes", "in_ch"]

    def as_dict(self) -> dict:
        """What a checkpoint stores: every field, and the derived ones the network needs."""
        return {name: self[name] for name in self.keys()}

    @property
    def num_classes(self) -> int:
        return DATA_INFO[self.data][0]

    @property
    def in_ch(self) -> int:
        return DATA_INFO[self.data][1]

    # -- which fields tie a checkpoint to a run ---------------------------------------------------

    @classmethod
    def own_fields(cls) -> list[str]:
        """The fields declared by this class itself (not inherited)."""
        bases = [base for base in cls.__bases__ if dataclasses.is_dataclass(base)]
        inherited = {f.name for base in bases for f in dataclasses.fields(base)}
        return [f.name for f in dataclasses.fields(cls) if f.name not in inherited]

    @classmethod
    def run_keys(cls, upto: type) -> tuple:
        """The fields a resumed checkpoint must share with this run: every field declared from `upto`'s
        subclass down to `cls`, except the RESUMABLE ones, and the seed."""
        keys = []
        for klass in cls.__mro__:
            if klass is upto or not dataclasses.is_dataclass(klass):
                break
            keys += [k for k in klass.own_fields() if k not in klass.__dict__.get("RESUMABLE", ())]
        return (*keys, "seed")


@dataclass
class NetworkConfig(Config):
    """The data and the network: what a teacher checkpoint must match to be loaded."""

    data: str = "cifar10"             # data set: gaussians8 | moons (toy), fmnist, cifar10
    net: str = "unet"                 # network: mlp (toy data) or unet (images)
    hidden: int = 256                 # MLP width
    depth: int = 3                    # MLP hidden layers
    channels: int = 128               # UNet base channels (DDPM's CIFAR-10 network)
    ch_mult: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 2, 2])  # UNet channel multipliers
    num_res_blocks: int = 2           # UNet residual blocks per resolution
    attn_res: list[int] = dataclasses.field(default_factory=lambda: [16])  # UNet resolutions with self-attention
    image_size: int = 32              # images: height and width; the data are resized to it (area average)

    PRESETS: ClassVar[dict] = {
        "toy": dict(data="gaussians8", net="mlp"),
        # 0.70M parameters; a teacher update at batch 128 takes 0.31 s on 2 idle CPU cores (docs/results.md).
        "fmnist16": dict(data="fmnist", image_size=16, channels=32, ch_mult=[1, 2], num_res_blocks=1, attn_res=[8]),
        "fmnist": dict(data="fmnist", channels=64, ch_mult=[1, 2, 2]),
    }

    @classmethod
    def network_keys(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(NetworkConfig))

    def check(self) -> None:
        super().check()
        require(self.data in DATA_INFO, f"unknown data set {self.data!r}; choose one of {', '.join(DATA_INFO)}")
        require((self.data in ("gaussians8", "moons")) == (self.net == "mlp"),
                f"--net {self.net} does not fit --data {self.data}: toy data uses --net mlp, images --net unet")
        for name in ("hidden", "depth", "channels", "num_res_blocks", "image_size"):
            require(self[name] >= 1, f"{flag(name)} must be at least 1, got {self[name]}")
        defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                    for f in dataclasses.fields(NetworkConfig)}
        other = ("channels", "ch_mult", "num_res_blocks", "attn_res", "image_size") if self.net == "mlp" else \
            ("hidden", "depth")  # the other network's settings: ignored, yet stored with the checkpoint
        changed = [name for name in other if self[name] != defaults[name]]
        require(not changed, f"{flag(changed[0]) if changed else ''} is for "
                f"{'images (the UNet)' if self.net == 'mlp' else 'toy data (the MLP)'}: this run's network is "
                f"{'an MLP (--hidden, --depth)' if self.net == 'mlp' else 'a UNet (--channels, --ch-mult, ...)'}")
        require(min(self.ch_mult) >= 1, f"--ch-mult must all be at least 1, got {self.ch_mult}")
        levels = 2 ** (len(self.ch_mult) - 1)  # the UNet halves the size between levels
        require(self.net == "mlp" or (self.image_size >= levels and self.image_size % levels == 0),
                f"--image-size {self.image_size} cannot be halved {len(self.ch_mult) - 1} times by the UNet "
                f"(--ch-mult {' '.join(map(str, self.ch_mult))}); use a multiple of {levels}")
        sizes = [self.image_size // 2**level for level in range(len(self.ch_mult))]  # the UNet's resolutions
        missing = [r for r in self.attn_res if r not in sizes]
        require(self.net == "mlp" or str(self.get("teacher")).startswith("diffusers:") or not missing,
                f"--attn-res {' '.join(map(str, missing))}: no such resolution in this UNet (--image-size "
                f"{self.image_size} with --ch-mult {' '.join(map(str, self.ch_mult))} has "
                f"{', '.join(map(str, sizes))}), so its attention would be dropped; pass --attn-res among those")


def check_device(name: str) -> None:
    """A --device name torch knows (whether this machine has it is `pick_device`'s to say)."""
    try:
        kind = "auto" if name == "auto" else torch.device(name).type
    except RuntimeError:
        kind = None
    require(kind in ("auto", "cuda", "mps", "cpu"), f"unknown --device {name!r}; choose auto, cpu, cuda, cuda:<n> "
            "or mps")


def check_writable(folder: str, flag: str = "--out-dir") -> None:
    """--out-dir (or `flag`) is a folder this user may write, or may be made in one: checked before any work."""
    path = Path(folder).absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    require(existing.is_dir(), f"{flag} {folder}: {existing} is a file, not a folder; pass another {flag}")
    require(os.access(existing, os.W_OK | os.X_OK), f"{flag} {folder}: {existing} is not writable by you; "
            f"pass another {flag}")


def image_size(config: dict) -> int:
    """The images' height and width (checkpoints made before the field existed were 32x32)."""
    return config.get("image_size") or 32


def sample_shape(config: dict) -> tuple:
    """The shape of one sample: (2,) for toy points, (channels, image_size, image_size) for images.
    Every sampler, evaluation and noise draw takes its shape from here."""
    if config["net"] == "mlp":
        return (2,)
    return (config["in_ch"], image_size(config), image_size(config))


@dataclass
class RunConfig(NetworkConfig):
    """Everything about a run that is not the algorithm: folders, device, seeds, evaluation, cadence."""

    preset: str = "cifar10"           # the preset these values came from (names the run folder)
    data_dir: str | None = None       # where image data sets are looked for (and downloaded to)
    device: str = "auto"              # auto (cuda, then mps, then cpu), cuda, mps or cpu
    out_dir: str | None = None        # run folder (default runs/<preset>)
    teacher: str | None = None        # teacher checkpoint (default <out_dir>/teacher.pt)
    seed: int = 0                     # seed for weights, noise and data order
    eval_steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8, 64, 256])  # DDIM steps measured
    eval_samples: int = 1000          # samples per measurement: toy points, or class-balanced images (FD, accuracy)
    eval_seed: int = 1234             # seed of the evaluation noise (the same in every script)
    fd_max_steps: int = 256           # images: samplers with more steps get pictures only (0: pictures only)
    eval_share: float = 0.5           # images: the teacher's measurements cost at most this share of its training
    classifier_steps: int = 5000      # images: training steps of the offline feature classifier (cached in out_dir)
    inception: bool = True            # images: also Inception FID where torch-fidelity and its weights are available
    log_every: int = 500              # updates between log lines
    ckpt_every: int = 5000            # updates between checkpoints
    ckpt_seconds: int = 120           # also a checkpoint when this many seconds have passed since the last one
    sample_every: int = 20_000        # updates between sample pictures
    amp: bool = True                  # bf16 autocast on CUDA (docs/precision.md)
    compile: bool = False             # torch.compile the network (CUDA)

    PRESETS: ClassVar[dict] = {
        "toy": dict(eval_samples=2000, sample_every=5000, classifier_steps=0, inception=False),
        # 2 CPU cores: a 64-step measurement of 2000 samples takes about 85 s, so 256 steps get pictures only.
        "fmnist16": dict(eval_samples=2000, eval_steps=[1, 2, 4, 8, 16, 64, 256], fd_max_steps=64, log_every=50,
                         ckpt_every=250, sample_every=750, classifier_steps=2000, inception=False),
        "fmnist": dict(log_every=200, ckpt_every=2000, sample_every=5000, classifier_steps=3000, inception=False),
    }

    def __post_init__(self):
        for name in ("out_dir", "teacher", "data_dir"):  # "" is not a folder (and not "the default")
            require(self[name] is None or str(self[name]).strip() != "", f"{flag(name)} is empty; give a path, "
                    "or leave the flag out for its default")
        for name in ("out_dir", "teacher", "data_dir"):  # '~' is the home folder, also where no shell expands it
            if self[name] is not None and not str(self[name]).startswith("diffusers:"):
                setattr(self, name, os.path.expanduser(str(self[name])))
        self.out_dir = str(self.out_dir or Path("runs") / self.preset)
        self.teacher = str(self.teacher or Path(self.out_dir) / "teacher.pt")
        self.data_dir = None if self.data_dir is None else str(self.data_dir)
        super().__post_init__()

    def command(self, script: str, *extra: str, fields: tuple = ()) -> str:
        """`python <script> --preset P ...` with this run's folders, data and network flags (and `fields`) where they
        are not the preset's, so that a command suggested to the user makes what this run looks for."""
        preset = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                  for f in dataclasses.fields(self)}
        for klass in reversed(type(self).__mro__):
            preset.update(klass.__dict__.get("PRESETS", {}).get(self.preset, {}))
        preset.update(out_dir=str(Path("runs") / self.preset), teacher=str(Path(self.out_dir) / "teacher.pt"))
        words = ["python", script, "--preset", self.preset]
        for name in (*self.network_keys(), "data_dir", "out_dir", "teacher", *fields):
            value = self[name]
            if value == preset[name] or value is None:
                continue
            words += flag_words(name, value)
        return shlex.join([*words, *extra])

    def check(self) -> None:
        super().check()
        for name in ("log_every", "ckpt_every", "ckpt_seconds", "sample_every"):
            require(self[name] >= 1, f"{flag(name)} must be at least 1, got {self[name]}")
        for name in ("seed", "eval_seed"):
            require(0 <= self[name] < 2**31, f"{flag(name)} must be 0 or more (and below 2^31), got {self[name]}")
        require(self.eval_samples >= 2, f"--eval-samples must be at least 2 (the metrics compare sample sets), "
                f"got {self.eval_samples}")
        check_device(self.device)
        check_writable(self.out_dir)
        require(self.eval_share >= 0, f"--eval-share must be 0 (no cap) or more, got {self.eval_share}")
        require(self.fd_max_steps >= 0, f"--fd-max-steps must be 0 (pictures only) or more, got {self.fd_max_steps}")
        require(all(s >= 1 for s in self.eval_steps), "--eval-steps must all be at least 1")
        require(self.net == "mlp" or self.fd_max_steps == 0 or self.classifier_steps >= 1,
                "--classifier-steps must be at least 1 for image metrics (or pass --fd-max-steps 0)")


# ----------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------


def field_help(cls) -> dict:
    """{field: its comment} from the source of every dataclass in the hierarchy."""
    helps = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for name, text in re.findall(r"^    (\w+): [^\n]*?#\s*([^\n]*)$", source, re.M):
            helps[name] = text
    return helps


def resolve_preset(name: str) -> str:
    if name == "auto":
        chosen = "cifar10" if torch.cuda.is_available() else "toy"
        why = "CUDA is available" if chosen == "cifar10" else "no CUDA GPU found"
        print(f"preset: auto -> {chosen} ({why}; pass --preset to choose)")
        return chosen
    if name not in PRESET_NAMES:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return name


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a value of the wrong type) are one line, like every other."""

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        close = unknown and difflib.get_close_matches(unknown.group(1).split("=")[0], self._option_string_actions, 1)
        raise UserError(f"{message}" + (f"; did you mean {close[0]}?" if close else "") + " (see --help)")


def parse_config(cls, description: str, argv=None, flags: dict | None = None):
    """The command line -> (config, {flag: bool}). `flags` ({name: help}) are switches that are
    not part of a config (e.g. --resume)."""
    flags = flags or {}
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    parser = OneLineParser(description=description)
    parser.add_argument("--preset", default="auto",
                        help=f"one of {', '.join(PRESET_NAMES)} (default auto); it sets every value below")
    for name, text in flags.items():
        parser.add_argument(flag(name), action="store_true", help=text)
    groups = {}
    for f in dataclasses.fields(cls):
        if f.name == "preset":
            continue
        owner = next(k for k in reversed(cls.__mro__) if f.name in getattr(k, "__dataclass_fields__", {}))
        title = (owner.__doc__ or owner.__name__).strip().splitlines()[0].rstrip(".")
        group = groups.get(owner) or groups.setdefault(owner, parser.add_argument_group(title))
        kind, name = hints[f.name], flag(f.name)
        base = [a for a in typing.get_args(kind) if a is not type(None)]
        if kind is bool:
            group.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=helps.get(f.name))
        elif typing.get_origin(kind) is list:
            group.add_argument(name, type=typing.get_args(kind)[0], nargs="+", default=None, help=helps.get(f.name))
        else:
            group.add_argument(name, type=base[0] if base else kind, default=None, help=helps.get(f.name))
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                 if f.name != "preset" and getattr(args, f.name) is not None}
    config = cls.from_preset(resolve_preset(args.preset), **overrides)
    PARSED[:] = [config]  # what an out-of-memory error names (`out_of_memory`)
    return config, {name: getattr(args, name) for name in flags}


PARSED: list = []  # the config the command line made


def out_of_memory(error: BaseException) -> str | None:
    """The one line for an allocation that failed (None: `error` is something else): what was asked for and what
    is free, the run's batch flags, and the fraction of a batch at which that allocation would fit."""
    text = str(error)
    if not (isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text
            or "out of memory" in text.lower()):
        return None
    asked = re.search(r"allocate (\d+) bytes", text) or re.search(r"allocate ([\d.]+) GiB", text)
    tried = None if asked is None else float(asked.group(1)) * (1 if "bytes" in asked.group(0) else 2**30)
    free = free_memory()
    what = (f"an allocation of {tried / 2**30:.3g} GiB with {free / 2**30:.3g} GiB free" if tried and free else
            "an allocation failed")
    batches = [k for k in (PARSED[0].keys() if PARSED else [])
               if k.endswith("batch_size") or k in ("speed_batch", "eval_samples", "num_samples")]
    now = ", ".join(f"{flag(k)} {PARSED[0][k]}" for k in batches)
    fits = (f" (an allocation that grows with a batch B fits below B x {free / tried:.3g})"
            if tried and free and tried > free else "")
    return f"out of memory: {what}; " + (f"the run's batch sizes are {now}: pass a smaller one{fits}" if batches else
                                          f"pass a smaller batch size{fits}")


def free_memory() -> int | None:
    """Bytes of memory free now: the GPU's where one is in use, otherwise the machine's (None: unknown)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
