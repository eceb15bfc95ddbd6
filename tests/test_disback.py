"""DisBack: the recorded path, the backtracking schedule, N = 0 being DMD exactly, and a short
run of both stages, each resumed after a kill."""

import re

import pytest
import torch
from conftest import die_on_call, with_teacher

import disback
import dmd
from plumbing.errors import UserError
from plumbing.folders import disback_dir, dmd_dir
from plumbing.reports import compare_with_dmd
from plumbing.training import write_json
from train_teacher import load_teacher


def disback_config(folder, teacher_folder, **overrides):
    folder = with_teacher(folder, teacher_folder)
    return disback.DisBackConfig.from_preset("toy", **{
        "out_dir": str(folder), "device": "cpu", "iterations": 1500, "eval_samples": 500,
        "eval_steps": [1, 2, 4, 8, 256], "log_every": 5, "ckpt_every": 10, "dmd_iterations": 20, "eval_every": 10,
        "fake_updates": 2, "reg_pairs": 512, "reg_steps": 16, "snapshots": 4, "record_iterations": 120,
        "record_lr": 1e-4, "interval": 4, **overrides})


def test_schedule_starts_at_the_last_but_one_snapshot_and_ends_on_the_teacher():
    n, interval = 5, 3
    indices = [disback.snapshot_index(step, n, interval) for step in range(40)]
    assert indices[:interval] == [n - 1] * interval  # s'_{N-1} first (the fake score starts from s'_N)
    assert indices == sorted(indices, reverse=True) and min(indices) == 0  # walks back, never past the teacher
    assert indices.index(0) == (n - 1) * interval and set(indices[(n - 1) * interval:]) == {0}
    assert all(disback.snapshot_index(step, 0, interval) == 0 for step in range(10))  # no path: the teacher


def test_recorded_path_starts_at_the_teacher_and_fits_the_initial_generator(tmp_path, toy_teacher):
    config = disback_config(tmp_path, toy_teacher)
    teacher = load_teacher(config, torch.device("cpu"), train_if_missing=False)
    paths = disback.record_degradation(teacher, config, "cpu", tmp_path / "snapshots")
    assert [p.name for p in paths] == ["snapshot_01.pt", "snapshot_02.pt", "snapshot_03.pt", "snapshot_04.pt"]
    path = disback.BacktrackingPath(teacher, paths, interval=10)
    assert path(10**6) is teacher  # s'_0 is the teacher itself, exactly
    # the snapshots' denoising loss on G_0's samples (the same noise and times for each) falls along the path
    state = torch.get_rng_state()
    report = disback.path_losses(teacher, paths, config, "cpu")
    assert torch.equal(torch.get_rng_state(), state)  # the run's random stream is left as it was
    assert report == disback.path_losses(teacher, paths, config, "cpu")  # fixed noise: the same numbers again
    losses = report["losses"]
    assert len(losses) == len(paths) + 1 and all(a > b for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.2 * losses[0], losses  # s'_N has learned G_0's distribution
    assert report["fall_before_first"] == pytest.approx((losses[0] - losses[1]) / (losses[0] - losses[-1]))
    # a path recorded with other settings is refused, not silently reused
    with pytest.raises(UserError, match="recorded with other settings .*record_lr=0.0001"):
        disback.record_degradation(teacher, config.replace(record_lr=1e-5), "cpu", tmp_path / "snapshots")


def test_no_snapshots_is_dmd_exactly(tmp_path, toy_teacher):
    config = disback_config(tmp_path, toy_teacher, snapshots=0)
    a = disback.train_disback(config)
    b = dmd.train_dmd(config)
    ga = torch.load(disback_dir(config) / "checkpoint.pt", weights_only=False)["generator"]
    gb = torch.load(dmd_dir(config) / "checkpoint.pt", weights_only=False)["generator"]
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    assert a["final"]["mmd"] == b["final"]["mmd"]
    # DisBack ran before DMD: no DMD run to compare with, and it says so and where it looked
    assert not a["comparison"]["compared"] and a["comparison"]["dmd_run"] == str(dmd_dir(config))
    assert "no finished DMD run in" in a["comparison"]["why"]
    # with the DMD run present, the comparison is filled in (both identical: both reach the target together)
    again = disback.train_disback(config, resume=True)["comparison"]
    assert again["compared"] and again["dmd_run"] == str(dmd_dir(config))
    assert again["updates_to_target"]["DMD"] == again["updates_to_target"]["DisBack"] is not None
    assert again["final"]["DMD"] == again["final"]["DisBack"] == b["final"][again["metric"]]


def test_both_stages_resume_exactly(tmp_path, toy_teacher, monkeypatch):
    whole = disback_config(tmp_path / "whole", toy_teacher)
    metrics = disback.train_disback(whole)
    out = disback_dir(whole)
    assert metrics["teacher_reached_at"] == 3 * 4 and (out / "snapshots" / "record_losses.json").is_file()
    assert not (out / "snapshots" / "record_progress.pt").exists()

    part = disback_config(tmp_path / "part", toy_teacher)
    die_on_call(monkeypatch, disback, "fake_score_loss", 75)  # stage 1, after snapshot 2 (update 60)
    with pytest.raises(KeyboardInterrupt):
        disback.train_disback(part)
    monkeypatch.undo()
    assert len(list((disback_dir(part) / "snapshots").glob("snapshot_*.pt"))) == 2
    with pytest.raises(UserError, match="pass --resume"):
        disback.train_disback(part)
    die_on_call(monkeypatch, dmd, "dmd_generator_loss", 15)  # stage 2, after the checkpoint at 10
    with pytest.raises(KeyboardInterrupt):
        disback.train_disback(part, resume=True)
    monkeypatch.undo()
    torch.manual_seed(5)
    resumed = disback.train_disback(part, resume=True)
    for name in ["snapshots/snapshot_02.pt", "snapshots/snapshot_04.pt", "checkpoint.pt"]:
        a = torch.load(out / name, weights_only=False)
        b = torch.load(disback_dir(part) / name, weights_only=False)
        for key in ("model",) if "snapshot" in name else ("generator", "fake_score"):
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), (name, key)
    assert resumed["final"]["mmd"] == metrics["final"]["mmd"]


def test_disback_is_compared_only_with_a_dmd_run_of_the_same_settings(tmp_path):
    # compare_with_dmd on written metrics: DMD's run with another seed, budget, learning rate, evaluation cadence,
    # tag or teacher is not compared, and the reason says which; the same settings are compared.
    config = disback.DisBackConfig.from_preset("toy", out_dir=str(tmp_path), dmd_iterations=20, eval_every=10,
                                                interval=1)
    history = [{"step": 0, "off_mode": 1.0, "mmd": 0.5}, {"step": 10, "off_mode": 0.4, "mmd": 0.1},
               {"step": 20, "off_mode": 0.2, "mmd": 0.05}]
    mine = {"final": history[-1], "history": history, "teacher": "t0", "teacher_reached_at": 0}

    def dmd_run(teacher="t0", folder_config=config, **changes):
        write_json(dmd_dir(folder_config) / "metrics.json", {"final": history[-1], "history": history,
                                                             "teacher": teacher,
                                                             "config": config.replace(**changes).as_dict()})

    def compare(run_config=config):
        return compare_with_dmd(run_config, mine, disback.COMPARED_KEYS)

    assert not compare()["compared"] and "no finished DMD run" in compare()["why"]
    dmd_run()
    same = compare()
    assert same["compared"] and same["dmd_run"] == str(dmd_dir(config)) and same["updates_to_target"]["DMD"] == 20
    for change, message in [(dict(seed=1), "seed=1 (DisBack: 0)"), (dict(dmd_iterations=40), "dmd_iterations=40"),
                            (dict(gen_lr=1e-3), "gen_lr=0.001"), (dict(eval_every=5), "eval_every=5"),
                            (dict(teacher="t1"), "another teacher")]:
        dmd_run(**change)
        different = compare()
        assert not different["compared"] and message in different["why"], (change, different)
    dmd_run()
    tagged = compare(config.replace(tag="nopath"))  # --tag: DMD's run of that tag, which does not exist
    assert not tagged["compared"] and tagged["dmd_run"].endswith("dmd_1step_nopath")
    assert "--tag nopath" in tagged["why"]


@pytest.mark.parametrize("args,message", [
    (["--snapshots", "-1"], "--snapshots must be >= 0"),
    (["--interval", "0"], "--interval must be at least 1"),
    (["--snapshots", "10", "--record-iterations", "5"], "cannot hold 10 snapshots"),
    (["--snapshots", "3", "--record-iterations", "1000"], "cannot hold 3 snapshots evenly"),
    (["--real-guidance", "2"], "use --real-guidance 0"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_bad_input_is_refused_before_any_work(args, message, tmp_path):
    with pytest.raises(UserError, match=re.escape(message)):
        disback.main(["--preset", "toy", *args, "--out-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())
