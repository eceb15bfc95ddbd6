"""DMD2's ablation (its Table 3) on one preset: five recipes from one teacher, one seed, one budget.

    DMD (regression)       the DMD paper's recipe, the preset's DMD values    (dmd.py --recipe dmd)
    no regression          the same without the regression loss
    no regression + TTUR   ... and five fake-score updates per generator update
    + GAN (DMD2)           ... and the GAN classifier on the fake score        (dmd.py --recipe dmd2)
    GAN alone              DMD2 without distribution matching (--dm-weight 0)

Each runs `dmd.train_dmd` in its own folder (the two recipes' own folders, dmd_<K>step and dmd2_<K>step,
are shared with dmd.py, so a finished run of either is re-used; an interrupted one resumes). The metric is
recorded every `--eval-every` updates on the shared evaluation noise; the final generator is measured
again on `--eval-seeds` evaluation seeds, whose spread says how large a difference has to be to be one.
Writes <out_dir>/dmd2_ablation.md, .json and .png.

    python tools/dmd2_ablation.py --preset fmnist16                 # about 70 minutes on 2 CPU cores
    python tools/dmd2_ablation.py --preset toy --dmd-iterations 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import plumbing.interrupt  # noqa: E402, F401  (first: Ctrl-C while torch loads is one line)

import dmd  # noqa: E402
from plumbing.errors import require  # noqa: E402
from plumbing.folders import dmd_dir, teacher_dir  # noqa: E402
from plumbing.metrics import evaluate_sampler, quality_key  # noqa: E402
from plumbing.networks import frozen_denoiser  # noqa: E402
from plumbing.training import (fingerprint, load_checkpoint, pick_device, read_json, run_cli, save_figure,  # noqa: E402
                               write_json, write_text)

VARIANTS = {  # name: (run folder tag, what it changes of the preset; "TTUR": DMD2's fake updates for the preset)
    "DMD (regression)": ("", dict(recipe="dmd")),
    "no regression": ("noreg", dict(recipe="dmd", reg_weight=0.0)),
    "no regression + TTUR": ("noreg_ttur", dict(recipe="dmd", reg_weight=0.0, fake_updates="TTUR")),
    "+ GAN (DMD2)": ("", dict(recipe="dmd2")),
    "GAN alone": ("ganonly", dict(recipe="dmd2", dm_weight=0.0)),
}


def run_variant(config: dmd.DMDConfig) -> dict:
    """metrics.json of a finished run with these settings, or train (resume) it."""
    out = dmd_dir(config)
    if (out / "metrics.json").exists():
        metrics = read_json(out / "metrics.json")
        saved = {**config.ADDED, **metrics["config"]}  # a field added since: what the run had in effect
        mismatch = [k for k in dmd.RUN_KEYS if saved.get(k) != config[k]]
        if not mismatch and metrics["final"]["step"] == config.dmd_iterations:
            print(f"re-using {out}")
            return metrics
        if mismatch:
            raise SystemExit(f"{out} holds a run with other settings ({', '.join(mismatch)}); move it away")
    return dmd.train_dmd(config, resume=(out / "checkpoint.pt").exists())


def seed_spread(config: dmd.DMDConfig, seeds: int, device) -> dict:
    """The final generator (its EMA) measured on `seeds` evaluation seeds: mean, standard deviation, values."""
    state = load_checkpoint(dmd_dir(config) / "checkpoint.pt", "DMD checkpoint")
    model = frozen_denoiser(config, (state.get("ema") or {}).get("model") or state["generator"], device)
    weights = f"generator {config.steps}:{fingerprint(model.state_dict())}"
    key, values = None, {}
    for s in range(seeds):
        c = config.replace(eval_seed=config.eval_seed + s)
        result = evaluate_sampler(lambda z, labels, n: dmd.generate(model, z, labels, n), c,
                                  dmd_dir(config) / f"seed_{c.eval_seed}", [config.steps], device,
                                  weights=weights)[config.steps]
        key = key or quality_key(result)
        for name in (key, "accuracy"):
            if name in result:
                values.setdefault(name, []).append(result[name])
    return {name: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
            for name, v in values.items()}


def table(rows: dict, teacher: dict, key: str, steps: int) -> str:
    points = sorted({h["step"] for r in rows.values() for h in r["history"]})
    head = ["recipe", *map(str, points), f"final, {len(next(iter(rows.values()))['spread'][key]['values'])} seeds",
            "accuracy", "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        at = {h["step"]: h.get(key) for h in r["history"]}
        s, acc = r["spread"][key], r["spread"].get("accuracy")
        cells = [f"{at[p]:.3g}" if at.get(p) is not None else "" for p in points]
        lines.append("| " + " | ".join([name, *cells, f"{s['mean']:.3f} +- {s['std']:.3f}",
                                        f"{acc['mean']:.1%}" if acc else "", f"{r['train_time_s'] / 60:.1f} min"])
                     + " |")
    ref = teacher.get("64", {}).get(key)
    note = f"\nThe teacher's 64-step DDIM: {key} {ref:.3f}.\n" if ref is not None else ""
    return f"{key} of the {steps}-step generator against generator updates\n\n" + "\n".join(lines) + "\n" + note


def plot(rows: dict, teacher: dict, key: str, png: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for name, r in rows.items():
        hist = [h for h in r["history"] if key in h]
        ax.plot([h["step"] for h in hist], [h[key] for h in hist], "o-", ms=3, label=name)
    if key in teacher.get("64", {}):
        ax.axhline(teacher["64"][key], ls="--", c="0.4", lw=1, label="teacher DDIM 64")
    ax.set_yscale("log")
    ax.set_xlabel("generator updates")
    ax.set_ylabel(key)
    ax.legend(fontsize=7)
    save_figure(fig, png)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="fmnist16")
    parser.add_argument("--steps", type=int, default=1, help="generator steps K (default 1)")
    parser.add_argument("--dmd-iterations", type=int, default=None, help="the budget (default: the preset's)")
    parser.add_argument("--eval-seeds", type=int, default=3, help="evaluation seeds of the final generators")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run only these recipes")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    require(args.eval_seeds >= 1, f"--eval-seeds must be at least 1 (3 or more give a spread), got {args.eval_seeds}")
    require(args.dmd_iterations is None or args.dmd_iterations >= 1, "--dmd-iterations must be at least 1")
    common = {"steps": args.steps, "device": args.device, **({"out_dir": args.out_dir} if args.out_dir else {}),
              **({"dmd_iterations": args.dmd_iterations} if args.dmd_iterations else {})}
    device, rows = pick_device(args.device), {}
    for name, (tag, changes) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        ttur = dmd.DMDConfig.from_preset(args.preset, recipe="dmd2").fake_updates
        changes = {k: ttur if v == "TTUR" else v for k, v in changes.items()}
        config = dmd.DMDConfig.from_preset(args.preset, **common, **changes, tag=tag)
        print(f"== {name}: {dmd_dir(config)}")
        metrics = run_variant(config)
        rows[name] = {"history": metrics["history"], "train_time_s": metrics["train_time_s"],
                      "spread": seed_spread(config, args.eval_seeds, device), "config": metrics["config"]}
    teacher = read_json(teacher_dir(config) / "metrics.json").get("ddim", {})
    key = quality_key(next(iter(rows.values()))["history"][-1])
    out = Path(config.out_dir)
    write_json(out / "dmd2_ablation.json", {"rows": rows, "teacher_ddim": teacher})
    text = table(rows, teacher, key, args.steps)
    write_text(out / "dmd2_ablation.md", text)
    plot(rows, teacher, key, out / "dmd2_ablation.png")
    print(text)


if __name__ == "__main__":
    run_cli(main, interrupted="rerun the command: finished runs are re-used, and the interrupted one resumes from "
                              "its last checkpoint")
