"""Batch mixing on the device: mixup and CutMix against naive loops, the Beta draw's moments, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_kd.data.mixing import (Mixing, cutmix, cutmix_box, default_partner, mix_images, mixup,
                                      sample_lambda)


def images(batch=5, channels=2, height=6, width=7, seed=0) -> torch.Tensor:
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def test_mixup_is_the_convex_combination_with_the_partner():
    x = images()
    partner = torch.tensor([3, 0, 4, 1, 2])
    mixed, mixing = mixup(x, 0.3, partner=partner)
    expected = torch.empty_like(x)
    for i in range(len(x)):
        expected[i] = 0.3 * x[i] + 0.7 * x[partner[i]]
    torch.testing.assert_close(mixed, expected)
    assert mixing.lam == 0.3 and mixing.box is None and torch.equal(mixing.partner, partner)


def test_default_partner_is_the_previous_image():
    x = images()
    mixed, mixing = mixup(x, 0.25)
    assert mixing.partner.tolist() == [4, 0, 1, 2, 3] == default_partner(5).tolist()
    torch.testing.assert_close(mixed[1], 0.25 * x[1] + 0.75 * x[0])
    torch.testing.assert_close(mixed[0], 0.25 * x[0] + 0.75 * x[4])


def test_mixup_hand_computed_values():
    x = torch.tensor([[[[0.0, 4.0]]], [[[8.0, -4.0]]]])
    mixed, _ = mixup(x, 0.75)
    assert mixed.flatten().tolist() == [2.0, 2.0, 6.0, -2.0]


def test_cutmix_pastes_the_partners_box_and_reports_its_area():
    x = images(height=8, width=8)
    partner = torch.tensor([1, 2, 3, 4, 0])
    mixed, mixing = cutmix(x, 0.75, partner=partner, generator=torch.Generator().manual_seed(3))
    top, left, height, width = mixing.box
    expected = x.clone()
    for i in range(len(x)):
        for h in range(8):
            for w in range(8):
                if top <= h < top + height and left <= w < left + width:
                    expected[i, :, h, w] = x[partner[i], :, h, w]
    torch.testing.assert_close(mixed, expected)
    assert height * width > 0
    assert mixing.lam == pytest.approx(1 - height * width / 64)
    assert not torch.equal(mixed, x)
    mixed.add_(1.0)
    assert not torch.equal(mixed, x + 1.0), "cutmix must not write into its input"


def test_cutmix_box_has_the_size_of_lam_unless_clipped():
    sides = set()
    for seed in range(50):
        top, left, height, width = cutmix_box(32, 32, 0.75, torch.Generator().manual_seed(seed))
        assert 0 <= top <= top + height <= 32 and 0 <= left <= left + width <= 32
        # sides ⌊32 · √(1 − 0.75)⌋ = 16, shorter only where the box meets the image border
        assert height == 16 or top == 0 or top + height == 32
        assert width == 16 or left == 0 or left + width == 32
        sides |= {height, width}
    assert 16 in sides and min(sides) < 16
    assert cutmix_box(10, 10, 1.0, torch.Generator().manual_seed(0))[2:] == (0, 0)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_lambda_has_the_moments_of_beta(alpha):
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_lambda(alpha, generator) for _ in range(20000)], dtype=torch.float64)
    assert 0 <= draws.min() and draws.max() <= 1
    variance = 1.0 / (4 * (2 * alpha + 1))  # Beta(α, α): mean 1/2, variance α² / ((2α)² (2α + 1))
    assert draws.mean().item() == pytest.approx(0.5, abs=4 * math.sqrt(variance / len(draws)))
    assert draws.var().item() == pytest.approx(variance, rel=0.05)


def test_lambda_draws_repeat_with_the_seed_and_follow_the_global_seed():
    first = [sample_lambda(1.0, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert first == [sample_lambda(1.0, torch.Generator().manual_seed(7)) for _ in range(3)]
    torch.manual_seed(1)
    a = sample_lambda(1.0)
    torch.manual_seed(1)
    assert sample_lambda(1.0) == a


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_drawn_lambda_is_folded_so_each_image_keeps_the_larger_share(mode):
    generator = torch.Generator().manual_seed(0)
    x = images(height=16, width=16)
    lams = [mix_images(x, mode, 1.0, generator)[1].lam for _ in range(2000)]
    assert min(lams) >= 0.5
    if mode == "mixup":  # max(U, 1 − U) for U uniform has mean 3/4
        assert sum(lams) / len(lams) == pytest.approx(0.75, abs=0.01)


def test_mix_targets_are_the_lambda_weighted_one_hots():
    mixing = Mixing(0.7, torch.tensor([2, 0, 1]))
    target = torch.tensor([0, 3, 1])
    soft = mixing.mix_targets(target, 4)
    expected = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.3, 0.0, 0.0, 0.7], [0.0, 0.7, 0.0, 0.3]])
    torch.testing.assert_close(soft, expected)
    assert soft.dtype == torch.float32


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_keeps_dtype_and_shape(mode):
    x = images().to(torch.bfloat16)
    mixed, _ = mix_images(x, mode, generator=torch.Generator().manual_seed(0))
    assert mixed.dtype == torch.bfloat16 and mixed.shape == x.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixes_on_the_gpu_like_on_the_cpu(mode):
    x = images().float()
    cpu, mixing = mix_images(x, mode, generator=torch.Generator().manual_seed(0))
    gpu, gpu_mixing = mix_images(x.cuda(), mode, generator=torch.Generator().manual_seed(0))
    assert gpu.is_cuda and gpu_mixing.partner.is_cuda and gpu_mixing.lam == mixing.lam
    torch.testing.assert_close(gpu.cpu(), cpu)
    target = torch.arange(5).cuda()
    torch.testing.assert_close(gpu_mixing.mix_targets(target, 5).cpu(), mixing.mix_targets(target.cpu(), 5))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown mix mode 'mixupp'"):
        mix_images(images(), "mixupp")
    with pytest.raises(ValueError, match="alpha must be positive"):
        mixup(images(), alpha=0.0)
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        cutmix(images(), 1.5)
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\)"):
        mixup(torch.zeros(4, 8), 0.5)


def test_mixing_a_batch_with_itself_changes_nothing():
    x = images()
    identity = torch.arange(len(x))
    assert torch.equal(mixup(x, 0.4, partner=identity)[0], x)
    assert torch.equal(cutmix(x, 0.4, partner=identity)[0], x)
    assert torch.allclose(F.one_hot(torch.arange(5), 5).float(),
                          Mixing(0.4, identity).mix_targets(torch.arange(5), 5))
