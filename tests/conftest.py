import inspect
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(items):
    """Every test that uses the trained toy teacher or starts a script is slow; a few more are marked
    by hand. The fast tier, `python -m pytest -m "not slow"`, checks the math and the units in under
    a minute."""
    for item in items:
        function = getattr(item, "function", None)
        starts_a_script = function is not None and "subprocess.run" in inspect.getsource(function)
        if "toy_teacher" in getattr(item, "fixturenames", ()) or starts_a_script:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def toy_teacher(tmp_path_factory):
    """A toy teacher trained briefly (1500 updates, a few seconds), shared by every test file."""
    from train_teacher import TeacherConfig, load_teacher

    folder = tmp_path_factory.mktemp("teacher")
    config = TeacherConfig.from_preset("toy", out_dir=str(folder), device="cpu", iterations=1500, eval_samples=500,
                                  eval_steps=[1, 2, 4, 8, 256])
    load_teacher(config, torch.device("cpu"))  # trains it
    return folder


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def with_teacher(folder, teacher_folder) -> Path:
    """Copy a trained teacher (teacher.pt and its teacher/ folder) into a run folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("teacher.pt", "teacher"):
        src, dst = Path(teacher_folder) / name, folder / name
        if not dst.exists():
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return folder


def die_on_call(monkeypatch, module, name: str, n: int) -> None:
    """Make the n-th call of module.name raise KeyboardInterrupt: a run killed mid-training."""
    real, calls = getattr(module, name), {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, dying)


def log_records(run_folder) -> list[dict]:
    """The lines of a run's log.jsonl, parsed."""
    lines = (Path(run_folder) / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
