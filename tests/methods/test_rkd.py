from helpers import assert_step_is_ce_plus

from lightning_kd.features import embedding_name
from lightning_kd.losses import rkd_loss
from lightning_kd.methods import RKD


def test_defaults_are_the_crd_benchmark_setting():
    model = RKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    hp = model.hparams
    assert (hp.distance_weight, hp.angle_weight, hp.rkd_weight, hp.ce_weight) == (25.0, 50.0, 1.0, 1.0)
    assert model.student_layers == [embedding_name(model.student)]


def test_a_step_is_ce_plus_the_weighted_distance_and_angle_losses():
    model = RKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, distance_weight=2.0,
                angle_weight=3.0, rkd_weight=0.5)
    assert_step_is_ce_plus(model, model.student_layers, model.teacher_layers,
                           lambda s, t: 0.5 * rkd_loss(s[0].flatten(1), t[0].flatten(1), 2.0, 3.0))
