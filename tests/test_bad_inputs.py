"""Bad input and lost work. A battery of ordinary mistakes, each run as its command line runs it (`run_cli`):
every one gets one line, `error: ...` with exit status 2 and no traceback, that says what to do. And the
ways a run could lose a user's work: a second run into a held folder, a named teacher trained over, Ctrl-C,
a damaged checkpoint. Fast: the runs here take a few updates of a 32-wide toy network."""

import fcntl
import gzip
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import disback
import dmd
import evaluate
import guided_distill
import progressive_distill
import train_teacher
from conftest import log_records, with_teacher
from plumbing.data import load_fashion_mnist
from plumbing.errors import UserError
from plumbing.folders import dmd_dir
from plumbing.training import load_checkpoint, run_cli, save_checkpoint
from train_teacher import TeacherConfig

SCRIPTS = {"train_teacher": train_teacher, "pd": progressive_distill, "guided": guided_distill, "dmd": dmd,
           "disback": disback, "evaluate": evaluate}
TINY = dict(hidden=32, iterations=5, device="cpu")  # a toy teacher of 5 updates, 32 wide


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A folder holding teacher.pt: 5 updates of a 32-wide MLP (no evaluation), in about a second."""
    folder = tmp_path_factory.mktemp("tiny_teacher")
    train_teacher.train_teacher(TeacherConfig.from_preset("toy", out_dir=str(folder), **TINY))
    return folder


@pytest.fixture
def files(tmp_path, tiny_teacher):
    """What the battery points at: a plain file, and checkpoints that are not teachers."""
    (tmp_path / "a_file").write_text("not a folder\n")
    config = TeacherConfig.from_preset("toy", out_dir=str(tmp_path))
    for kind in ("dmd", "student_4", "stage1"):
        save_checkpoint(tmp_path / f"{kind}.pt", {"kind": kind, "config": config, "step": 3})
    (tmp_path / "mine").mkdir()
    (tmp_path / "pictures").mkdir()  # a teacher's picture folder, beside its checkpoint pictures.pt
    (tmp_path / "pictures.pt").write_bytes((tiny_teacher / "teacher.pt").read_bytes())
    (tmp_path / "mine" / "my.pt").write_bytes((tiny_teacher / "teacher.pt").read_bytes())
    return tmp_path


def cli(capsys, script: str, argv: list) -> tuple[int, list[str]]:
    """A script's command line, in this process: its exit status and the lines it wrote to stderr."""
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: SCRIPTS[script].main(argv))
    return exit.value.code, capsys.readouterr().err.strip().splitlines()


BATTERY = [  # (script, arguments after --preset toy --device cpu --out-dir <tmp>/run, what the one line says)
    ("train_teacher", ["--device", "gpu"], "unknown --device 'gpu'"),
    ("dmd", ["--device", "cuda:x"], "unknown --device 'cuda:x'"),
    ("train_teacher", ["--devcie", "cpu"], "unrecognized arguments: --devcie cpu; did you mean --device?"),
    ("evaluate", ["--num-sampels", "2"], "did you mean --num-samples?"),
    ("pd", ["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    ("train_teacher", ["--out-dir", ""], "--out-dir is empty"),
    ("dmd", ["--teacher", ""], "--teacher is empty"),
    ("train_teacher", ["--out-dir", "{tmp}/a_file"], "a_file is a file, not a folder"),
    ("dmd", ["--out-dir", "{tmp}/a_file/run"], "a_file is a file, not a folder"),
    ("train_teacher", ["--seed", "-1"], "--seed must be 0 or more"),
    ("train_teacher", ["--ema-decay", "1.0"], "--ema-decay must be in [0, 1)"),
    ("train_teacher", ["--grad-clip", "-1"], "--grad-clip must be above 0"),
    ("pd", ["--hidden", "0"], "--hidden must be at least 1"),
    ("train_teacher", ["--depth", "0"], "--depth must be at least 1"),
    ("train_teacher", ["--eval-samples", "1"], "--eval-samples must be at least 2"),
    ("train_teacher", ["--ckpt-seconds", "0"], "--ckpt-seconds must be at least 1"),
    ("train_teacher", ["--preset", "fmnist16", "--image-size", "32"], "--attn-res 8: no such resolution"),
    ("guided", ["--eval-ws", "0", "6"], "--eval-ws 6: outside the trained range [0, 4]"),
    ("dmd", ["--tag", "a/b"], "use no path separators"),
    ("disback", ["--tag", "../b"], "use no path separators"),
    ("train_teacher", ["--channels", "7"], "--channels is for images (the UNet): this run's network is an MLP"),
    ("train_teacher", ["--preset", "fmnist16", "--hidden", "32"], "--hidden is for toy data (the MLP)"),
    ("dmd", ["--tag", "x" * 300], "at most 64 characters"),
    ("disback", ["--snapshots", "2", "--record-iterations", "4", "--interval", "100", "--dmd-iterations", "4"],
     "reach the teacher only at update 100, and the run has 4 (--dmd-iterations)"),
    ("pd", ["--round-iterations", "0"], "--round-iterations and --pd-batch-size must be at least 1"),
    ("guided", ["--pd-batch-size", "-4"], "--round-iterations and --pd-batch-size must be at least 1"),
    ("dmd", ["--reg-pairs", "0"], "needs --reg-pairs and --reg-steps of at least 1"),
    ("dmd", ["--dmd-label-dropout", "2"], "--dmd-label-dropout must be in [0, 1]"),
    ("dmd", ["--teacher", "{tmp}/missing.pt"], "no teacher at"),
    ("pd", ["--teacher", "{tmp}/missing.pt"], "leave --teacher out to train one"),
    ("dmd", ["--teacher", "{tmp}/dmd.pt"], "is a DMD or DisBack run's checkpoint, not a teacher"),
    ("pd", ["--teacher", "{tmp}/student_4.pt"], "is a distilled student, not a teacher"),
    ("guided", ["--teacher", "{tmp}/stage1.pt"], "is guided distillation's stage-one student, not a teacher"),
    ("train_teacher", ["--resume"], "nothing to resume"),
    ("train_teacher", ["--teacher", "{tmp}/mine/my.pt", "--hidden", "32"], "or another --teacher path"),
    ("dmd", ["--teacher", "{tmp}/mine"], "is a folder; name the checkpoint in it (e.g. {tmp}/mine/teacher.pt)"),
    ("dmd", ["--teacher", "{tmp}/pictures"], "is a folder; name the checkpoint beside it, {tmp}/pictures.pt"),
    ("train_teacher", ["--teacher", "{tmp}/model"], "give it the .pt suffix ({tmp}/model.pt)"),
    ("dmd", ["--teacher", "{tmp}/mine/my.pt"], "hidden=32 (now 256); pass the values it was made with (--hidden 32)"),
    ("evaluate", ["--teacher-steps", "0", "4"], "--teacher-steps must all be at least 1, got 0 4"),
    ("pd", ["--resume"], "nothing to resume"),
    ("guided", ["--resume"], "nothing to resume"),
    ("disback", ["--resume"], "nothing to resume"),
    # a suggested command makes what this run looks for: the user's folder and network, not the preset's
    ("guided", ["--sample", "--w", "1", "--hidden", "32"],
     "run `python guided_distill.py --preset toy --hidden 32 --out-dir {tmp}/run` first"),
    ("evaluate", ["--hidden", "32"],
     "train it with `python train_teacher.py --preset toy --hidden 32 --out-dir {tmp}/run`"),
]


@pytest.mark.parametrize("script,args,message", BATTERY, ids=[f"{s} {' '.join(a)}" for s, a, _ in BATTERY])
def test_every_bad_input_is_one_line(script, args, message, files, capsys):
    args = [a.format(tmp=files) for a in args]
    status, lines = cli(capsys, script, ["--preset", "toy", "--device", "cpu", "--out-dir", str(files / "run"), *args])
    message = message.format(tmp=files)
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1024.00 GiB. GPU 0 has a total capacity of 79 GiB"),
])
def test_out_of_memory_is_one_line_that_names_the_batch(error, tmp_path, monkeypatch, capsys):
    def too_big(*args, **kwargs):
        raise error

    monkeypatch.setattr(train_teacher, "train_teacher", too_big)
    status, lines = cli(capsys, "train_teacher", ["--preset", "toy", "--device", "cpu", "--out-dir", str(tmp_path),
                                                  "--batch-size", "4096"])
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: out of memory: an allocation of 1.02e+03 GiB with "), lines
    assert "the run's batch sizes are --eval-samples 2000, --batch-size 4096: pass a smaller one" in lines[0], lines


def test_a_tilde_is_the_home_folder_also_where_no_shell_expands_it():
    config = TeacherConfig.from_preset("toy", out_dir="~/runs_x", teacher="~/t.pt")
    assert config.out_dir == os.path.expanduser("~/runs_x") and config.teacher == os.path.expanduser("~/t.pt")


def write_idx(path, array, gz=True):
    head = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    (gzip.open if gz else open)(path, "wb").write(head + array.astype("uint8").tobytes())


@pytest.mark.parametrize("damage,message", [
    ("not gzip", "cannot be read"),
    ("cut short", "not an idx file"),
    ("counts differ", "do not make a Fashion-MNIST set (10 images of (28, 28) pixels, 9 labels"),
])
def test_bad_fashion_mnist_files_are_one_line(tmp_path, damage, message):
    import numpy as np

    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((10, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(9 if damage == "counts differ" else 10))
    if damage == "not gzip":
        (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"<html>a login page</html>")
    if damage == "cut short":
        data = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
        (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[:1000]))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_fashion_mnist(str(tmp_path), download=False)


# ==== Work never lost =================================================================================================


def test_a_run_folder_is_held_by_one_run(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    other = open(folder / ".lock", "a+")  # another run holds the folder (flock: per open file, as per process)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    args = ["--preset", "toy", "--out-dir", str(folder), "--hidden", "32", "--iterations", "3", "--eval-steps", "1",
            "--eval-samples", "20", "--device", "cpu"]
    for extra in ([], ["--resume"]):  # also --resume before that run's first checkpoint: in use, not "nothing"
        status, lines = cli(capsys, "train_teacher", args + extra)
        assert status == 2 and len(lines) == 1 and f"{folder} is in use by another run" in lines[0], (extra, lines)
    dmd_dir_ = dmd_dir(dmd.DMDConfig.from_preset("toy", out_dir=str(tmp_path)))
    dmd_dir_.mkdir()
    with open(dmd_dir_ / ".lock", "a+") as dmd_run:  # a DMD run checks its folder before its teacher's work
        fcntl.flock(dmd_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        status, lines = cli(capsys, "dmd", ["--preset", "toy", "--out-dir", str(tmp_path), "--resume"])
        assert status == 2 and len(lines) == 1 and f"{dmd_dir_} is in use by another run" in lines[0], lines
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing written, no log truncated
    other.close()  # that run ends (or is killed): the kernel lets go of its lock
    train_teacher.main(args)
    assert load_checkpoint(folder / "teacher.pt")["step"] == 3


def test_a_named_teacher_is_read_never_written(tmp_path, tiny_teacher, capsys):
    named = tmp_path / "mine" / "teacher_v2.pt"
    named.parent.mkdir()
    named.write_bytes((tiny_teacher / "teacher.pt").read_bytes())
    before = named.read_bytes()
    args = ["--preset", "toy", "--device", "cpu", "--out-dir", str(tmp_path / "run"), "--teacher", str(named),
            "--hidden", "32", "--iterations", "50", "--dmd-iterations", "2", "--dmd-batch-size", "32",
            "--eval-every", "2", "--eval-samples", "20", "--eval-steps", "1", "--reg-pairs", "16", "--reg-steps", "2"]
    dmd.main(args)  # the teacher has 5 updates of --iterations 50: it is used as it is, not trained further
    assert named.read_bytes() == before
    assert [p.name for p in named.parent.iterdir()] == ["teacher_v2.pt"]  # its folder too: caches go to the run's
    assert not (tmp_path / "run" / "teacher.pt").exists()
    assert (dmd_dir(dmd.DMDConfig.from_preset("toy", out_dir=str(tmp_path / "run"))) / "checkpoint.pt").exists()


@pytest.mark.parametrize("named", [False, True])
def test_a_finished_teacher_is_never_trained_on_by_a_method(tmp_path, tiny_teacher, capsys, named):
    # The run folder's own teacher finished its 5 updates; a method run without --iterations 5 (default 20000), or
    # naming that very file with --teacher, uses it as it is and says so: it is not trained on in place.
    folder = with_teacher(tmp_path / "run", tiny_teacher)
    before = (folder / "teacher.pt").read_bytes()
    args = ["--preset", "toy", "--device", "cpu", "--out-dir", str(folder), "--hidden", "32", "--dmd-iterations", "2",
            "--dmd-batch-size", "32", "--eval-every", "2", "--eval-samples", "20", "--eval-steps", "1",
            "--reg-pairs", "16", "--reg-steps", "2", *(["--teacher", str(folder / "teacher.pt")] if named else [])]
    dmd.main(args)
    assert (folder / "teacher.pt").read_bytes() == before
    assert "finished its 5 updates and is used as it is" in capsys.readouterr().out


def test_a_resume_without_the_runs_teacher_trains_no_teacher(tmp_path, tiny_teacher, capsys):
    # A DMD run made from --teacher mine.pt, resumed without the flag: one line naming the teacher, before a default
    # teacher would be trained at <out_dir>/teacher.pt.
    named = tmp_path / "mine.pt"
    named.write_bytes((tiny_teacher / "teacher.pt").read_bytes())
    args = ["--preset", "toy", "--device", "cpu", "--out-dir", str(tmp_path / "run"), "--hidden", "32",
            "--dmd-iterations", "2", "--dmd-batch-size", "32", "--eval-every", "2", "--eval-samples", "20",
            "--eval-steps", "1", "--reg-pairs", "16", "--reg-steps", "2"]
    dmd.main([*args, "--teacher", str(named)])
    capsys.readouterr()
    status, lines = cli(capsys, "dmd", [*args, "--resume"])
    assert status == 2 and len(lines) == 1 and f"was made from --teacher {named}" in lines[0], lines
    assert not (tmp_path / "run" / "teacher.pt").exists()


def test_resuming_with_a_smaller_budget_than_was_run_is_refused(tmp_path, tiny_teacher):
    config = dmd_config(tmp_path, tiny_teacher, dmd_iterations=4, eval_every=4)
    dmd.train_dmd(config)
    with pytest.raises(UserError, match="has 4 updates, more than the 2 this run asks for; ask for at least 4"):
        dmd.train_dmd(config.replace(dmd_iterations=2, eval_every=2), resume=True)


def test_a_ladder_goes_on_only_from_the_teacher_it_started_from(tmp_path):
    # PD's and guided distillation's runs (plumbing.loop.Ladder): a finished student from other teacher weights, or
    # an interrupted round started from another --teacher, is refused, not continued as if it were this teacher's.
    from plumbing.loop import Ladder

    config = TeacherConfig.from_preset("toy", out_dir=str(tmp_path), teacher=str(tmp_path / "a.pt"))
    model = torch.nn.Linear(1, 1)
    ladder = Ladder(tmp_path / "pd", config, resume=False)
    ladder.teacher = "weights-a"
    ladder.stage("student_4", lambda: (model, 1.0), lambda path: model, steps=4)  # records weights-a
    again = Ladder(tmp_path / "pd", config.replace(teacher=str(tmp_path / "b.pt")), resume=True)
    again.teacher = "weights-b"
    with pytest.raises(UserError, match="distilled from another teacher .weights weights-a, this run's are weights-b"):
        again.stage("student_4", lambda: (model, 1.0), lambda path: model, steps=4)
    save_checkpoint(tmp_path / "pd" / "progress.pt", {"kind": "pd", "config": config, "step": 1})  # round 4 -> 2
    with pytest.raises(UserError, match=f"was made from --teacher {tmp_path / 'a.pt'}, not {tmp_path / 'b.pt'}"):
        again.stage("student_2", lambda: (model, 1.0), lambda path: model, steps=2)


def dmd_config(folder, teacher_folder, **overrides):
    folder = with_teacher(folder, teacher_folder)
    return dmd.DMDConfig.from_preset("toy", **{
        **TINY, "out_dir": str(folder), "eval_samples": 20, "eval_steps": [1], "log_every": 2, "ckpt_every": 1000,
        "dmd_iterations": 12, "eval_every": 12, "fake_updates": 1, "dmd_batch_size": 32, "reg_pairs": 16,
        "reg_steps": 2, **overrides})


def test_ctrl_c_saves_the_update_and_resume_ends_equal(tmp_path, tiny_teacher, monkeypatch, capsys):
    whole = dmd_config(tmp_path / "whole", tiny_teacher)
    dmd.train_dmd(whole)
    part = dmd_config(tmp_path / "part", tiny_teacher)
    real, calls = dmd.dmd_generator_loss, []

    def ctrl_c_at_7(*args, **kwargs):  # Ctrl-C in the middle of the 7th update
        calls.append(1)
        if len(calls) == 7:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(dmd, "dmd_generator_loss", ctrl_c_at_7)
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: dmd.train_dmd(part))
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    path = dmd_dir(part) / "checkpoint.pt"
    assert exit.value.code == 130 and err == (f"interrupted: DMD 1-step saved at update 7 in {path}; "
                                              "rerun the command with --resume to continue"), err
    assert load_checkpoint(path)["step"] == 7  # ckpt_every is 1000: the update under way was saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Python's again
    dmd.train_dmd(part, resume=True)
    assert "resuming DMD 1-step at update 7" in capsys.readouterr().out
    a, b = load_checkpoint(dmd_dir(whole) / "checkpoint.pt"), load_checkpoint(path)
    for key in ("generator", "fake_score"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert log_records(dmd_dir(part)) == log_records(dmd_dir(whole))


ROOT = Path(__file__).resolve().parent.parent
ENTRY_SCRIPTS = [*(f"{name}.py" for name in ("train_teacher", "progressive_distill", "guided_distill", "dmd", "disback",
                                               "evaluate")),
                 *(f"tools/{p.name}" for p in sorted((ROOT / "tools").glob("*.py")))]


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_every_script_can_be_interrupted_while_torch_loads(script):
    # Importing torch takes seconds: Ctrl-C then must be one line, not an import traceback. The script's first
    # import of torch or of this repository is plumbing.interrupt, which catches it.
    text = (ROOT / script).read_text()
    first = re.search(r"^(import|from) (torch|common|dmd|disback|train_teacher|plumbing)\b.*$", text, re.M)
    assert first and first.group(0).startswith("import plumbing.interrupt"), (script, first and first.group(0))


@pytest.mark.parametrize("argv,message", [
    (["tools/gpu_check.py", "--tiny", "--device", "cpu", "--out-dir", "{tmp}/a_file/run"], "a_file is a file"),
    (["tools/gpu_check.py", "--tiny", "--device", "cpu", "--out-dir", "{tmp}/run", "--docs", "{tmp}/a_file/d"],
     "--docs {tmp}/a_file/d: {tmp}/a_file is a file, not a folder; pass another --docs"),
    (["notebooks/refresh.py", "../README.md"], "no notebook README.md in"),
    (["tools/gpu_check.py", "--device", "cpu", "--out-dir", "{tmp}/run"], "measures a CUDA GPU, and this run's "
     "device is cpu; run it where a GPU is, or pass --tiny"),
])
def test_the_tools_bad_inputs_are_one_line(argv, message, tmp_path):
    (tmp_path / "a_file").write_text("not a folder\n")
    result = subprocess.run([sys.executable, *(a.format(tmp=tmp_path) for a in argv)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message.format(tmp=tmp_path) in lines[0], lines


def test_ctrl_c_while_torch_loads_is_one_line():
    code = (f"import os, signal, sys; sys.modules['__main__'].__file__ = {str(ROOT / 'dmd.py')!r}; "
            "import plumbing.interrupt; os.kill(os.getpid(), signal.SIGINT); import torch; print('not reached')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and "not reached" not in result.stdout, result.stdout + result.stderr
    assert result.stderr.splitlines() == ["interrupted before the command started its work; nothing was written"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # imported by a test: nothing changed


def test_a_long_update_gap_is_checkpointed_by_the_clock(tmp_path, tiny_teacher, monkeypatch):
    from plumbing import loop

    clock = iter(range(0, 10_000, 50))  # every look at the loop's clock: 50 s later
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=lambda: next(clock), perf_counter=time.perf_counter,
                                                      localtime=time.localtime, strftime=time.strftime, time=time.time))
    config = dmd_config(tmp_path, tiny_teacher, ckpt_seconds=120, dmd_iterations=4, eval_every=4)
    saved = []
    monkeypatch.setattr(loop.Loop, "checkpoint", lambda self: saved.append(self.step))
    dmd.train_dmd(config)
    assert saved == [3, 4]  # 150 s after the start; then the last update (checkpoint_at_end)


def test_checkpoints_follow_the_umask_and_refuse_damage(tmp_path):
    mask = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ck.pt", {"kind": "teacher", "w": torch.ones(3), "step": 1})
    finally:
        os.umask(mask)
    assert (tmp_path / "ck.pt").stat().st_mode & 0o777 == 0o644  # a group's shared runs/ can read it
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    state["w"][1] = 7.0  # a flipped weight: still a valid torch.save file
    torch.save(state, tmp_path / "flipped.pt")
    with pytest.raises(UserError, match="flipped.pt is damaged: its tensors no longer match the checksum"):
        load_checkpoint(tmp_path / "flipped.pt", "teacher checkpoint")
    data = (tmp_path / "ck.pt").read_bytes()
    one = b"\x00\x00\x80\x3f"  # 1.0 in float32
    for name, old, new in [("pickle", b"teacher", b"teachfr"), ("raw", one * 3, one + b"\x00\x00\x80\x3e" + one)]:
        assert data.count(old) == 1  # a flipped byte in the file: in the pickle (kind), or in a tensor's bytes
        (tmp_path / f"{name}.pt").write_bytes(data.replace(old, new))
        with pytest.raises(UserError, match=f"{name}.pt is damaged: its .* no longer matches the CRC"):
            load_checkpoint(tmp_path / f"{name}.pt", "teacher checkpoint")
    (tmp_path / "short.pt").write_bytes(data[: len(data) // 2])  # a copy that did not finish
    with pytest.raises(UserError, match="short.pt is cut short or damaged.*copy it again, or delete it"):
        load_checkpoint(tmp_path / "short.pt", "teacher checkpoint")
    assert load_checkpoint(tmp_path / "ck.pt")["step"] == 1
