from helpers import assert_step_is_ce_plus

from lightning_kd.features import embedding_name
from lightning_kd.losses import pkt_loss
from lightning_kd.methods import PKT


def test_defaults_are_the_crd_benchmark_setting():
    model = PKT(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    assert (model.hparams.pkt_weight, model.hparams.ce_weight) == (30000.0, 1.0)
    assert model.student_layers == [embedding_name(model.student)]  # the pooled embedding


def test_a_step_is_ce_plus_the_weighted_pkt_loss_on_the_embeddings():
    model = PKT(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, pkt_weight=300.0)
    layer_s, layer_t = model.student_layers, model.teacher_layers
    assert_step_is_ce_plus(model, layer_s, layer_t, lambda s, t: 300.0 * pkt_loss(s[0].flatten(1), t[0].flatten(1)))
