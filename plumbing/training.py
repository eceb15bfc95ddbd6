"""Training plumbing shared by every script: the command line's one-line errors, device choice, seeds
and RNG state, EMA, atomic checkpoints, autocast, progress bars, logs and pictures.

Nothing here is diffusion math (that is `common.py`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import pickle
import random
import shlex
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from plumbing import distributed, interrupt
from plumbing.config import flag_words, out_of_memory
from plumbing.errors import UserError


def run_cli(main, interrupted: str | None = None) -> None:
    """Run `main()`; turn a `UserError` into a one-line `error: ...` and exit status 2, and Ctrl-C into one line
    (`interrupted`: what it says for a script without --resume). Under torchrun,
    join the process group first (plumbing/distributed.py). Ctrl-C is Python's KeyboardInterrupt again from here
    (plumbing/interrupt.py)."""
    interrupt.started()
    try:
        distributed.setup()
        if not distributed.is_main():  # one voice: rank 0 prints, the others only their errors
            sys.stdout = open(os.devnull, "w")
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if (line := out_of_memory(e)) is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:  # a Loop stopped by Ctrl-C says what it saved; otherwise it stopped mid-update
        print(f"interrupted: {e}" if str(e) else f"interrupted: {interrupted}" if interrupted else "interrupted: rerun "
              "the command with --resume to continue from the run's last checkpoint (one is written every "
              "--ckpt-every updates or --ckpt-seconds), or without --resume if it had none yet", file=sys.stderr)
        raise SystemExit(130) from None


# ----------------------------------------------------------------------------------------
# EMA, device, seeds, atomic checkpoints
# ----------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's weights, with the usual warm-up:
    decay_k = min(decay, (1 + k) / (10 + k)), so short runs are not dominated by init."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.steps = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.model.load_state_dict(state["model"])


def pick_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu (or the one asked for, if this machine has it)."""
    if name != "auto":
        device = torch.device(name)  # a name torch does not know is refused when the config is made
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but CUDA is not available; use --device cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device {name} asked for, but MPS is not available; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()) if distributed.active() else torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed every RNG; under torchrun each rank its own stream (its own noise; the data streams and
    the evaluation have their own seeded generators, and the networks start from rank 0's weights)."""
    seed += 1_000_003 * distributed.rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain types, so that checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "python": list(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state: dict) -> None:
    """Write atomically: to a temporary file in the same folder, fsync, then rename; with the checksum of
    its tensors, which `load_checkpoint` verifies, and the permissions the umask gives any new file.

    A run killed mid-write leaves the previous checkpoint intact.
    """
    if not distributed.is_main():  # under torchrun rank 0 writes; the others wait until it has
        distributed.barrier()
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.as_dict() if hasattr(v, "as_dict") else v for k, v in state.items()}  # configs as plain dicts
    state["checksum"] = checksum(state)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # as open() would have made it: shared runs/ stay readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    distributed.barrier()


def load_checkpoint(path, what: str = "checkpoint") -> dict:
    """Load a checkpoint onto the CPU, or fail with one clear line.

    `weights_only=True`: only tensors and plain types are unpickled, so a checkpoint from someone
    else cannot run code on this machine; every checkpoint written here holds nothing else.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found at {path}")
    if (entry := damaged_entry(path)) is not None:  # a torch.save file is a zip: each entry has a CRC-32 (pickle too)
        raise UserError(f"{what} at {path} is damaged: its {entry} no longer matches the CRC "
                        "written with it; copy it again, or delete it and rerun to make it anew")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # never advise deleting a file this project did not write
        with open(path, "rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"  # how every torch.save file begins
        if zip_start and not zipfile.is_zipfile(path):
            raise UserError(f"{what} at {path} is cut short or damaged (it begins as a torch.save file but its end "
                            "is missing: a copy that did not finish?); copy it again, or delete it and rerun to make "
                            "it anew") from None
        if not zipfile.is_zipfile(path):  # save_checkpoint writes whole torch.save files (atomically) or none
            raise UserError(f"{what} at {path} cannot be read: it is not in torch.save's format, so not a "
                            "checkpoint this project wrote; check the path") from None
        if isinstance(e, pickle.UnpicklingError):  # weights_only refused an object: code, or an older format
            raise UserError(f"{what} at {path} holds objects other than tensors and plain values (it could run "
                            "code when loaded), so it was not loaded; use a checkpoint you trust made by this "
                            "version (one an older version of this project wrote is made anew once deleted)") from None
        raise UserError(f"{what} at {path} cannot be read ({type(e).__name__}): a damaged or foreign torch file; "
                        "if this project wrote it, delete it and rerun, otherwise check the path") from None
    if isinstance(state, dict) and "checksum" in state and state.pop("checksum") != checksum(state):
        raise UserError(f"{what} at {path} is damaged: its tensors no longer match the checksum written with "
                        "them; copy it again, or delete it and rerun to make it anew")
    return state


def damaged_entry(path: Path) -> str | None:
    """The name of the first entry of a zip file whose bytes fail their CRC-32 (None: sound, or not a zip)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError):
        return None  # not a whole zip: torch.load's own error follows
    except zlib.error:
        return "compressed data"


def current_umask() -> int:
    mask = os.umask(0)  # (reading the umask means setting it)
    os.umask(mask)
    return mask


def checksum(state) -> str:
    """The `fingerprint` of every tensor in a checkpoint (nested dicts and lists, a key "checksum" left out)."""
    def tensors(obj, name=""):
        if isinstance(obj, torch.Tensor):
            yield name, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                if k != "checksum":
                    yield from tensors(v, f"{name}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from tensors(v, f"{name}/{i}")

    return fingerprint(dict(tensors(state)))


def fingerprint(state_dict: dict) -> str:
    """A short hash of a model's weights: ties a cache or a recorded path to the very teacher it came from
    (the step count alone does not: a retrained teacher has the same one)."""
    h = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_compatible(saved: dict, config: dict, keys, what: str, path) -> None:
    """Fail with one line if a checkpoint was made with a different data set or network. A field the config
    class added after the checkpoint was written compares as the value such checkpoints had in effect
    (`Config.ADDED`)."""
    saved = {**getattr(config, "ADDED", {}), **saved}
    diff = [k for k in keys if saved.get(k) != config.get(k)]
    if diff:
        detail = ", ".join(f"{k}={saved.get(k)!r} (now {config.get(k)!r})" for k in diff)
        shown = [k for k in diff if k != "preset" and saved.get(k) is not None]
        flags = shlex.join(w for k in shown for w in flag_words(k, saved[k]))
        raise UserError(f"{what} at {path} does not match this run: {detail}; pass the values it was made with"
                        + (f" ({flags})" if flags else "") + ", or another --out-dir for a new run")


def check_same_teacher(saved: str | None, teacher, what: str, path) -> None:
    """Fail with one line if a checkpoint or recorded path was made from another teacher than this
    run's (compared by `fingerprint` of the weights)."""
    if saved != teacher.fingerprint:
        raise UserError(f"{what} at {path} was made from another teacher than {teacher.checkpoint} "
                        f"(weights {saved} vs {teacher.fingerprint}); delete it, or pass --tag or --out-dir "
                        "for a new run")


def cached(path, key: dict, make, what: str) -> dict:
    """The dict saved at `path` if it was made with this very `key` (plain values: settings, a teacher's
    fingerprint), otherwise `make()`, saved there with its key. A stale file is made anew, never reused."""
    path = Path(path)
    distributed.barrier()  # under torchrun every rank looks at the same file ...
    saved = load_checkpoint(path, what) if path.exists() else {}
    distributed.barrier()  # ... and none writes it before all have looked, so that all take the same branch
    if saved.get("key") == key:
        return saved
    made = {**make(), "key": key}
    save_checkpoint(path, made)
    return made


def read_json(path) -> dict:
    """A JSON file written by `write_json`, or {} when there is none."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def write_json(path, obj) -> None:
    """Atomically; under torchrun by rank 0, the others waiting until it has."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_text(path, text: str) -> None:
    """A text file written atomically; under torchrun by rank 0, the others waiting until it has."""
    if not distributed.is_main():
        distributed.barrier()
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    distributed.barrier()


# ----------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------


def save_figure(fig, path) -> None:
    """A matplotlib figure to a PNG (under torchrun by rank 0 alone)."""
    if distributed.is_main():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)


def save_image_grid(images: torch.Tensor, path, nrow: int = 8) -> None:
    """Images in [-1, 1], (B, C, H, W) -> one PNG grid (torchvision.utils; under torchrun by rank 0)."""
    from torchvision.utils import save_image

    if not distributed.is_main():
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(images.detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5, path, nrow=nrow)


def save_scatter(panels: dict, path, reference: np.ndarray | None = None, lim: float = 1.6,
                 ncols: int | None = None) -> None:
    """Toy samples: one scatter panel per entry {title: (N, 2) points}, data in grey behind;
    one row, or rows of `ncols` panels."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    n = len(panels)
    ncols = ncols or n
    nrows = -(-n // ncols)
    fig = Figure(figsize=(3 * ncols, 3.1 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    for ax, (title, pts) in zip(axes.flat, panels.items()):
        pts = np.asarray(pts)
        if reference is not None:
            ax.scatter(reference[:, 0], reference[:, 1], s=1, c="0.8")
        ax.scatter(pts[:, 0], pts[:, 1], s=1, c="C0")
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------
# Loops: progress, autocast, logs
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def samples_per_second(fn, n: int, device, repeats: int = 1) -> float:
    """n / seconds of one call of fn, after a warm-up call, synchronised on CUDA; best of `repeats`."""
    device = torch.device(device)
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return n / best


@contextlib.contextmanager
def seeded_rng(seed: int, device):
    """Seed the global RNG for a block and give the caller's state back afterwards: for samplers
    that draw their own noise (DMD2's multi-step generator), so a measurement does not depend on
    what ran before it and does not disturb a training run's random stream."""
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        torch.manual_seed(seed)
        yield


def progress(iterable, desc: str, **kwargs):
    """A tqdm bar (quiet with TQDM_DISABLE set, or when stderr is not a terminal and CI is set)."""
    quiet = bool(os.environ.get("TQDM_DISABLE")) or (bool(os.environ.get("CI")) and not sys.stderr.isatty())
    quiet = quiet or not distributed.is_main()  # under torchrun: rank 0's bars only
    return tqdm(iterable, desc=desc, dynamic_ncols=True, mininterval=1.0, disable=quiet, **kwargs)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, model: nn.Module, clip: float) -> torch.Tensor:
    """zero_grad, backward, clip the global gradient norm, step; returns the norm before clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    distributed.average_gradients(model)  # under torchrun: the mean over ranks, as DDP's reducer makes it
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return grad_norm


def autocast(config: dict, device: torch.device):
    """bf16 autocast on CUDA when `amp` is on; a no-op elsewhere. Schedule math stays fp32
    because `common` casts network outputs back with `.float()` before using them."""
    enabled = bool(config.get("amp")) and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def prepare_network(model: nn.Module, config: dict, device: torch.device, compile: bool = True) -> None:
    """channels_last for UNets on CUDA and the CPU (on 2 CPU cores the fmnist16 teacher's update takes
    0.28 s instead of 0.31), and torch.compile of the network's forward when asked (compiling `forward`
    in place keeps the state_dict's keys, so checkpoints stay portable). Pass compile=False for a model
    that will be deep-copied (a teacher that seeds students)."""
    device = torch.device(device)
    if device.type in ("cuda", "cpu") and config["net"] == "unet":
        model.to(memory_format=torch.channels_last)
    if compile and config.get("compile"):
        if device.type != "cuda":
            raise UserError("--compile is meant for CUDA; drop it on this device")
        model.net.forward = torch.compile(model.net.forward)


class LogWriter:
    """Appends one JSON record per log line to log.jsonl and draws the curves at the end.
    Under torchrun rank 0 alone keeps the log; on the other ranks it is silent and empty."""

    def __init__(self, path, resume: bool = False):
        self.path, self.silent = Path(path), not distributed.is_main()
        if self.silent:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume or not self.path.exists():
            self.path.write_text("")

    def write(self, record: dict) -> None:
        if self.silent:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if self.silent:
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def restore(self, records: list[dict] | None) -> None:
        """Put the log back as it was at a checkpoint (the `records()` saved in it), so that a
        resumed run does not repeat the lines written between that checkpoint and the interruption."""
        if records is None or self.silent:  # (None: a checkpoint from before logs were saved in them)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(self.path)

    def plot(self, png, title: str) -> None:
        """Every numeric series against `step`, log scale."""
        from matplotlib.figure import Figure

        records = self.records()
        if not records:
            return
        keys = [k for k in records[-1] if k not in ("step", "grad_norm") and isinstance(records[-1][k], float)]
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if k in r]
            ax.plot(*zip(*pts), label=k, lw=1.8 if k == "loss" else 1.0)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, png)
