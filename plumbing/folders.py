"""Where each script writes, named from its config, so that a script and the reports that read another
script's results (DisBack's comparison with DMD, the teacher's metrics beside a student's) agree:

    <out_dir>/teacher.pt, teacher/     train_teacher.py      teacher_dir (beside --teacher's checkpoint)
    <out_dir>/teacher_<name>/          a diffusers teacher   teacher_dir (its caches: DMD's pairs, speeds)
    <out_dir>/pd/                      progressive_distill.py pd_dir
    <out_dir>/guided[_single_w<w>]/    guided_distill.py     guided_dir
    <out_dir>/dmd_<K>step[_<tag>]/     dmd.py --recipe dmd   dmd_dir
    <out_dir>/dmd2_<K>step[_<tag>]/    dmd.py --recipe dmd2  dmd_dir
    <out_dir>/disback[_dmd2]_<K>step[_<tag>]/ disback.py     disback_dir

<out_dir> is runs/<preset> unless --out-dir says otherwise (plumbing/config.py).
"""

from __future__ import annotations

from pathlib import Path

from plumbing.pretrained import is_pretrained, pretrained_name


def teacher_dir(config: dict) -> Path:
    """Where the teacher's pictures, samples, log and metrics.json go: beside its checkpoint; for a diffusers
    teacher (--teacher diffusers:<name>), <out_dir>/teacher_<last part of the name>/."""
    if is_pretrained(config):
        return Path(config["out_dir"]) / f"teacher_{Path(pretrained_name(config)).name}"
    return Path(config["teacher"]).with_suffix("")


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
