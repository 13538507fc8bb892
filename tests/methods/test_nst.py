from helpers import assert_step_is_ce_plus

from lightning_kd.losses import nst_loss
from lightning_kd.methods import NST


def test_defaults_are_the_crd_benchmark_setting():
    model = NST(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    assert (model.hparams.nst_weight, model.hparams.ce_weight) == (50.0, 1.0)
    assert model.student_layers == ["stages.1"] and model.teacher_layers == ["stages.1"]


def test_a_step_is_ce_plus_the_weighted_mmd_of_the_stage_pairs():
    model = NST(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, nst_weight=7.0,
                student_layers=["stages.0", "stages.1"], teacher_layers=["stages.0", "stages.1"])
    assert_step_is_ce_plus(model, ["stages.0", "stages.1"], ["stages.0", "stages.1"],
                           lambda s, t: 7.0 * (nst_loss(s[0], t[0]) + nst_loss(s[1], t[1])))
