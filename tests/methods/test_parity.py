"""One training step of KD, DKD, AT, SP, PKT, RKD, NST, FitNet, CRD and ReviewKD equals what the reference
implementations (mdistiller at a08d46f, RepDistiller) compute on the same weights and batch: the total loss and the
gradient of every student parameter (and of the method's own trainable parts).

The reference side is re-stated in ``parity_reference.py`` (each function names the reference file it re-states)
and runs on deep copies of the method's student, teacher and trainable parts; its features come from a plain
forward of the CIFAR ResNet written there, not from our feature hooks. Our side runs ``training_step`` outside a
Trainer and backpropagates its loss.

Both sides run in float64 (models, parts and batch), since in float32 the references' own arithmetic is the noise:
RKD's ``|a|² + |b|² − 2a·b`` distances differ from exact differences by 3e-5 relative on the total loss. Our losses,
cross-entropy and loss sum still evaluate in float32, hence the tolerances.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import parity_reference as ref
from lightning_kd.methods import AT, CRD, DKD, KD, NST, PKT, RKD, SP, FitNet, ReviewKD
from lightning_kd.models import create_model

NUM_CLASSES = 100
INPUT_SHAPE = (3, 32, 32)
DTYPE = torch.float64
# Our losses evaluate in float32 (they upcast with .float(), which here casts down); measured agreement is 0 to
# 3e-6 relative. PKT is worse conditioned (next to the table below).
RTOL = 1e-5  # relative, on the loss and on each gradient entry
ATOL = 1e-5  # times the largest entry of the reference gradient of that tensor


# ------------------------------------------------------------------------------------------------- helpers
def trainable_part(method: nn.Module, name: str) -> nn.Module:
    """The method's part ``name`` (e.g. ``"projector"``): ``method.<name>``, else the one sub-module whose dotted
    name ends with it (so the lookup survives parts moving under e.g. ``method.terms.fitnet``)."""
    part = getattr(method, name, None)
    if isinstance(part, nn.Module):
        return part
    matches = [module for path, module in method.named_modules() if path == name or path.endswith("." + name)]
    if len(matches) != 1:
        raise LookupError(f"{type(method).__name__} has {len(matches)} sub-modules named {name!r}")
    return matches[0]


def method_buffer(method: nn.Module, name: str) -> torch.Tensor:
    """The method's buffer ``name``, wherever it is registered."""
    matches = [buffer for path, buffer in method.named_buffers() if path == name or path.endswith("." + name)]
    if len(matches) != 1:
        raise LookupError(f"{type(method).__name__} has {len(matches)} buffers named {name!r}")
    return matches[0]


def _perturb_batchnorm(model: nn.Module, generator: torch.Generator, running: bool) -> None:
    """Non-default BatchNorm affine parameters (and, for a teacher, running statistics), so that gradients of the
    BN parameters are not trivial and eval-mode normalisation differs from batch statistics."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.copy_(0.1 * torch.randn(c, generator=generator))
                if running:
                    module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                    module.running_var.copy_(0.5 + torch.rand(c, generator=generator))


@functools.lru_cache(maxsize=None)
def _model(name: str, seed: int, teacher: bool) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, num_classes=NUM_CLASSES)
    _perturb_batchnorm(model, torch.Generator().manual_seed(seed + 1), running=teacher)
    return model.eval() if teacher else model


# resnet8x4 (widths 32/64/128/256, one block per stage) learns from resnet20 (16/16/32/64, three blocks per stage):
# different widths and deeper stages, cheap enough for float64; ReviewKD uses resnet32x4, the pair of mdistiller's
# REVIEWKD shapes.
STUDENT, TEACHER = "resnet8x4", "resnet20"


def pair(student: str = STUDENT, teacher: str = TEACHER) -> dict[str, nn.Module]:
    """Fresh copies of a fixed student and a fixed teacher."""
    return {"student": copy.deepcopy(_model(student, 0, False)), "teacher": copy.deepcopy(_model(teacher, 10, True))}


def build(cls, student: str = STUDENT, teacher: str = TEACHER, **kwargs):
    """Our method on a fixed pair, in :data:`DTYPE` with its trainable parts."""
    return cls(**pair(student, teacher), num_classes=NUM_CLASSES, **kwargs).to(DTYPE)


def batch(with_index: bool = False) -> tuple[torch.Tensor, ...]:
    """A fixed batch of four 3×32×32 inputs; two samples share a label."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(4, *INPUT_SHAPE, generator=generator, dtype=DTYPE)
    y = torch.tensor([3, 71, 3, 99])
    return (x, y, torch.tensor([5, 0, 13, 9])) if with_index else (x, y)


def our_step(method, data, epoch: int | None = None, monkeypatch=None) -> torch.Tensor:
    """``training_step`` on ``data`` outside a Trainer (at ``current_epoch = epoch`` when given), backpropagated."""
    if epoch is not None:
        monkeypatch.setattr(type(method), "current_epoch", property(lambda self: epoch))
    method.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer to log to
        loss = method.training_step(data, 0)
    loss.backward()
    return loss.detach()


def reference_copies(method) -> tuple[nn.Module, nn.Module]:
    """Deep copies of the method's student (train mode) and teacher (eval mode), taken before its step."""
    return copy.deepcopy(method.student).train(), copy.deepcopy(method.teacher).eval()


def reference_forward(student: nn.Module, teacher: nn.Module, x: torch.Tensor):
    s_logits, s_feats = ref.resnet_features(student, x)
    with torch.no_grad():
        t_logits, t_feats = ref.resnet_features(teacher, x)
    return s_logits, s_feats, t_logits, t_feats


def assert_grads_match(ours: nn.Module, theirs: nn.Module, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Every parameter gradient of ``ours`` equals that of its deep copy ``theirs`` (same names), up to ``rtol`` of
    each entry plus ``atol`` times the tensor's largest entry; a tensor whose gradient is zero up to round-off (a
    bias before a training-mode BatchNorm) is measured against 1e-4 of the module's largest gradient instead."""
    theirs_params = dict(theirs.named_parameters())
    assert theirs_params.keys() == dict(ours.named_parameters()).keys()
    assert all(p.grad is not None for p in theirs_params.values()), f"{what}: the reference left a gradient empty"
    module_scale = max(float(p.grad.abs().max()) for p in theirs_params.values())
    for name, param in ours.named_parameters():
        expected = theirs_params[name].grad
        assert param.grad is not None, f"{what}.{name}: no gradient"
        scale = max(float(expected.abs().max()), 1e-4 * module_scale)
        torch.testing.assert_close(param.grad, expected, rtol=rtol, atol=atol * scale,
                                   msg=lambda m, n=name: f"{what}.{n}: {m}")


def assert_loss_matches(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = RTOL) -> None:
    torch.testing.assert_close(ours, theirs.detach().reshape(()).to(ours.dtype), rtol=rtol, atol=0.0)


# ---------------------------------------------------------------------------------- logit and feature methods
def kd_reference(s_logits, s_feats, t_logits, t_feats, y):
    # mdistiller distillers/KD.py::KD.forward_train (= RepDistiller -r 0.1 -a 0.9 -b 0)
    return ref.KD_CE * F.cross_entropy(s_logits, y) + ref.KD_W * ref.kd_reference(s_logits, t_logits, ref.KD_T)


def at_reference(s_logits, s_feats, t_logits, t_feats, y):
    # mdistiller distillers/AT.py::AT.forward_train: post-ReLU feats[1:] (RepDistiller feat[1:-1])
    return ref.AT_CE * F.cross_entropy(s_logits, y) + ref.AT_W * ref.at_reference(
        s_feats["feats"][1:], t_feats["feats"][1:], ref.AT_P)


def sp_reference(s_logits, s_feats, t_logits, t_feats, y):
    # mdistiller distillers/SP.py::SP.forward_train: the last post-ReLU stage, before pooling (RepDistiller feat[-2])
    return ref.SP_CE * F.cross_entropy(s_logits, y) + ref.SP_W * ref.sp_reference(
        s_feats["feats"][-1], t_feats["feats"][-1])


def pkt_reference(s_logits, s_feats, t_logits, t_feats, y):
    # mdistiller distillers/PKT.py::PKT.forward_train: the pooled embedding (RepDistiller feat[-1])
    return ref.PKT_CE * F.cross_entropy(s_logits, y) + ref.PKT_W * ref.pkt_reference(
        s_feats["pooled_feat"], t_feats["pooled_feat"])


def rkd_reference(s_logits, s_feats, t_logits, t_feats, y):
    # mdistiller distillers/RKD.py::RKD.forward_train: the pooled embedding, eps 1e-12, not squared
    return ref.RKD_CE * F.cross_entropy(s_logits, y) + ref.RKD_W * ref.rkd_reference(
        s_feats["pooled_feat"], t_feats["pooled_feat"], ref.RKD_DIST_W, ref.RKD_ANGLE_W, ref.RKD_EPS,
        ref.RKD_SQUARED)


def nst_reference(s_logits, s_feats, t_logits, t_feats, y):
    # mdistiller distillers/NST.py::NST.forward_train: post-ReLU feats[1:] (RepDistiller feat[1:-1])
    return ref.NST_CE * F.cross_entropy(s_logits, y) + ref.NST_W * ref.nst_reference(
        s_feats["feats"][1:], t_feats["feats"][1:])


# every method at its own defaults, which are mdistiller's cfg defaults; the last entry is the tolerance.
# PKT's KL between two nearly uniform 4×4 distributions is ~4e-6 before its weight 30000, and float32 evaluation
# (ours, see RTOL) moves it by 1.4e-3 relative: the reference's own formula in float32 on the same features gives our
# value to 2e-6, but differs from its float64 value by as much, 3e-5 on the total loss and 2e-5 on the gradients.
PLAIN = {"KD": (KD, kd_reference, RTOL), "AT": (AT, at_reference, RTOL), "SP": (SP, sp_reference, RTOL),
         "PKT": (PKT, pkt_reference, 1e-4), "RKD": (RKD, rkd_reference, RTOL), "NST": (NST, nst_reference, RTOL)}


@pytest.mark.parametrize("name", list(PLAIN))
def test_step_matches_reference(name):
    cls, reference, rtol = PLAIN[name]
    method = build(cls)
    x, y = data = batch()
    student, teacher = reference_copies(method)

    loss = our_step(method, data)
    expected = reference(*reference_forward(student, teacher, x), y)
    expected.backward()

    assert_loss_matches(loss, expected, rtol)
    assert_grads_match(method.student, student, "student", rtol, atol=max(rtol, ATOL))


@pytest.mark.parametrize("epoch", [4, 30])
def test_dkd_step_matches_reference(epoch, monkeypatch):
    """DKD with its warm-up ramp: Lightning's ``current_epoch`` 4 is mdistiller's epoch 5 (ramp 5/20, not 4/20)."""
    method = build(DKD)
    x, y = data = batch()
    student, teacher = reference_copies(method)

    loss = our_step(method, data, epoch, monkeypatch)
    s_logits, _, t_logits, _ = reference_forward(student, teacher, x)
    # mdistiller distillers/DKD.py::DKD.forward_train
    expected = ref.DKD_CE * F.cross_entropy(s_logits, y) + ref.warmup_ramp_reference(epoch + 1, ref.DKD_WARMUP) * (
        ref.dkd_reference(s_logits, t_logits, y, ref.DKD_ALPHA, ref.DKD_BETA, ref.DKD_T))
    expected.backward()

    assert_loss_matches(loss, expected)
    assert_grads_match(method.student, student, "student")


# ---------------------------------------------------------------------------------------------------- FitNet
def regressor_layers(projector: nn.Module) -> tuple[nn.Module, nn.BatchNorm2d]:
    """The one (transposed) convolution and the one BatchNorm of a ConvReg-like regressor."""
    convs = [m for m in projector.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    norms = [m for m in projector.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 1 and len(norms) == 1, f"expected conv + BN in the regressor, got {projector}"
    return convs[0], norms[0]


@pytest.mark.parametrize("student_name", ["resnet8x4", "resnet8"])
def test_fitnet_step_matches_reference(student_name):
    """FitNet at hint layer 2, the regressor's weights copied into the reference's ConvReg: 128 → 32 channels from
    resnet8x4, 32 → 32 from resnet8 (to resnet20)."""
    method = build(FitNet, student_name, input_shape=INPUT_SHAPE)
    x, y = data = batch()
    student, teacher = reference_copies(method)
    projector = trainable_part(method, "projector")
    regressor = copy.deepcopy(projector).train()

    loss = our_step(method, data)
    s_logits, s_feats, _, t_feats = reference_forward(student, teacher, x)
    # mdistiller distillers/FitNet.py::FitNet.forward_train (= RepDistiller --distill hint, HintLoss = MSELoss)
    hint_s, hint_t = s_feats["feats"][ref.FITNET_HINT], t_feats["feats"][ref.FITNET_HINT]
    regressed = ref.conv_reg_reference(hint_s, hint_t.shape, *regressor_layers(regressor))
    expected = ref.FITNET_CE * F.cross_entropy(s_logits, y) + ref.FITNET_W * F.mse_loss(regressed, hint_t)
    expected.backward()

    assert_loss_matches(loss, expected)
    assert_grads_match(method.student, student, "student")
    assert_grads_match(projector, regressor, "projector")


# ------------------------------------------------------------------------------------------------------- CRD
@pytest.mark.parametrize("kd_weight", [0.0, 1.0])
def test_crd_steps_match_reference(kd_weight):
    """Two CRD steps on the same weights: the first estimates the normalisers, the second reuses them and reads the
    memory rows the first one updated (its batch shares two samples). ``kd_weight=1`` is CRD+KD (RepDistiller
    ``-r 1 -a 1 -b 0.8``, ``DistillKL`` at T=4).

    Differs from our defaults on purpose, to make the negatives identical without reading our sampler: 16 training
    samples and ``num_negatives = 15`` drawn ``"uniform"`` (distinct when the pool allows, as the reference's
    sampler) are every other sample, so the reference gets ``contrast_idx = [i, all j ≠ i]``; the NCE sums and the
    normaliser's mean do not depend on the negatives' order. The reference's own sampler
    (``CIFAR100InstanceSample``, ``mode='exact'``) draws distinct negatives among the other classes' samples.
    """
    num_data = 16
    method = build(CRD, num_negatives=num_data - 1, negatives="uniform", num_samples=num_data, kd_weight=kd_weight,
                   input_shape=INPUT_SHAPE)
    first = batch(with_index=True)
    generator = torch.Generator().manual_seed(3)
    second = (torch.randn(4, *INPUT_SHAPE, generator=generator, dtype=DTYPE), torch.tensor([8, 3, 71, 40]),
              torch.tensor([0, 7, 5, 12]))
    student, teacher = reference_copies(method)
    heads = {side: trainable_part(method, f"{side}_head") for side in ("student", "teacher")}
    ref_heads = {side: copy.deepcopy(head) for side, head in heads.items()}
    banks = {side: trainable_part(method, f"{side}_memory").memory for side in ("student", "teacher")}
    ref_banks = {side: bank.detach().clone() for side, bank in banks.items()}
    normalizers = None

    for step, data in enumerate([first, second]):
        for module in (method, student, *ref_heads.values()):
            module.zero_grad(set_to_none=True)
        loss = our_step(method, data)
        method.on_train_batch_end(loss, data, step)  # the memory update of the step
        x, y, index = data
        others = torch.stack([torch.tensor([j for j in range(num_data) if j != i]) for i in index.tolist()])
        contrast_index = torch.cat([index[:, None], others], dim=1)
        s_logits, s_feats, t_logits, t_feats = reference_forward(student, teacher, x)
        # mdistiller distillers/CRD.py::CRD.forward_train (= RepDistiller --distill crd -r 1 -a <kd_weight> -b 0.8)
        crd, normalizers, ref_banks["student"], ref_banks["teacher"] = ref.crd_reference(
            s_feats["pooled_feat"], t_feats["pooled_feat"], index, contrast_index, ref_heads["student"],
            ref_heads["teacher"], ref_banks["student"], ref_banks["teacher"], ref.CRD_NCE_T, ref.CRD_MOMENTUM,
            normalizers)
        expected = (ref.CRD_CE * F.cross_entropy(s_logits, y) + ref.CRD_W * crd
                    + kd_weight * ref.kd_reference(s_logits, t_logits, ref.KD_T))
        expected.backward()

        assert_loss_matches(loss, expected)
        torch.testing.assert_close(method_buffer(method, "nce_normalizers"),
                                   torch.tensor(normalizers, dtype=DTYPE), rtol=RTOL, atol=0.0)
        assert_grads_match(method.student, student, "student")
        for side in heads:
            assert_grads_match(heads[side], ref_heads[side], f"{side}_head")
            torch.testing.assert_close(banks[side], ref_banks[side], rtol=RTOL, atol=1e-6)
    assert ref_heads["student"].out_features == ref.CRD_DIM


# -------------------------------------------------------------------------------------------------- ReviewKD
def fusion_levels(fusion: nn.Module) -> list[dict[str, object]]:
    """The fusion modules' convolutions as the reference's ABF names them, shallow to deep: ``reduce`` (1×1 conv
    without bias, then its BatchNorm: ``conv1``), ``output`` (3×3 conv, BatchNorm: ``conv2``) and ``attention``
    (the 1×1 conv to 2 channels: ``att_conv``; none at the deepest level)."""
    abfs = list(next(m for m in fusion.modules() if isinstance(m, nn.ModuleList)))
    levels = []
    for abf in abfs:
        modules = list(abf.modules())

        def with_norm(i: int, modules=modules):
            return modules[i], next(m for m in modules[i:] if isinstance(m, nn.BatchNorm2d))

        convs = [(i, m) for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
        attention = [m for _, m in convs if m.out_channels == 2 and m.bias is not None]
        reduce = [with_norm(i) for i, m in convs if m.kernel_size == (1, 1) and m.bias is None]
        output = [with_norm(i) for i, m in convs if m.kernel_size == (3, 3)]
        assert len(reduce) == len(output) == 1 and len(attention) <= 1, f"unexpected fusion module {abf}"
        levels.append({"reduce": reduce[0], "output": output[0], "attention": attention[0] if attention else None})
    if levels[0]["attention"] is None:  # stored deepest first
        levels = levels[::-1]
    assert levels[-1]["attention"] is None and all(level["attention"] is not None for level in levels[:-1])
    return levels


def test_reviewkd_step_matches_reference(monkeypatch):
    """ReviewKD with the fusion weights shared, at Lightning epoch 4 = mdistiller epoch 5 (ramp 5/20)."""
    epoch = 4
    method = build(ReviewKD, "resnet8x4", "resnet32x4", input_shape=INPUT_SHAPE)
    x, y = data = batch()
    student, teacher = reference_copies(method)
    fusion = trainable_part(method, "fusion")
    ref_fusion = copy.deepcopy(fusion).train()

    loss = our_step(method, data, epoch, monkeypatch)
    s_logits, s_feats, _, t_feats = reference_forward(student, teacher, x)
    # mdistiller distillers/ReviewKD.py::ReviewKD.forward_train: post-ReLU student stages, pre-ReLU teacher stages
    fused = ref.reviewkd_fused_reference(s_feats, fusion_levels(ref_fusion), ref.REVIEWKD_SHAPES,
                                         ref.REVIEWKD_OUT_SHAPES)
    teacher_feats = t_feats["preact_feats"][1:] + [t_feats["pooled_feat"][:, :, None, None]]
    expected = ref.REVIEWKD_CE * F.cross_entropy(s_logits, y) + (
        ref.REVIEWKD_W * ref.warmup_ramp_reference(epoch + 1, ref.REVIEWKD_WARMUP) * ref.hcl_reference(fused,
                                                                                                      teacher_feats))
    expected.backward()

    assert_loss_matches(loss, expected)
    assert_grads_match(method.student, student, "student")
    assert_grads_match(fusion, ref_fusion, "fusion")
