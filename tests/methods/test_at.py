from helpers import assert_step_is_ce_plus

from lightning_kd.losses import at_loss
from lightning_kd.methods import AT


def test_defaults_are_the_crd_benchmark_setting():
    model = AT(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    assert (model.hparams.at_weight, model.hparams.p, model.hparams.ce_weight) == (1000.0, 2.0, 1.0)
    assert model.student_layers == ["stages.1"] and model.teacher_layers == ["stages.1"]  # the stages after the stem


def test_a_step_is_ce_plus_the_weighted_attention_losses_of_the_stage_pairs():
    model = AT(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, at_weight=50.0, p=3.0,
               student_layers=["stages.0", "stages.1"], teacher_layers=["stages.0", "stages.1"])
    assert_step_is_ce_plus(model, ["stages.0", "stages.1"], ["stages.0", "stages.1"],
                           lambda s, t: 50.0 * (at_loss(s[0], t[0], 3.0) + at_loss(s[1], t[1], 3.0)))
