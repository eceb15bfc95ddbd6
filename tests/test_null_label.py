"""A teacher trained with --label-dropout 0 has never learned the null label (on a 1500-update toy teacher,
100% of its null-label samples are off the modes). Every method that will sample it refuses such a teacher
with one line, before any work: guided distillation (guidance), progressive distillation (its probe),
DMD and DisBack where labels are dropped, the real score is guided or the data are toy, and evaluate.py's
unconditional toy rows."""

import pytest

import disback
import dmd
import evaluate
import guided_distill
import progressive_distill
from plumbing.errors import UserError
from plumbing.training import save_checkpoint
from train_teacher import TeacherConfig


def teacher_without_null_label(folder) -> None:
    config = TeacherConfig.from_preset("toy", out_dir=str(folder), label_dropout=0.0)
    save_checkpoint(folder / "teacher.pt", {"kind": "teacher", "config": config, "step": 10**9,
                                            "ema": {"model": {}}})


@pytest.mark.parametrize("main,args", [(progressive_distill.main, []), (dmd.main, ["--steps", "1"]),
                                       (disback.main, ["--steps", "1"]), (evaluate.main, []),
                                       (guided_distill.main, [])],
                         ids=["pd", "dmd", "disback", "evaluate", "guided"])
def test_a_teacher_without_the_null_label_is_refused(tmp_path, main, args):
    teacher_without_null_label(tmp_path)
    with pytest.raises(UserError, match=r"has no null class \(it was trained with --label-dropout 0\)"):
        main(["--preset", "toy", "--out-dir", str(tmp_path), "--device", "cpu", *args])
    assert [p.name for p in tmp_path.iterdir()] == ["teacher.pt"]  # refused before any work


def test_dmd_asks_for_the_null_label_only_where_it_samples_it():
    assert dmd.samples_null_label(dmd.DMDConfig.from_preset("toy"))  # toy evaluation is unconditional
    assert dmd.samples_null_label(dmd.DMDConfig.from_preset("fmnist"))  # --dmd-label-dropout 0.1
    assert dmd.samples_null_label(dmd.DMDConfig.from_preset("fmnist", dmd_label_dropout=0.0, real_guidance=2.0))
    assert not dmd.samples_null_label(dmd.DMDConfig.from_preset("fmnist", dmd_label_dropout=0.0))
