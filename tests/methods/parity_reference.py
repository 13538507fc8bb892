"""Plain re-statements of what the published reference implementations compute for one training step, used by
``test_parity.py`` to check our methods against them on the same weights and batch.

References (read at these revisions, not copied):

* mdistiller, commit a08d46f (``megvii-research/mdistiller``): ``mdistiller/distillers/*.py`` (one
  ``forward_train`` per method), ``mdistiller/engine/cfg.py`` (the defaults), ``mdistiller/engine/trainer.py`` (the
  step sums the returned losses; epochs count from 1), ``mdistiller/models/cifar/resnet.py`` (the features).
* RepDistiller (``HobbitLong/RepDistiller``): ``distiller_zoo/*.py``, ``crd/{criterion,memory}.py``,
  ``helper/loops.py::train_distill`` (``loss = gamma·CE + alpha·KL + beta·loss_kd``), ``models/resnet.py``.

Where the two agree (KD, AT, SP, PKT, RKD, NST, FitNet, CRD) one re-statement serves both; each function names the
files it re-states. Everything here is written with plain torch operations on the tensors it is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------- defaults (engine/cfg.py)
# mdistiller/engine/cfg.py at a08d46f (equal to RepDistiller's CIFAR-100 commands where both have the method)
KD_T, KD_CE, KD_W = 4.0, 0.1, 0.9
DKD_CE, DKD_ALPHA, DKD_BETA, DKD_T, DKD_WARMUP = 1.0, 1.0, 8.0, 4.0, 20
AT_P, AT_CE, AT_W = 2, 1.0, 1000.0
SP_CE, SP_W = 1.0, 3000.0
PKT_CE, PKT_W = 1.0, 30000.0
RKD_DIST_W, RKD_ANGLE_W, RKD_CE, RKD_W, RKD_EPS, RKD_SQUARED = 25.0, 50.0, 1.0, 1.0, 1e-12, False
NST_CE, NST_W = 1.0, 50.0
FITNET_HINT, FITNET_CE, FITNET_W = 2, 1.0, 100.0
CRD_DIM, CRD_CE, CRD_W, CRD_NCE_T, CRD_MOMENTUM = 128, 1.0, 0.8, 0.07, 0.5
REVIEWKD_CE, REVIEWKD_W, REVIEWKD_WARMUP, REVIEWKD_MAX_MID = 1.0, 1.0, 20, 512
# resnet32x4 -> resnet8x4 sizes of cfg.REVIEWKD.SHAPES / OUT_SHAPES (deepest level first)
REVIEWKD_SHAPES, REVIEWKD_OUT_SHAPES = [1, 8, 16, 32], [1, 8, 16, 32]


# ------------------------------------------------------------------------------------------------ features
def resnet_features(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, object]]:
    """Logits and the feature dict of a CIFAR ResNet, as ``ResNet.forward`` of mdistiller's
    ``models/cifar/resnet.py`` returns them (RepDistiller ``models/resnet.py`` ``forward(is_feat=True)`` gives the
    same tensors as a list ``[f0, f1, f2, f3, pooled]``).

    Walks the published module layout of our CIFAR ResNets (``conv1``/``bn1``, ``layer{1,2,3}`` of basic blocks
    with ``conv1``/``bn1``/``conv2``/``bn2``/``downsample``, ``fc``): ``feats`` are the stem after its ReLU and each
    stage's output after the final ReLU of its last block; ``preact_feats`` replace the stages by the residual sum
    before that ReLU; ``pooled_feat`` is the global average of the last stage.
    """
    out = F.relu(model.bn1(model.conv1(x)))
    feats, preacts = [out], [out]
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            branch = F.relu(block.bn1(block.conv1(out)))
            branch = block.bn2(block.conv2(branch))
            shortcut = block.downsample(out) if len(block.downsample) else out
            preact = branch + shortcut
            out = F.relu(preact)
        feats.append(out)
        preacts.append(preact)
    pooled = out.mean(dim=(2, 3))
    return model.fc(pooled), {"feats": feats, "preact_feats": preacts, "pooled_feat": pooled}


# ------------------------------------------------------------------------------------------------ logit losses
def kd_reference(s_logits: Tensor, t_logits: Tensor, temperature: float) -> Tensor:
    """mdistiller ``distillers/KD.py::kd_loss`` (= RepDistiller ``distiller_zoo/KD.py::DistillKL``): KL summed over
    classes, mean over the batch ("batchmean"), times T²."""
    log_p_s = F.log_softmax(s_logits / temperature, dim=1)
    p_t = F.softmax(t_logits / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="none").sum(1).mean() * temperature ** 2


def dkd_reference(s_logits: Tensor, t_logits: Tensor, target: Tensor, alpha: float, beta: float,
                  temperature: float) -> Tensor:
    """mdistiller ``distillers/DKD.py::dkd_loss``: TCKD on the binary (target, rest) probabilities, the student's
    log taken of the summed probabilities; NCKD with the target logit lowered by 1000 after the division by T; each
    KL summed over everything, divided by the batch size, times T²."""
    batch = target.shape[0]
    gt = F.one_hot(target, s_logits.shape[1]).bool()
    p_s = F.softmax(s_logits / temperature, dim=1)
    p_t = F.softmax(t_logits / temperature, dim=1)
    b_s = torch.stack([p_s[gt], p_s.masked_fill(gt, 0).sum(1)], dim=1)
    b_t = torch.stack([p_t[gt], p_t.masked_fill(gt, 0).sum(1)], dim=1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * temperature ** 2 / batch
    log_q_s = F.log_softmax(s_logits / temperature - 1000.0 * gt, dim=1)
    q_t = F.softmax(t_logits / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * temperature ** 2 / batch
    return alpha * tckd + beta * nckd


# --------------------------------------------------------------------------------------------- feature losses
def at_reference(s_feats: list[Tensor], t_feats: list[Tensor], p: float) -> Tensor:
    """mdistiller ``distillers/AT.py::at_loss`` (= RepDistiller ``distiller_zoo/AT.py::Attention``, summed by
    ``train_distill``): per stage, the larger map average-pooled to the smaller size, attention
    ``normalize(mean_c f^p)`` (no absolute value), squared difference averaged over batch and positions; summed."""
    total = 0.0
    for f_s, f_t in zip(s_feats, t_feats):
        if f_s.shape[2] > f_t.shape[2]:
            f_s = F.adaptive_avg_pool2d(f_s, f_t.shape[2:])
        elif f_s.shape[2] < f_t.shape[2]:
            f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[2:])
        a_s = F.normalize(f_s.pow(p).mean(1).flatten(1), dim=1)
        a_t = F.normalize(f_t.pow(p).mean(1).flatten(1), dim=1)
        total = total + (a_s - a_t).pow(2).mean()
    return total


def sp_reference(f_s: Tensor, f_t: Tensor) -> Tensor:
    """mdistiller ``distillers/SP.py::similarity_loss`` (= RepDistiller ``distiller_zoo/SP.py``): row-L2-normalised
    Gram matrices of the flattened features, squared Frobenius distance divided by B²."""
    batch = f_s.shape[0]
    g_s = F.normalize(f_s.flatten(1) @ f_s.flatten(1).T, dim=1)
    g_t = F.normalize(f_t.flatten(1) @ f_t.flatten(1).T, dim=1)
    return ((g_t - g_s) ** 2).sum() / batch ** 2


def pkt_reference(f_s: Tensor, f_t: Tensor, eps: float = 1e-7) -> Tensor:
    """mdistiller ``distillers/PKT.py::pkt_loss`` (= RepDistiller ``distiller_zoo/PKT.py``): vectors divided by
    (norm + eps), NaNs zeroed, cosine kernel mapped to [0, 1] and row-normalised, then
    ``mean p_t · log((p_t + eps) / (p_s + eps))`` over the B × B entries."""
    def conditional(f: Tensor) -> Tensor:
        f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)
        f = torch.where(torch.isnan(f), torch.zeros_like(f), f)
        k = (f @ f.T + 1.0) / 2.0
        return k / k.sum(1, keepdim=True)

    p_s, p_t = conditional(f_s), conditional(f_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def rkd_reference(f_s: Tensor, f_t: Tensor, distance_weight: float, angle_weight: float, eps: float = 1e-12,
                  squared: bool = False) -> Tensor:
    """mdistiller ``distillers/RKD.py::rkd_loss`` (= RepDistiller ``distiller_zoo/RKD.py``): pairwise distances
    ``sqrt(clamp(|a|² + |b|² − 2a·b, eps))`` with a zero diagonal, divided by the mean of the positive entries;
    angles from the normalised difference vectors; smooth-L1 (β = 1) averaged over B² and B³ entries. The teacher
    side carries no gradient."""
    def distances(e: Tensor) -> Tensor:
        sq = e.pow(2).sum(1)
        d = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp(min=eps)
        d = d if squared else d.sqrt()
        d = d * (1 - torch.eye(len(e), dtype=e.dtype))
        return d / d[d > 0].mean()

    def angles(e: Tensor) -> Tensor:
        diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
        return (diff @ diff.transpose(1, 2)).flatten()

    s, t = f_s.flatten(1), f_t.flatten(1).detach()
    with torch.no_grad():
        t_d, t_a = distances(t), angles(t)
    loss_d = F.smooth_l1_loss(distances(s), t_d)
    loss_a = F.smooth_l1_loss(angles(s), t_a)
    return distance_weight * loss_d + angle_weight * loss_a


def nst_reference(s_feats: list[Tensor], t_feats: list[Tensor]) -> Tensor:
    """mdistiller ``distillers/NST.py::nst_loss`` (= RepDistiller ``distiller_zoo/NST.py``, ``full_loss=True``):
    per stage, larger map pooled to the smaller size, each channel's spatial map L2-normalised, squared MMD with the
    kernel ``(x·y)²``: ``mean k(t,t) (detached) + mean k(s,s) − 2 mean k(s,t)``, each mean over batch and channel
    pairs; summed over stages."""
    def kernel_mean(a: Tensor, b: Tensor) -> Tensor:
        return (a @ b.transpose(1, 2)).pow(2).mean()

    total = 0.0
    for f_s, f_t in zip(s_feats, t_feats):
        if f_s.shape[2] > f_t.shape[2]:
            f_s = F.adaptive_avg_pool2d(f_s, f_t.shape[2:])
        elif f_s.shape[2] < f_t.shape[2]:
            f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[2:])
        s = F.normalize(f_s.flatten(2), dim=2)
        t = F.normalize(f_t.flatten(2), dim=2)
        total = total + kernel_mean(t, t).detach() + kernel_mean(s, s) - 2 * kernel_mean(s, t)
    return total


def conv_reg_reference(x: Tensor, t_shape: torch.Size, conv: nn.Module, bn: nn.BatchNorm2d) -> Tensor:
    """mdistiller ``distillers/_common.py::ConvReg`` (= RepDistiller ``models/util.py::ConvReg``, ``use_relu=True``),
    on the given convolution weights: 3×3 stride-2 conv when the student map is twice the teacher's height, 4×4
    stride-2 transposed conv when half, else a conv of kernel ``1 + H_s − H_t`` without padding; then BatchNorm on
    the batch statistics (training mode) and ReLU."""
    s_h, t_h = x.shape[2], t_shape[2]
    if s_h == 2 * t_h:
        out = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
    elif 2 * s_h == t_h:
        out = F.conv_transpose2d(x, conv.weight, conv.bias, stride=2, padding=1)
    elif s_h >= t_h:
        assert conv.weight.shape[2:] == (1 + s_h - t_h, 1 + x.shape[3] - t_shape[3]), "regressor kernel differs"
        out = F.conv2d(x, conv.weight, conv.bias)
    else:
        raise ValueError("the reference has no regressor for a smaller student map")
    out = F.batch_norm(out, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=True, momentum=0.1,
                       eps=1e-5)
    return F.relu(out)


# ------------------------------------------------------------------------------------------------------ CRD
def crd_reference(f_s: Tensor, f_t: Tensor, index: Tensor, contrast_index: Tensor, student_head: nn.Linear,
                  teacher_head: nn.Linear, student_memory: Tensor, teacher_memory: Tensor, nce_t: float,
                  momentum: float, normalizers: tuple[float, float] | None = None,
                  ) -> tuple[Tensor, tuple[float, float], Tensor, Tensor]:
    """mdistiller ``distillers/CRD.py::CRD.crd_loss`` with ``Embed``, ``ContrastMemory.forward`` and ``ContrastLoss``
    (= RepDistiller ``crd/criterion.py::CRDLoss`` and ``crd/memory.py::ContrastMemory``), with the normalisers
    ``(Z_s, Z_t)`` of an earlier step, or ``None`` on the first step (``params[2:4] = -1``).

    Embeddings ``v = x / |x|₂`` of the linear heads; scores ``exp(M[idx] · v / T)`` of the student embedding
    against the teacher memory (``memory_v2``) and of the teacher embedding against the student memory
    (``memory_v1``); unless given, ``Z = mean(scores) · N`` from this batch (Python floats, kept for later steps);
    NCE with ``m = K`` and ``P_n = 1/N``: ``−(Σ log(P⁺/(P⁺ + m P_n + ε)) + Σ log(m P_n/(P⁻ + m P_n + ε))) / B``
    per side, summed. Then the memory rows of the batch become ``normalize(momentum · M[i] + (1 − momentum) · v)``.

    Returns the loss, ``(Z_s, Z_t)`` and the updated student and teacher memories.
    """
    def embed(head: nn.Linear, x: Tensor) -> Tensor:
        e = head(x.reshape(x.shape[0], -1))
        return e / e.pow(2).sum(1, keepdim=True).pow(0.5)

    def nce(x: Tensor, num_data: int) -> Tensor:
        m = x.shape[1] - 1
        noise = m / num_data
        pos, neg = x[:, 0], x[:, 1:]
        log_d1 = torch.log(pos / (pos + noise + 1e-7))
        log_d0 = torch.log(torch.full_like(neg, noise) / (neg + noise + 1e-7))
        return -(log_d1.sum() + log_d0.sum()) / x.shape[0]

    def update(memory: Tensor, v: Tensor) -> Tensor:
        rows = memory[index] * momentum + v.detach() * (1 - momentum)
        rows = rows / rows.pow(2).sum(1, keepdim=True).pow(0.5)
        return memory.clone().index_copy(0, index, rows)

    v_s, v_t = embed(student_head, f_s), embed(teacher_head, f_t)
    num_data = student_memory.shape[0]
    s_scores = torch.exp(torch.bmm(teacher_memory[contrast_index].detach(), v_s[:, :, None]).squeeze(2) / nce_t)
    t_scores = torch.exp(torch.bmm(student_memory[contrast_index].detach(), v_t[:, :, None]).squeeze(2) / nce_t)
    if normalizers is None:
        normalizers = ((s_scores.mean() * num_data).item(), (t_scores.mean() * num_data).item())
    z_s, z_t = normalizers
    loss = nce(s_scores / z_s, num_data) + nce(t_scores / z_t, num_data)
    return loss, normalizers, update(student_memory, v_s), update(teacher_memory, v_t)


# ------------------------------------------------------------------------------------------------- ReviewKD
def hcl_reference(s_feats: list[Tensor], t_feats: list[Tensor]) -> Tensor:
    """mdistiller ``distillers/ReviewKD.py::hcl_loss``: per level, the MSE of the maps plus the MSEs of their 4×4,
    2×2, 1×1 adaptive average pools (only sizes below the map's height) weighted 1/2, 1/4, 1/8, divided by the sum
    of the weights used; summed over levels."""
    total = 0.0
    for fs, ft in zip(s_feats, t_feats):
        h = fs.shape[2]
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= h:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            weights += weight
        total = total + loss / weights
    return total


def abf_reference(x: Tensor, residual: Tensor | None, shape: int, out_shape: int, reduce: tuple[nn.Module, nn.Module],
                  output: tuple[nn.Module, nn.Module], attention: nn.Module | None) -> tuple[Tensor, Tensor]:
    """mdistiller ``distillers/ReviewKD.py::ABF.forward`` on given convolutions: 1×1 conv-BN (``conv1``); with an
    attention conv, the deeper result resized (nearest) to ``shape``, two sigmoid weights per position from the
    concatenation, weighted sum; nearest resize to ``out_shape`` when the width differs; 3×3 conv-BN (``conv2``).
    Returns ``(output, fused)``."""
    n, _, h, w = x.shape
    x = reduce[1](reduce[0](x))
    if attention is not None:
        residual = F.interpolate(residual, (shape, shape), mode="nearest")
        z = torch.sigmoid(attention(torch.cat([x, residual], dim=1)))
        x = x * z[:, 0].view(n, 1, h, w) + residual * z[:, 1].view(n, 1, h, w)
    if x.shape[-1] != out_shape:
        x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
    return output[1](output[0](x)), x


def reviewkd_fused_reference(student_feats: dict[str, object], levels: list[dict[str, object]], shapes: list[int],
                             out_shapes: list[int]) -> list[Tensor]:
    """The student side of mdistiller ``distillers/ReviewKD.py::ReviewKD.forward_train`` (``STU_PREACT=False``):
    ``feats + [pooled as 1×1]`` deepest first, the deepest ABF alone, then each shallower one fused with the previous
    result; the zip with the ABF list drops the stem ``f0``. ``levels`` are the ABFs shallow to deep; ``shapes`` and
    ``out_shapes`` deepest first (cfg ``SHAPES``/``OUT_SHAPES``). Returns the outputs shallow to deep."""
    x = student_feats["feats"] + [student_feats["pooled_feat"][:, :, None, None]]
    x = x[::-1]
    abfs = levels[::-1]
    out, residual = abf_reference(x[0], None, shapes[0], out_shapes[0], **abfs[0])
    results = [out]
    for feat, abf, shape, out_shape in zip(x[1:], abfs[1:], shapes[1:], out_shapes[1:]):
        out, residual = abf_reference(feat, residual, shape, out_shape, **abf)
        results.insert(0, out)
    return results


def warmup_ramp_reference(epoch_from_one: int, warmup: int) -> float:
    """``min(epoch / warmup, 1)`` with mdistiller's epochs counted from 1 (``engine/trainer.py``: ``epoch = 1``)."""
    return min(epoch_from_one / warmup, 1.0)
