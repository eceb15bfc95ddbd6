"""Where each script writes, named from its config, so that a script and the reports that read another
script's results (DisBack's comparison with DMD, the teacher's metrics beside a student's) agree:

    <out_dir>/teacher.pt, teacher/     train_teacher.py      teacher_dir (beside --teacher's checkpoint)
    <out_dir>/teacher_<name>/          a diffusers teacher   teacher_dir (its caches: DMD's pairs)
    <out_dir>/pd/                      progressive_distill.py pd_dir
    <out_dir>/guided[_single_w<w>]/    guided_distill.py     guided_dir
    <out_dir>/dmd_<K>step[_<tag>]/     dmd.py --recipe dmd   dmd_dir
    <out_dir>/dmd2_<K>step[_<tag>]/    dmd.py --recipe dmd2  dmd_dir
    <out_dir>/disback[_dmd2]_<K>step[_<tag>]/ disback.py     disback_dir

<out_dir> is runs/<preset> unless --out-dir says otherwise (plumbing/config.py).

A run folder is held by one run at a time (`hold`): a second run into it is refused with one line.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from plumbing import distributed
from plumbing.errors import UserError, require
from plumbing.pretrained import is_pretrained, pretrained_name

_held: dict = {}  # the run folders this process holds: {folder: its open .lock file}


def teacher_dir(config: dict) -> Path:
    """Where the teacher's pictures, samples, log and metrics.json go: beside its checkpoint; for a diffusers
    teacher (--teacher diffusers:<name>), <out_dir>/teacher_<last part of the name>/."""
    if is_pretrained(config):
        return Path(config["out_dir"]) / f"teacher_{Path(pretrained_name(config)).name}"
    return Path(config["teacher"]).with_suffix("")


def cache_dir(config: dict) -> Path:
    """Where what is made from the teacher and re-used (regression pairs, timings) is cached: beside the run's own
    teacher, shared by the method scripts; for a teacher named with --teacher, in <out_dir>/teacher_<its name>/,
    since a named teacher and its folder are only read."""
    own = Path(config["teacher"]).resolve() == (Path(config["out_dir"]) / "teacher.pt").resolve()
    if own or is_pretrained(config):
        return teacher_dir(config)
    return Path(config["out_dir"]) / f"teacher_{Path(config['teacher']).stem}"


def pd_dir(config: dict) -> Path:
    return Path(config["out_dir"]) / "pd"


def guided_dir(config: dict) -> Path:
    single = config["single_w"]
    return Path(config["out_dir"]) / ("guided" if single is None else f"guided_single_w{single:g}")


def dmd_dir(config: dict) -> Path:
    return Path(config["out_dir"]) / (f"{config['recipe']}_{config['steps']}step" + tagged(config))


def disback_dir(config: dict) -> Path:
    recipe = "_dmd2" if config["recipe"] == "dmd2" else ""
    return Path(config["out_dir"]) / (f"disback{recipe}_{config['steps']}step" + tagged(config))


def tagged(config: dict) -> str:
    """The run folder's suffix for --tag: '' or '_<tag>'."""
    return f"_{config['tag']}" if config["tag"] else ""


def check_start(folder, started: bool, resume: bool | None, new_run: str = "--out-dir") -> None:
    """Before any work: a folder that holds an earlier run (`started`) is continued only with --resume (`resume`
    True, or None: either), and --resume needs one. `new_run`: how to start another run instead."""
    if (started and resume is False) or (not started and resume is True):
        owner = holder(folder)  # a run still under way: that is what to say, whatever it has written yet
        require(owner is None, f"{folder} is in use by another run ({owner}); wait for it to end, or pass another "
                "--out-dir")
    if started and resume is False:
        raise UserError(f"{folder} holds an earlier run; pass --resume to continue it, or {new_run} for a new run")
    if not started and resume is True:
        raise UserError(f"nothing to resume in {folder}; run the command without --resume to start")


def check_teacher_path(made: str | None, config: dict, path) -> None:
    """Before any teacher work: a run is continued from the --teacher it was made from (`made`, its checkpoint's),
    so that a resume without the flag neither trains a new default teacher nor refuses only after that."""
    now = config["teacher"]
    same = made is None or made == now or Path(made).expanduser().resolve() == Path(now).expanduser().resolve()
    require(same, f"{path} was made from --teacher {made}, not {now}; pass that --teacher to continue it, or "
            "another --out-dir")


def holder(folder) -> str | None:
    """Who holds the run folder (`hold`), if another process does; None if none (or this one) does."""
    folder = Path(folder)
    if folder.resolve() in _held or not (folder / ".lock").is_file():
        return None
    with open(folder / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: released when the file closes
        except BlockingIOError:
            lock.seek(0)
            return lock.read().strip() or "another process"
    return None


def hold(folder) -> None:
    """Hold a run folder until this process ends, or refuse with one line if another process holds it. The lock
    is the kernel's (flock on <folder>/.lock), so a killed run leaves nothing held. A process may hold a folder
    again (a resumed loop, a second stage); under torchrun rank 0 holds it for every rank."""
    folder = Path(folder)
    if folder.resolve() in _held or not distributed.is_main():
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "a+")
    except OSError as e:
        raise UserError(f"cannot write in {folder} ({e.strerror}); pass an --out-dir you can write to") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise UserError(f"{folder} is in use by another run ({owner}); wait for it to end, "
                        "or pass another --out-dir") from None
    lock.truncate(0)
    lock.write(f"process {os.getpid()}\n")
    lock.flush()
    _held[folder.resolve()] = lock
