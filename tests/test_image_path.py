"""The image path end to end: every script's command on real Fashion-MNIST (Debian's package;
generated images where it is missing) with a tiny UNet and a few updates. Each test checks the
files the script promises and that every number it writes is finite; the teacher, the feature
classifier and the reference statistics are made once and shared by the tests of this file."""

import math
from pathlib import Path

import pytest

import disback
import dmd
import evaluate
import guided_distill
import progressive_distill
import train_teacher
from conftest import assert_finite, fashion_mnist_args

pytest.importorskip("torchmetrics")
pytestmark = pytest.mark.slow

TINY = ["--preset", "fmnist16", "--device", "cpu", "--channels", "16", "--ch-mult", "1", "2", "--num-res-blocks", "1",
        "--attn-res", "8", "--eval-samples", "40", "--eval-share", "0", "--classifier-steps", "30",
        "--log-every", "2", "--ckpt-every", "2", "--eval-steps", "1", "4", "--no-amp"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The shared run folder with its tiny teacher, trained by the command (8 updates of batch 8)."""
    folder = tmp_path_factory.mktemp("fmnist")
    data = fashion_mnist_args(folder)
    args = [*TINY, *data, "--out-dir", str(folder), "--iterations", "8", "--batch-size", "8"]
    train_teacher.main([*args, "--sample-every", "4"])
    return folder, args


def test_teacher_measures_fd_per_ddim_step_count(run):
    folder, _ = run
    metrics = assert_finite(folder / "teacher" / "metrics.json")
    for steps in ("1", "4"):
        assert metrics["ddim"][steps]["fd_classifier"] > 0 and 0 <= metrics["ddim"][steps]["accuracy"] <= 1
        assert metrics["ddim"][steps]["n"] == 40
        assert (folder / "teacher" / f"samples_{steps}.png").is_file()
    assert 0 < metrics["classifier"]["test_accuracy"] <= 1  # the metric's own quality is reported
    assert [h["step"] for h in metrics["history"]] == [4] and "fd_classifier" in metrics["history"][0]  # (no 64)
    assert metrics["eval_time_s"] > 0 and (folder / "teacher" / "loss.png").is_file()
    assert (folder / "feature_classifier.pt").is_file() and (folder / "reference_classifier.pt").is_file()


def test_progressive_distillation_measures_each_round(run, capsys):
    folder, args = run
    progressive_distill.main([*args, "--start-steps", "4", "--to-steps", "1", "--round-iterations", "2",
                              "--pd-batch-size", "4"])
    metrics = assert_finite(folder / "pd" / "metrics.json")
    assert set(metrics["students"]) == {"2", "1"}
    assert all("fd_classifier" in s and "eval_time_s" in s for s in metrics["students"].values())
    assert "teacher DDIM fd_classifier at 1:" in capsys.readouterr().out  # beside the teacher's value
    for name in ("student_1.pt", "student_2.pt", "student_1/samples_1.png", "quality_vs_steps.png", "loss.png"):
        assert (folder / "pd" / name).is_file(), name


def test_guided_distillation_measures_the_last_round_at_each_w(run):
    folder, args = run
    guided_distill.main([*args, "--start-steps", "4", "--to-steps", "1", "--round-iterations", "2",
                         "--stage1-iterations", "2", "--pd-batch-size", "4", "--eval-ws", "0", "2"])
    metrics = assert_finite(folder / "guided" / "metrics.json")
    for w in ("0", "2"):
        assert "fd_classifier" in metrics["students"]["1"]["ddim"][w]
        assert "fd_classifier" in metrics["teacher"][w]["1"]
        assert (folder / "guided" / "student_1" / f"w{w}_stochastic.png").is_file()
        # stage one and the rounds before the last get pictures, not 4 measurements each
        assert metrics["stage1"]["ddim"][w] == {} and metrics["students"]["2"]["ddim"][w] == {}
        assert (folder / "guided" / "student_2" / f"w{w}_ddim.png").is_file()
    assert metrics["eval_time_s"] > 0
    assert (folder / "guided" / "quality_vs_steps.png").is_file()


@pytest.mark.parametrize("script", [dmd, disback])
def test_dmd_and_disback_record_fd_while_training(run, script):
    folder, args = run
    extra = ["--snapshots", "2", "--record-iterations", "2", "--interval", "2"] if script is disback else []
    script.main([*args, "--steps", "1", "--dmd-iterations", "4", "--eval-every", "2", "--dmd-batch-size", "4",
                 "--fake-updates", "1", "--reg-loss", "pseudo-huber", "--reg-pairs", "8", "--reg-steps", "2",
                 *extra])
    out = folder / ("disback_dmd2_1step" if script is disback else "dmd2_1step")  # fmnist16's default: DMD2
    metrics = assert_finite(out / "metrics.json")
    assert [h["step"] for h in metrics["history"]] == [0, 2, 4]
    assert all("fd_classifier" in h for h in metrics["history"])
    assert metrics["eval_time_s"] > 0 and metrics["train_time_s"] > 0
    assert (out / "convergence.png").is_file() and (out / "eval_0000004" / "samples_1.png").is_file()
    assert (out / "eval_0000004" / "dm_view.png").is_file()


def test_evaluate_tables_every_student(run):
    folder, args = run
    evaluate.main([*args, "--num-samples", "40", "--speed-batch", "4", "--teacher-steps", "1", "4"])
    table = (folder / "results.md").read_text()
    assert "| teacher DDIM | 4 | 4 |" in table and "| PD | 1 | 1 |" in table and "| DMD2 | 1 | 1 |" in table
    assert "| DisBack (DMD2) | 1 | 1 |" in table
    rows = [line.split("|")[4:8] for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    cells = [cell.strip().rstrip("%") for row in rows for cell in row if cell.strip()]
    # teacher 1 and 4, PD 2 and 1, guided 2 and 1, DMD2 1, DisBack (DMD2) 1
    assert len(rows) == 8 and all(math.isfinite(float(cell)) for cell in cells)
    assert (folder / "quality_vs_steps.png").is_file() and (folder / "side_by_side.png").is_file()


def test_a_measurement_is_reused_only_for_the_same_weights_steps_and_count(run):
    # evaluate.py re-uses the scripts' own image measurements through measurements.json: a stored result
    # comes back for the same weights string, steps and sample count, and nothing else matches it.
    import torch

    from plumbing.config import sample_shape
    from plumbing.metrics import evaluate_sampler
    from train_teacher import TeacherConfig

    folder, args = run
    config = TeacherConfig.from_preset("fmnist16", out_dir=str(folder), device="cpu", channels=16, ch_mult=[1, 2],
                                       num_res_blocks=1, attn_res=[8], eval_samples=200, classifier_steps=30,
                                       data_dir=args[args.index("--data-dir") + 1] if "--data-dir" in args else None)
    drawn = []

    def sample(z, labels, steps):  # a sampler whose images depend on a scale we change below
        drawn.append(len(z))
        return (scale * torch.linspace(-1, 1, z[0].numel())).reshape(1, *sample_shape(config)).expand(len(z), -1,
                                                                                                       -1, -1)

    scale = 1.0
    first = evaluate_sampler(sample, config, folder / "reuse", [2], "cpu", weights="test:a")[2]
    assert sum(drawn) == 200
    scale = 0.5  # other images under the same name: the stored number comes back, only the picture is drawn
    drawn.clear()
    assert evaluate_sampler(sample, config, folder / "reuse", [2], "cpu", weights="test:a")[2] == first
    assert sum(drawn) == 80  # picture_count: 8 rows of the 10 classes
    for changed in (dict(weights="test:b"), dict(steps=[4]), dict(config=config.replace(eval_samples=100))):
        drawn.clear()
        call = {"weights": "test:a", "steps": [2], "config": config, **changed}
        again = evaluate_sampler(sample, call["config"], folder / "reuse", call["steps"], "cpu",
                                 weights=call["weights"])
        assert sum(drawn) == call["config"].eval_samples and next(iter(again.values())) != first, changed


@pytest.mark.parametrize("size", [16, 32])
def test_teacher_and_a_student_at_any_image_size(tmp_path, size):
    # The sample shape follows --image-size everywhere, and attention sits where --attn-res says, counted
    # from the real input: at 16x16 and 32x32 alike, the one attention level below the top is size / 2.
    import torch

    from common import Attention
    from plumbing.networks import build_network

    data = fashion_mnist_args(tmp_path)
    args = [*TINY, *data, "--image-size", str(size), "--attn-res", str(size // 2), "--out-dir", str(tmp_path / "run"),
            "--iterations", "2", "--batch-size", "4", "--eval-steps", "2", "--eval-samples", "20",
            "--classifier-steps", "5"]
    train_teacher.main(args)
    progressive_distill.main([*args, "--start-steps", "2", "--to-steps", "1", "--round-iterations", "1",
                              "--pd-batch-size", "4"])
    state = torch.load(tmp_path / "run" / "pd" / "student_1.pt", weights_only=True)
    net = build_network(state["config"])
    seen = []
    for module in net.modules():
        if isinstance(module, Attention):
            module.register_forward_hook(lambda m, inputs, out: seen.append(tuple(out.shape[-2:])))
    x = net(torch.zeros(2, 1, size, size), torch.rand(2), torch.zeros(2, dtype=torch.long))
    assert x.shape == (2, 1, size, size) and seen == [(size // 2, size // 2)] * 4  # down, middle, two up
    with pytest.raises(ValueError, match="--image-size"):
        net(torch.zeros(2, 1, 2 * size, 2 * size), torch.rand(2), torch.zeros(2, dtype=torch.long))
    from PIL import Image

    run = tmp_path / "run"
    for png in (run / "teacher" / "samples_2.png", run / "pd" / "student_1" / "samples_1.png"):
        assert Image.open(png).size == (10 * (size + 2) + 2, 2 * (size + 2) + 2)  # 20 samples, one column per class
    metrics = assert_finite(tmp_path / "run" / "pd" / "metrics.json")
    assert metrics["students"]["1"]["n"] == 20 and "fd_classifier" in metrics["students"]["1"]


def test_the_gpu_check_runs_with_tiny_settings(tmp_path):
    # The check meant for a GPU, with tiny networks on the CPU: both parts, the report and the pictures.
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import gpu_check

    data = fashion_mnist_args(tmp_path)
    gpu_check.main(["--tiny", "--device", "cpu", "--docs", str(tmp_path / "docs"), "--out-dir", str(tmp_path / "run"),
                    *data])
    result = assert_finite(tmp_path / "docs" / "results-gpu.json")
    assert [row["update"] for row in result["speed"]] == ["teacher step"] * 3 + [
        "PD update", "guided stage-one update", "DMD update (3 networks)"]
    skipped = [(row["update"], row["precision"]) for row in result["speed"] if "skipped" in row]
    assert skipped == [("teacher step", "bf16 + compile")], skipped  # on a CPU only torch.compile's row
    assert all(row["updates_per_s"] > 0 for row in result["speed"] if "skipped" not in row)
    assert set(result["pipeline"]["parts"]) == {"teacher", "progressive distillation", "DMD, 1 step", "evaluate.py"}
    assert set(result["pipeline"]["pd"]["students"]) == {"16", "8", "4"}
    report = (tmp_path / "docs" / "results-gpu.md").read_text()
    assert "## Training speed of the cifar10 network" in report and "| PD student | 4 |" in report
    assert "python tools/gpu_check.py --tiny" in report
    assert {"teacher_ddim_4.png", "pd_4.png", "dmd_1.png"} <= set(result["pipeline"]["pictures"])
