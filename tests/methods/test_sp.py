from helpers import assert_step_is_ce_plus

from lightning_kd.losses import sp_loss
from lightning_kd.methods import SP


def test_defaults_are_the_crd_benchmark_setting():
    model = SP(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    assert (model.hparams.sp_weight, model.hparams.ce_weight) == (3000.0, 1.0)
    assert model.student_layers == ["stages.1"] and model.teacher_layers == ["stages.1"]  # the last stage


def test_a_step_is_ce_plus_the_weighted_similarity_loss():
    model = SP(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, sp_weight=30.0)
    assert_step_is_ce_plus(model, ["stages.1"], ["stages.1"], lambda s, t: 30.0 * sp_loss(s[0], t[0]))
