"""Tests of lightning_kd.nn.adapters."""

from __future__ import annotations

import torch
from torch import nn

from lightning_kd.nn.adapters import Paraphraser, Translator, VIDRegressor


def test_adapters_shapes_and_initial_variance():
    regressor = VIDRegressor(6, 10, init_variance=5.0)
    assert regressor(torch.randn(2, 6, 3, 3)).shape == (2, 10, 3, 3)
    torch.testing.assert_close(regressor.variance(), torch.full((10,), 5.0))
    assert all(not conv.bias for conv in regressor.regressor if isinstance(conv, nn.Conv2d))
    factor, reconstruction = Paraphraser(8, rate=0.5)(torch.randn(2, 8, 4, 4))
    assert factor.shape == (2, 4, 4, 4) and reconstruction.shape == (2, 8, 4, 4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in Paraphraser(8).modules())
    assert Translator(6, 4)(torch.randn(2, 6, 4, 4)).shape == (2, 4, 4, 4)
    assert any(isinstance(m, nn.BatchNorm2d) for m in Translator(6, 4).modules())
