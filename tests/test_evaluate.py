"""evaluate.py: the Frechet distance, the offline classifier on real Fashion-MNIST, and the whole
command on a toy run with two tiny students."""

import time
from pathlib import Path

import pytest
import torch
from conftest import with_teacher

import dmd
import evaluate
import progressive_distill as pd
from plumbing import distributed
from plumbing.data import DEBIAN_FASHION_MNIST, load_fashion_mnist
from plumbing.errors import UserError
from plumbing.image_metrics import classifier_accuracy, frechet_distance, train_classifier
from plumbing.metrics import balanced_labels, evaluate_sampler
from plumbing.training import fingerprint, read_json

pytest.importorskip("torchmetrics")


def test_frechet_distance_is_zero_on_itself_and_grows_with_a_mean_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 16, generator=g) @ torch.randn(16, 16, generator=g)
    assert abs(frechet_distance(a, a)) < 1e-6
    shifts = [frechet_distance(a, a + s) for s in (0.5, 1.0, 2.0)]
    # with equal covariances the distance is exactly ||shift||^2 = 16 s^2
    assert shifts == sorted(shifts) and abs(shifts[1] - 16.0) < 1e-3, shifts


@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_offline_classifier_learns_fashion_mnist_in_seconds():
    x_train, y_train = load_fashion_mnist(None)
    x_test, y_test = load_fashion_mnist(None, train=False)
    start = time.perf_counter()
    model = train_classifier(x_train[:5000], y_train[:5000], steps=300, device="cpu", batch_size=64)
    seconds = time.perf_counter() - start
    accuracy = classifier_accuracy(model, x_test[:2000], y_test[:2000])
    assert accuracy > 0.70, accuracy  # measured 0.75-0.78 with 300 steps of batch 64 on 5000 images
    assert seconds < 90, seconds  # on one core (the tests run one worker per core)
    assert model.features(x_test[:4].float() / 127.5 - 1).shape == (4, 128)


def tiny_config(folder, teacher_folder, **overrides):
    folder = with_teacher(folder, teacher_folder)
    return dict(out_dir=str(folder), device="cpu", iterations=1500, eval_samples=500, eval_steps=[1, 2, 4, 8, 256],
                **overrides)


def test_the_command_makes_the_table_and_plot_and_agrees_with_the_students(tmp_path, toy_teacher):
    base = tiny_config(tmp_path, toy_teacher)
    pd_metrics = pd.progressive_distillation(pd.PDConfig.from_preset("toy", **base, start_steps=4, to_steps=2,
                                                                round_iterations=20))
    dmd_metrics = dmd.train_dmd(dmd.DMDConfig.from_preset("toy", **base, dmd_iterations=10, eval_every=10,
                                                     fake_updates=1, reg_pairs=256, reg_steps=8))
    config = evaluate.EvalConfig.from_preset("toy", **base, num_samples=500, speed_batch=256, teacher_steps=[1, 4, 256])
    result = evaluate.evaluate_all(config)

    rows = {(r["method"], r["steps"]): r for r in result["rows"]}
    assert set(rows) == {("teacher DDIM", 1), ("teacher DDIM", 4), ("teacher DDIM", 256), ("PD", 2), ("DMD", 1)}
    for key in ("off_mode", "mmd", "w2"):  # the same seeds give the scripts' own numbers
        assert rows[("PD", 2)][key] == pd_metrics["students"]["2"][key]
        assert rows[("DMD", 1)][key] == dmd_metrics["final"][key]
        assert rows[("teacher DDIM", 4)][key] == read_json(Path(toy_teacher) / "teacher" / "metrics.json")[
            "ddim"]["4"][key]
    assert rows[("PD", 2)]["calls"] == 2 and rows[("DMD", 1)]["calls"] == 1
    # a one-step sampler is far faster than 256 teacher steps on the same batch
    assert rows[("DMD", 1)]["samples_per_s"] > 20 * rows[("teacher DDIM", 256)]["samples_per_s"]

    table = (tmp_path / "results.md").read_text()
    assert "| PD | 2 | 2 |" in table and "| DMD | 1 | 1 |" in table and "500 samples per row" in table
    assert "--num-samples 500 --speed-batch 256 --teacher-steps 1 4 256`" in table  # rerun, it measures the same
    # the commands it suggests make what it looks for: into this --out-dir, not runs/toy
    assert f"guided: missing (make it with `python guided_distill.py --preset toy --out-dir {tmp_path}`)" in table
    assert "DisBack: missing" in table
    assert (tmp_path / "quality_vs_steps.png").is_file()
    assert (tmp_path / "evaluation" / "PD_2" / "samples_2.npz").is_file()

    # Every student records its teacher: under other teacher weights, each student's row is marked, not tabled as
    # this teacher's student.
    teacher = evaluate.load_teacher(config, torch.device("cpu"), train_if_missing=False)
    assert [r.method for r in evaluate.find_rows(config, teacher, torch.device("cpu"))[0]][-2:] == ["PD", "DMD"]
    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)
    teacher.fingerprint = fingerprint(teacher.state_dict())
    assert [r.method for r in evaluate.find_rows(config, teacher, torch.device("cpu"))[0]][-2:] == [
        "PD [another teacher]", "DMD [another teacher]"]


def test_the_guided_sampler_draws_for_the_labels_it_is_given(tmp_path, monkeypatch):
    # Under torchrun each process samples its share of the evaluation noise with that share's labels: a sampler
    # that made its own labels per share drew samples for other labels than those they were scored against.
    seen = []

    def student(z_t, t, labels, w=None):
        seen.append(labels.clone())
        return torch.zeros_like(z_t)

    given = torch.tensor([3, 3, 1, 0, 7])
    evaluate.guided_sampler(student, 2.0)(torch.randn(5, 2), given, 2)
    assert len(seen) == 2 and all(torch.equal(c, given) for c in seen)  # both DDIM steps, the given labels
    # a process whose share starts at sample 3 of 20: it draws for labels 3, 4, ... (class-balanced, also on toy data)
    monkeypatch.setattr(distributed, "chunk", lambda n: (3, n))
    seen.clear()
    config = evaluate.EvalConfig.from_preset("toy", out_dir=str(tmp_path), eval_samples=20)
    evaluate_sampler(evaluate.guided_sampler(student, 0.0), config, tmp_path, [1], "cpu", balanced=True)
    assert torch.equal(seen[0], balanced_labels(20, 8)[3:])


def test_without_a_teacher_it_says_what_to_run(tmp_path):
    with pytest.raises(UserError, match=f"`python train_teacher.py --preset toy --out-dir {tmp_path}`"):
        evaluate.main(["--preset", "toy", "--out-dir", str(tmp_path)])


@pytest.mark.slow
def test_image_path_with_the_offline_classifier(tmp_path):
    # A tiny UNet teacher and one PD round on a fake CIFAR-10: the table's image columns and the caches.
    from test_data import write_fake_cifar

    write_fake_cifar(tmp_path / "data", n_per_batch=8)
    image = dict(out_dir=str(tmp_path), device="cpu", data_dir=str(tmp_path / "data"), channels=16, ch_mult=[1, 2],
                 num_res_blocks=1, batch_size=4, iterations=4, eval_samples=20, eval_steps=[2], sample_every=2,
                 log_every=2, ckpt_every=2, classifier_steps=5, inception=False)
    pd.progressive_distillation(pd.PDConfig.from_preset("cifar10", **image, start_steps=2, to_steps=1,
                                                        round_iterations=2, pd_batch_size=4))
    config = evaluate.EvalConfig.from_preset("cifar10", **image, num_samples=20, speed_batch=4, teacher_steps=[1, 2])
    result = evaluate.evaluate_all(config)
    rows = {(r["method"], r["steps"]): r for r in result["rows"]}
    assert set(rows) == {("teacher DDIM", 1), ("teacher DDIM", 2), ("PD", 1)}
    for row in rows.values():
        assert row["fd_classifier"] >= 0 and 0 <= row["accuracy"] <= 1
    table = (tmp_path / "results.md").read_text()
    assert "| fd_classifier | fd_classifier / teacher 256 |" in table and "not comparable with Inception FID" in table
    cache = tmp_path / "reference_classifier.pt"
    stamp = cache.stat().st_mtime_ns
    again = evaluate.evaluate_all(config)  # the classifier and the reference statistics come from the caches
    assert cache.stat().st_mtime_ns == stamp and (tmp_path / "feature_classifier.pt").is_file()
    assert [r["fd_classifier"] for r in again["rows"]] == [r["fd_classifier"] for r in result["rows"]]
