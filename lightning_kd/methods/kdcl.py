from __future__ import annotations

from typing import Literal

from torch import Tensor

from lightning_kd.methods.dml import OnlineDistillationModule
from lightning_kd.terms.online import ENSEMBLES, KDCLTerm

__all__ = ["ENSEMBLES", "KDCL"]


class KDCL(OnlineDistillationModule):
    """Online distillation from the peers' ensemble (Guo et al., "Online Knowledge Distillation via Collaborative
    Learning", CVPR 2020): N ≥ 2 peers trained from scratch together, each with its cross-entropy and a KD term
    towards a teacher built from all peers' logits.

    ``loss_k = CE(z_k, y) + kd_weight · T² · KL(softmax(t/T) ‖ softmax(z_k/T))``, the KL summed over classes and
    averaged over the batch ("batchmean", :func:`~lightning_kd.losses.kd_loss`), logged as
    ``train/loss_kd_peer<k>``. The teacher ``t`` is computed from detached logits: it is a target, not trained.
    ``ensemble="min_logit"`` (KDCL-MinLogit, :func:`~lightning_kd.losses.online.min_logit_ensemble`):
    ``t_c = min_k (z_{k,c} - z_{k,y})``, which uses the labels; ``"mean_logit"``
    (:func:`~lightning_kd.losses.online.mean_logit_ensemble`): ``t = mean_k z_k``, the label-free ensemble of
    ONE-style online distillation. Defaults T=3 and weight 1 with the T² factor are those of ONE's official CIFAR
    code (Lan et al., NeurIPS 2018, ``loss/kl_loss.py``: batch-mean KL × T², T=3), the usual setting of
    ensemble-teacher online distillation; ONE's sigmoid ramp-up of that weight over the first 80 epochs is left out.
    CE weight 1 on every peer.

    All peers see the same batch; KDCL's different input distortions per peer belong to the data pipeline. The
    validation ensemble ``val/acc_ensemble`` is the mean of the peers' probabilities, never the label-dependent
    MinLogit teacher.

    The loss is the term :class:`~lightning_kd.terms.online.KDCLTerm` (``terms.kd``).

    Args:
        ensemble: how the teacher is built from the peers' logits: ``"min_logit"`` or ``"mean_logit"``.
        temperature: softening temperature T of teacher and peers.
        kd_weight: weight of each peer's KD term.
    """

    def __init__(self, *args, ensemble: Literal["min_logit", "mean_logit"] = "min_logit", temperature: float = 3.0,
                 kd_weight: float = 1.0, **kwargs):
        if ensemble not in ENSEMBLES:
            raise ValueError(f"unknown ensemble {ensemble!r}: use one of {', '.join(map(repr, ENSEMBLES))}")
        super().__init__(*args, **kwargs)
        self.add_term("kd", KDCLTerm(ensemble, temperature, weight=kd_weight))

    def ensemble_teacher(self, peer_logits: list[Tensor], target: Tensor) -> Tensor:
        """The teacher's logits from the peers' logits (detached)."""
        return self.terms["kd"].ensemble_teacher(peer_logits, target)
