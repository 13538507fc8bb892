"""Tests of lightning_kd.methods.reviewkd (ReviewKD)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import hooked_features
from helpers import FUSION_LAYERS, fusion_kd
from lightning_kd.losses.feature_fusion import hcl_loss
from lightning_kd.methods import Batch
from lightning_kd.methods.reviewkd import ReviewKD
from lightning_kd.nn.review import as_map


def test_reviewkd_loss_is_the_ramped_sum_of_hcl_losses(monkeypatch):
    torch.manual_seed(0)
    model = fusion_kd("ReviewKD", "resnet", input_shape=(3, 32, 32))
    model.train()
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x, torch.randint(0, 100, (4,)))
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    student_feats = hooked_features(model.student, FUSION_LAYERS["ReviewKD", "resnet"][0], x)
    with torch.no_grad():
        teacher_feats = hooked_features(model.teacher, FUSION_LAYERS["ReviewKD", "resnet"][1], x)
    teacher_feats[-1] = teacher_feats[-1][:, :, None, None]
    full = sum(hcl_loss(f, t) for f, t in zip(model.fusion(student_feats), teacher_feats))
    for epoch, ramp in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (100, 1.0)):
        monkeypatch.setattr(ReviewKD, "current_epoch", property(lambda self, epoch=epoch: epoch))
        losses = model.distillation_losses(batch, student_out, teacher_out)
        assert set(losses) == {"reviewkd"}
        torch.testing.assert_close(losses["reviewkd"], ramp * full)
    assert full > 0
    losses["reviewkd"].backward()
    assert all(p.grad is not None for p in model.fusion.parameters())


@pytest.mark.parametrize("pair, mid", [("resnet", 256), ("timm", 512)])
def test_fusion_maps_every_student_level_onto_its_teacher_feature(pair, mid):
    torch.manual_seed(0)
    model = fusion_kd("ReviewKD", pair, input_shape=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    student_feats = list(model.forward_student(Batch(x, torch.zeros(2, dtype=torch.long))).features.values())
    teacher_feats = list(model.forward_teacher(Batch(x, torch.zeros(2, dtype=torch.long))).features.values())
    abfs = model.fusion.abfs
    assert [abf.reduce[0].in_channels for abf in abfs] == [f.shape[1] for f in student_feats]
    assert all(abf.reduce[0].out_channels == mid for abf in abfs)
    assert [abf.attention is not None for abf in abfs] == [True] * (len(abfs) - 1) + [False]
    fused = model.fusion(student_feats)
    assert [f.shape for f in fused] == [(t if t.dim() == 4 else t[:, :, None, None]).shape for t in teacher_feats]

    # the shallowest level by hand: reduce, fuse with the deeper levels' result resized to it, resize, output conv
    model.fusion.eval()
    residual = None
    for feat, abf, size in reversed(list(zip(student_feats, abfs, model.fusion.out_sizes))[1:]):
        _, residual = abf(as_map(feat), residual, size)
    first = abfs[0]
    reduced = first.reduce(student_feats[0])
    upsampled = F.interpolate(residual, size=reduced.shape[-2:], mode="nearest")
    weights = torch.sigmoid(first.attention[0](torch.cat([reduced, upsampled], 1)))
    mixed = reduced * weights[:, :1] + upsampled * weights[:, 1:]
    mixed = F.interpolate(mixed, size=model.fusion.out_sizes[0], mode="nearest")
    torch.testing.assert_close(model.fusion(student_feats)[0], first.output(mixed))
