"""Tests of lightning_kd.methods.srd (SRD)."""

from __future__ import annotations

from lightning_kd.methods import SRD


def test_projector_is_built_at_init_from_an_input_shape():
    model = SRD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8))
    assert (model.projector.conv.in_channels, model.projector.conv.out_channels) == (16, 32)
    assert model.teacher_classifier_name == "fc"
