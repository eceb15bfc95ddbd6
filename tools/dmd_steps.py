"""What each step of a K-step DMD generator contributes: the quality of its k-th x prediction.

DMD2's K-step generator predicts x at t_0 = 1, re-noises it to t_1, predicts again, ..., and its sample
is the last prediction. Every prediction is trained to look like data (backward simulation, dmd.py), so
each can be measured on its own: sample the first k steps on the shared evaluation noise, then take
the k-th step's prediction x_hat(z_{t_k}, t_k). The teacher's network in the same chain is G_0, the
generator before any update. Writes <run folder>/steps.json and prints one table.

    python tools/dmd_steps.py --preset fmnist16 --steps 4            # the run folder dmd2_4step
    python tools/dmd_steps.py --preset fmnist16 --steps 4 --recipe dmd --tag grid
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import plumbing.interrupt  # noqa: E402, F401  (first: Ctrl-C while torch loads is one line)

import torch  # noqa: E402

import dmd  # noqa: E402
from plumbing.config import NetworkConfig, sample_shape  # noqa: E402
from plumbing.data import load_images, toy_dataset  # noqa: E402
from plumbing.errors import require  # noqa: E402
from plumbing.folders import dmd_dir  # noqa: E402
from plumbing.metrics import evaluate_sampler, quality_key  # noqa: E402
from plumbing.networks import frozen_denoiser  # noqa: E402
from plumbing.training import (fingerprint, load_checkpoint, pick_device, run_cli, seeded_rng,  # noqa: E402
                               write_json)
from train_teacher import load_teacher  # noqa: E402


@torch.no_grad()
def prediction_at(generator, z: torch.Tensor, labels: torch.Tensor, steps: int, k: int) -> torch.Tensor:
    """The k-th step's x prediction (k = K - 1: the sample itself)."""
    z_k, t_k = dmd.generate(generator, z, labels, steps, first=k)
    return generator(z_k, torch.full((len(z),), t_k, device=z.device), labels)


@torch.no_grad()
def pixel_stats(x: torch.Tensor) -> dict:
    """The mean and standard deviation of the pixels (toy: of the coordinates): a step that is too dark or too
    flat shows here, and steps that drift apart in ways that cancel show as means on both sides of the data's."""
    return {"pixel_mean": x.mean().item(), "pixel_std": x.std().item()}


def measure(model, config: dmd.DMDConfig, folder: Path, device, name: str, n: int = 1000) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(config.eval_seed)
    z, labels = torch.randn(n, *sample_shape(config), generator=g), dmd.sample_labels(n, config, g)
    for k, t_k in enumerate(dmd.generator_times(config.steps)):
        result = evaluate_sampler(lambda z, c, n, k=k: prediction_at(model, z, c, config.steps, k), config,
                                  folder / f"{name}_step{k}", [config.steps], device,
                                  weights=f"{name} step {k} of {config.steps}:{fingerprint(model.state_dict())}")
        with seeded_rng(config.eval_seed, device):  # the fresh noise between steps
            x = prediction_at(model, z.to(device), labels.to(device), config.steps, k)
        rows.append({"k": k, "t_k": t_k, **result[config.steps], **pixel_stats(x)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="fmnist16")
    parser.add_argument("--steps", type=int, default=4, help="generator steps K of the run (default 4)")
    parser.add_argument("--recipe", default=None, help="the run's recipe (default: the preset's)")
    parser.add_argument("--tag", default="", help="the run's --tag")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    config = dmd.DMDConfig.from_preset(args.preset, steps=args.steps, tag=args.tag, device=args.device,
                                       **({"out_dir": args.out_dir} if args.out_dir else {}),
                                       **({"recipe": args.recipe} if args.recipe else {}))
    device, out = pick_device(args.device), dmd_dir(config)
    tagged = ("--tag", args.tag) if args.tag else ()
    require((out / "checkpoint.pt").exists(), f"no DMD run at {out}; make it with "
            f"`{config.command('dmd.py', '--steps', str(args.steps), '--recipe', config.recipe, *tagged)}`")
    state = load_checkpoint(out / "checkpoint.pt", "DMD checkpoint")
    config = config.replace(**{k: state["config"][k] for k in NetworkConfig.network_keys()})  # the run's network
    generator = frozen_denoiser(config, (state.get("ema") or {}).get("model") or state["generator"], device)
    teacher = load_teacher(config, device, train_if_missing=False)
    rows = {"G_0 (the teacher)": measure(teacher, config, out / "steps", device, "teacher"),
            f"generator after {state['step']} updates": measure(generator, config, out / "steps", device, "generator")}
    data = (load_images(config)[0][:1000].float() / 127.5 - 1 if config.net != "mlp"
            else toy_dataset(config.data).sample(1000, torch.Generator().manual_seed(config.eval_seed))[0])
    write_json(out / "steps.json", {**rows, "data": pixel_stats(data)})
    key = quality_key(rows["G_0 (the teacher)"][0])
    extra = "accuracy" if "accuracy" in rows["G_0 (the teacher)"][0] else "off_mode"
    print(f"{key} ({extra}) of each step's x prediction, {out}")
    print("| | " + " | ".join(f"step {r['k']} (t = {r['t_k']:g})" for r in rows["G_0 (the teacher)"]) + " |")
    print("|---|" + "---|" * config.steps)
    for name, rs in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[key]:.3g} ({r[extra]:.1%})" for r in rs) + " |")
    ref = pixel_stats(data)
    print(f"\npixel mean / std of each step's x prediction (1000 samples); the data's: {ref['pixel_mean']:.3f} / "
          f"{ref['pixel_std']:.3f}")
    for name, rs in rows.items():
        print(f"| {name} | " + " | ".join(f"{r['pixel_mean']:.3f} / {r['pixel_std']:.3f}" for r in rs) + " |")


if __name__ == "__main__":
    run_cli(main, interrupted="the measurements already made are kept (measurements.json in the run folder); rerun "
                              "the command and it measures only the rest")
