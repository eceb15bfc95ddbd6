import gzip
import inspect
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N` (the default, pyproject.toml): one thread per worker,
    os.environ["OMP_NUM_THREADS"] = "1"     # and for the scripts and notebooks it starts (tiny networks gain
    torch.set_num_threads(1)                # little from a second thread; two workers gain almost twice)
else:
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


def write_fake_fashion_mnist(root: Path, n: int = 200) -> None:
    """Generated 28x28 images in the idx format, one blob brightness per class, for machines without
    Debian's package."""
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 40 + labels[:, None, None] * 20).astype(np.uint8)
        for name, array, magic in ((f"{prefix}-images-idx3-ubyte", images, 3), (f"{prefix}-labels-idx1-ubyte",
                                                                                 labels, 1)):
            head = bytes([0, 0, 8, magic]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
            with gzip.open(root / f"{name}.gz", "wb") as f:
                f.write(head + array.tobytes())


def fashion_mnist_args(folder: Path) -> list[str]:
    """Command-line arguments for Fashion-MNIST: none where Debian's package is installed, otherwise
    `--data-dir` of generated images written into `folder`/data."""
    from plumbing.data import DEBIAN_FASHION_MNIST

    if DEBIAN_FASHION_MNIST.exists():
        return []
    (Path(folder) / "data").mkdir(exist_ok=True)
    write_fake_fashion_mnist(Path(folder) / "data")
    return ["--data-dir", str(Path(folder) / "data")]


def numbers(obj, path="") -> list[tuple[str, float]]:
    """Every number in a JSON-like object, with where it sits."""
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in numbers(v, f"{path}/{k}")]
    if isinstance(obj, list):
        return [n for i, v in enumerate(obj) for n in numbers(v, f"{path}/{i}")]
    return [(path, float(obj))] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def assert_finite(metrics_json: Path) -> dict:
    metrics = json.loads(metrics_json.read_text())
    bad = [(where, value) for where, value in numbers(metrics) if not math.isfinite(value)]
    assert not bad, bad
    return metrics
