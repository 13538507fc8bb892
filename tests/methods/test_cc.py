from helpers import assert_step_is_ce_plus

from lightning_kd.features import embedding_name
from lightning_kd.losses import cc_loss
from lightning_kd.methods import CC


def test_defaults_are_the_crd_benchmark_setting():
    model = CC(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    hp = model.hparams
    assert (hp.cc_weight, hp.gamma, hp.p_order, hp.ce_weight) == (100.0, 0.4, 2, 1.0)
    assert model.student_layers == [embedding_name(model.student)]


def test_a_step_is_ce_plus_the_weighted_correlation_congruence():
    model = CC(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, cc_weight=5.0, gamma=0.3,
               p_order=1)
    assert_step_is_ce_plus(model, model.student_layers, model.teacher_layers,
                           lambda s, t: 5.0 * cc_loss(s[0].flatten(1), t[0].flatten(1), 0.3, 1))
