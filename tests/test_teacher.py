"""Teacher training (Alg. 1): quality on toy data, exact resume, atomic checkpoints, clear errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import ddim_sample
from plumbing import training
from plumbing.training import load_checkpoint, save_checkpoint
from plumbing.config import parse_config
from plumbing.data import gaussians8
from plumbing.errors import UserError
from plumbing.metrics import toy_metrics
from dmd import DMDConfig
from guided_distill import GuidedConfig
from progressive_distill import PDConfig
from train_teacher import TeacherConfig, evaluate_teacher, load_teacher, train_teacher

ROOT = Path(__file__).resolve().parent.parent


def tiny(tmp_path, **overrides):
    return TeacherConfig.from_preset("toy", out_dir=str(tmp_path), device="cpu", **overrides)


@pytest.mark.slow
def test_short_toy_teacher_reaches_quality(tmp_path):
    # 4000 iterations (the preset trains 20000): unconditional 64-step DDIM, null label.
    config = tiny(tmp_path, iterations=4000, eval_steps=[64], eval_samples=2000)
    train_teacher(config)
    metrics = evaluate_teacher(config, torch.device("cpu"))["ddim"]["64"]
    assert metrics["off_mode"] < 0.15, metrics  # measured 10.2% (the full preset: 3.7%)
    assert all(0.08 < share < 0.17 for share in metrics["mode_shares"]), metrics["mode_shares"]
    assert metrics["mmd"] < 0.04, metrics  # measured 0.019; an untrained net scores above 0.5
    assert (tmp_path / "teacher" / "samples_64.npz").is_file()
    assert (tmp_path / "teacher" / "samples.png").is_file() and (tmp_path / "teacher" / "loss.png").is_file()
    # the saved samples are the ones measured
    import numpy as np

    saved = np.load(tmp_path / "teacher" / "samples_64.npz")
    assert toy_metrics(saved["points"], gaussians8())["off_mode"] == metrics["off_mode"]
    assert (saved["labels"] == 8).all()


def _weights(path):
    state = load_checkpoint(path)
    return state["model"], state["ema"]["model"], state["step"]


def test_resumed_run_equals_uninterrupted(tmp_path):
    whole = tiny(tmp_path / "whole", iterations=60, ckpt_every=30, log_every=10)
    train_teacher(whole)
    part = tiny(tmp_path / "part", iterations=30, ckpt_every=30, log_every=10)
    train_teacher(part)
    torch.manual_seed(999)  # a resumed run must not depend on the process's RNG state
    train_teacher(part.replace(iterations=60), resume=True)
    (m1, e1, s1), (m2, e2, s2) = _weights(whole["teacher"]), _weights(part["teacher"])
    assert s1 == s2 == 60
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k
        assert torch.equal(e1[k], e2[k]), k
    log = (tmp_path / "part" / "teacher" / "log.jsonl").read_text().splitlines()
    assert len(log) == 6  # the resumed run appends to the log


def test_killed_run_resumes_without_repeating_log_lines(tmp_path, monkeypatch):
    from conftest import die_on_call, log_records

    import train_teacher as module

    whole = tiny(tmp_path / "whole", iterations=60, ckpt_every=20, log_every=5)
    train_teacher(whole)
    part = tiny(tmp_path / "part", iterations=60, ckpt_every=20, log_every=5)
    die_on_call(monkeypatch, module, "diffusion_loss", 47)  # after the checkpoint at 40 and the log line at 45
    with pytest.raises(KeyboardInterrupt):
        train_teacher(part)
    monkeypatch.undo()
    train_teacher(part, resume=True)
    assert log_records(tmp_path / "part" / "teacher") == log_records(tmp_path / "whole" / "teacher")


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(training.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_text_files_are_written_atomically_by_rank_0_alone(tmp_path, monkeypatch):
    from plumbing import distributed

    training.write_text(tmp_path / "a" / "results.md", "| table |\n")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["results.md"]  # no temporary file left behind
    assert (tmp_path / "a" / "results.md").read_text() == "| table |\n"
    monkeypatch.setattr(distributed, "is_main", lambda: False)  # another process under torchrun: it writes nothing
    training.write_text(tmp_path / "b.md", "x")
    training.write_json(tmp_path / "c.json", {})
    assert not (tmp_path / "b.md").exists() and not (tmp_path / "c.json").exists()


def test_load_teacher_errors(tmp_path):
    config = tiny(tmp_path, iterations=5, hidden=32)
    with pytest.raises(UserError, match="not found"):
        load_teacher(config, torch.device("cpu"), train_if_missing=False)
    train_teacher(config)
    teacher = load_teacher(config, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(UserError, match=r"hidden=32 \(now 64\)"):
        load_teacher(config.replace(hidden=64), torch.device("cpu"))
    with pytest.raises(UserError, match="holds an earlier run; pass --resume"):
        train_teacher(config)
    Path(config["teacher"]).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        load_teacher(config, torch.device("cpu"))


def test_missing_teacher_is_trained_first(tmp_path, capsys):
    config = tiny(tmp_path, iterations=20, eval_steps=[2], eval_samples=100)
    teacher = load_teacher(config, torch.device("cpu"))
    assert "missing: training it first" in capsys.readouterr().out
    x = ddim_sample(teacher, torch.randn(4, 2), 2, torch.full((4,), 8))
    assert x.shape == (4, 2) and (tmp_path / "teacher" / "metrics.json").is_file()


def test_cli_overrides_every_field():
    config, _ = parse_config(TeacherConfig, "t", ["--preset", "toy", "--batch-size", "7", "--eval-steps", "1", "3",
                                                  "--no-amp", "--lr", "0.5", "--data", "moons"])
    assert config["batch_size"] == 7 and config["eval_steps"] == [1, 3] and config["amp"] is False
    assert config["lr"] == 0.5 and config["num_classes"] == 2 and config["out_dir"] == os.path.join("runs", "toy")


@pytest.mark.parametrize("args,message", [
    (["--preset", "imagenet"], "unknown preset 'imagenet'"),
    (["--preset", "toy", "--net", "unet"], "does not fit --data gaussians8"),
    (["--preset", "toy", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--preset", "toy", "--label-dropout", "1.5"], "--label-dropout must be in [0, 1)"),
    (["--preset", "toy", "--data", "mnist"], "unknown data set 'mnist'"),
    (["--preset", "toy", "--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--preset", "toy", "--lr", "0"], "--lr must be above 0"),
    (["--preset", "fmnist", "--channels", "48"], "a layer of 144 channels does not split into GroupNorm's 32 groups"),
    (["--preset", "toy", "--device", "cuda:3"] if not torch.cuda.is_available() else ["--preset", "nope"],
     "use --device cpu" if not torch.cuda.is_available() else "unknown preset"),
])
def test_bad_cli_input_gives_one_line(args, message, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_teacher.py"), *args, "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_values_that_make_no_sense_are_one_line():
    from plumbing.networks import build_network

    with pytest.raises(UserError, match="--pd-lr must be a finite number, got inf"):
        PDConfig.from_preset("toy", pd_lr=float("inf"))
    with pytest.raises(UserError, match="--gen-lr must be above 0, got -0.001"):
        DMDConfig.from_preset("toy", gen_lr=-1e-3)
    with pytest.raises(UserError, match="--eval-ws must be a finite number, got nan"):
        GuidedConfig.from_preset("toy", eval_ws=[0.0, float("nan")])
    with pytest.raises(UserError, match="--channels 48 with --ch-mult 1 2 2: a layer of 144 channels"):
        build_network(TeacherConfig.from_preset("fmnist", channels=48))
    assert build_network(TeacherConfig.from_preset("fmnist", channels=96)) is not None  # a multiple of 32 splits


def test_help_lists_the_fields():
    result = subprocess.run([sys.executable, str(ROOT / "train_teacher.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--preset", "--resume", "--batch-size", "--label-dropout", "--ch-mult", "--no-hflip"):
        assert flag in result.stdout


def test_the_projection_is_told_once_after_the_warm_up():
    from plumbing.loop import Projection, duration

    projection = Projection(start=100, total=1100, warmup=3, seconds=1.0, updates=1000)
    told = [projection.update(step, 5.0 if step <= 103 else 0.25) for step in range(101, 120)]
    # updates 101-103 are the warm-up (slow: compilation); 104-107 take 1 s at 4 updates/s
    assert told[:6] == [None] * 6 and told[7:] == [None] * 12
    assert told[6].startswith("4 updates/s; the 993 updates left take about 4 min (training only)"), told[6]
    assert [duration(s) for s in (45, 720, 12_600, 259_200)] == ["45 s", "12 min", "3.5 h", "3.0 days"]
