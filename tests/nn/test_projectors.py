"""Tests of lightning_kd.nn.projectors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_kd.nn import PROJECTORS, ConvReg, ProjectorEnsemble, build_projector


@pytest.mark.parametrize("student_size, teacher_size, conv", [(16, 8, nn.Conv2d), (4, 8, nn.ConvTranspose2d),
                                                               (8, 8, nn.Conv2d), (10, 8, nn.Conv2d)])
def test_conv_reg_maps_the_student_map_onto_the_teachers(student_size, teacher_size, conv):
    regressor = ConvReg((2, 6, student_size, student_size), (2, 10, teacher_size, teacher_size))
    assert type(regressor.conv) is conv
    out = regressor(torch.randn(2, 6, student_size, student_size))
    assert out.shape == (2, 10, teacher_size, teacher_size) and (out >= 0).all()
    if student_size == teacher_size:
        assert regressor.conv.kernel_size == (1, 1)


def test_projectors_from_shapes_and_their_errors():
    for kind in PROJECTORS:
        assert build_projector(kind, (2, 6, 4, 4), (2, 10, 4, 4))(torch.randn(2, 6, 4, 4)).shape == (2, 10, 4, 4)
        if kind != "conv_reg":
            assert build_projector(kind, (2, 6), (2, 10))(torch.randn(3, 6)).shape == (3, 10)
    with pytest.raises(ValueError, match="'linear' projector keeps the spatial size.*conv_reg"):
        build_projector("linear", (2, 6, 8, 8), (2, 10, 4, 4))
    with pytest.raises(ValueError, match="ConvReg cannot map a 3×3 student map to a 8×8"):
        build_projector("conv_reg", (2, 6, 3, 3), (2, 10, 8, 8))
    with pytest.raises(ValueError, match="unknown projector 'mpl'"):
        build_projector("mpl", (2, 6), (2, 10))


def test_projector_ensemble_averages_rectified_linear_projections():
    ensemble = ProjectorEnsemble(6, 10, num_projectors=3)
    x = torch.randn(5, 6)
    manual = sum(torch.relu(x @ p.linear.weight.T + p.linear.bias) for p in ensemble.projectors) / 3
    assert torch.allclose(ensemble(x), manual, atol=1e-6)
    maps = torch.randn(2, 6, 3, 3)
    per_position = ensemble(maps.permute(0, 2, 3, 1).reshape(-1, 6)).reshape(2, 3, 3, 10).permute(0, 3, 1, 2)
    assert torch.allclose(ensemble(maps), per_position, atol=1e-6)
