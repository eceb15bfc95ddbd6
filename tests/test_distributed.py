"""torchrun on the CPU: 2 processes with the gloo backend run the scripts unchanged; rank 0 alone
writes; 2 processes at half the batch each follow 1 process at the full batch; checkpoints cross
between the two."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test starts torchrun
ROOT = Path(__file__).resolve().parent.parent
# Local processes talk over the loopback device (a CI machine's hostname need not resolve).
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"} if sys.platform == "linux" else {}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **LOOPBACK}
TOY = ["--preset", "toy", "--device", "cpu", "--eval-samples", "200", "--eval-steps", "1", "4", "--log-every", "10",
       "--ckpt-every", "50"]


def run(script: str, args: list, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    result = subprocess.run([*launcher, str(ROOT / script), *args], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "teacher" / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """The same toy teacher run by 1 process at batch 512 and by 2 processes at 256 each."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    for folder, processes in ((one, 1), (two, 2)):
        run("train_teacher.py", [*TOY, "--out-dir", str(folder), "--iterations", "100"], processes)
    return one, two


def test_two_processes_follow_one_process_and_only_rank_0_writes(teachers):
    one, two = teachers
    a, b = losses(one), losses(two)
    steps = [json.loads(line)["step"] for line in (two / "teacher" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 101, 10))  # one log, each line once: rank 0 alone writes
    # The same data (each rank its half of the global batch), other noise: the logged losses, averaged
    # over the ranks, follow the single process's within the noise of a 512-example batch.
    assert all(abs(x - y) < 0.25 * x for x, y in zip(a, b)), (a, b)  # measured: within 1% to 12%
    assert sum(b[-3:]) < 0.8 * sum(b[:3])  # and it learns
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}
    metrics = json.loads((two / "teacher" / "metrics.json").read_text())
    assert metrics["ddim"]["4"]["mmd"] < 1.0


def test_a_checkpoint_crosses_between_one_and_two_processes(teachers, tmp_path):
    one, two = teachers
    import shutil

    for source, processes in ((two, 1), (one, 2)):  # made by 2, resumed by 1, and the other way round
        folder = tmp_path / f"from_{source.name}"
        shutil.copytree(source, folder)
        run("train_teacher.py", [*TOY, "--out-dir", str(folder), "--iterations", "120", "--resume"], processes)
        steps = [json.loads(line)["step"] for line in (folder / "teacher" / "log.jsonl").read_text().splitlines()]
        assert steps == list(range(10, 121, 10))


def test_progressive_distillation_under_two_processes(teachers, tmp_path):
    import shutil

    one, _ = teachers
    shutil.copytree(one, tmp_path, dirs_exist_ok=True)
    run("progressive_distill.py", [*TOY, "--out-dir", str(tmp_path), "--iterations", "100", "--start-steps", "4",
                                   "--to-steps", "2", "--round-iterations", "20"], processes=2)
    metrics = json.loads((tmp_path / "pd" / "metrics.json").read_text())
    assert set(metrics["students"]) == {"2"} and (tmp_path / "pd" / "student_2.pt").is_file()


def test_a_batch_that_does_not_split_gives_one_line(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*launcher, str(ROOT / "train_teacher.py"), *TOY, "--out-dir", str(tmp_path),
                             "--iterations", "10", "--batch-size", "5"], cwd=ROOT, capture_output=True, text=True,
                            env=ENV, timeout=300)
    assert result.returncode != 0 and "error: a batch of 5 does not split over 2 processes" in result.stderr


@pytest.mark.parametrize("script,recipe", [("dmd.py", "dmd"), ("disback.py", "dmd"), ("dmd.py", "dmd2")])
def test_dmd_and_disback_under_two_processes(teachers, tmp_path, script, recipe):
    import shutil

    one, _ = teachers
    shutil.copytree(one, tmp_path, dirs_exist_ok=True)
    path = ["--snapshots", "2", "--record-iterations", "4", "--interval", "4"] if script == "disback.py" else []
    run(script, [*TOY, "--out-dir", str(tmp_path), "--iterations", "100", "--dmd-iterations", "8", "--eval-every", "4",
                 "--recipe", recipe, "--fake-updates", "1", "--reg-pairs", "64", "--reg-steps", "4", *path],
        processes=2)
    folder = tmp_path / ("disback_1step" if script == "disback.py" else f"{recipe}_1step")
    metrics = json.loads((folder / "metrics.json").read_text())
    if recipe == "dmd2":  # the GAN's classifier and real data under two processes
        assert {"loss_gan", "loss_cls"} <= set(json.loads((folder / "log.jsonl").read_text().splitlines()[-1]))
    assert [h["step"] for h in metrics["history"]] == [0, 4, 8] and math.isfinite(metrics["final"]["mmd"])
    steps = [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # rank 0 alone writes the log


def test_guided_and_evaluate_under_two_processes(teachers, tmp_path):
    import shutil

    one, _ = teachers
    shutil.copytree(one, tmp_path, dirs_exist_ok=True)
    run("guided_distill.py", [*TOY, "--out-dir", str(tmp_path), "--iterations", "100", "--start-steps", "2",
                              "--to-steps", "1", "--round-iterations", "10", "--stage1-iterations", "10",
                              "--eval-ws", "0"], processes=2)
    run("evaluate.py", [*TOY, "--out-dir", str(tmp_path), "--iterations", "100", "--num-samples", "200",
                        "--speed-batch", "64", "--teacher-steps", "1", "4"], processes=2)
    assert "| guided (w = 0) | 1 | 1 |" in (tmp_path / "results.md").read_text()
