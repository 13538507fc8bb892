"""Terms of online distillation: peers trained together from scratch teach each other.

They read every peer's logits, which an online distillation module
(:class:`~lightning_kd.methods.dml.OnlineDistillationModule`: :class:`~lightning_kd.methods.DML`,
:class:`~lightning_kd.methods.KDCL`) hands them as ``student_out.peer_logits`` (peer 0 is the student), and return
one loss per peer, ``<name>_peer<k>``. The peers that act as teachers are targets: their logits are detached.
"""

from __future__ import annotations

from torch import Tensor

from lightning_kd.losses import kd_loss, standardize_logits
from lightning_kd.losses.online import mean_logit_ensemble, min_logit_ensemble, mutual_learning_losses
from lightning_kd.terms.base import DistillationTerm

ENSEMBLES = ("min_logit", "mean_logit")


class PeerTerm(DistillationTerm):
    """A term on all N peers' logits (``student_out.peer_logits``), without a pre-trained teacher. Its host must
    train peers (an online distillation module)."""

    requires_teacher = False
    reads_logits = True

    def bind(self, host) -> None:
        if not hasattr(host, "peer_models"):
            raise ValueError(f"{type(self).__name__} distils between peers trained together, but "
                             f"{type(host).__name__} trains none: use it in an online distillation module "
                             "(lightning_kd.methods.DML, KDCL or an OnlineDistillationModule subclass)")
        super().bind(host)

    def peer_logits(self, student_out) -> list[Tensor]:
        """Every peer's logits, the student first (standardized when ``standardize``)."""
        logits = getattr(student_out, "peer_logits", None)
        if not logits:
            raise ValueError(f"{type(self).__name__} reads every peer's logits, but the student's output has no "
                             "peer_logits: the host's forward_student must return a PeerOutput")
        return [standardize_logits(z) for z in logits] if self.standardize else list(logits)


class DMLTerm(PeerTerm):
    """Deep Mutual Learning (Zhang, Xiang, Hospedales, Lu, CVPR 2018): for each peer ``k`` of ``N``,
    ``{"kl_peer<k>": 1/(N−1) · Σ_{l≠k} T² · KL(softmax(z_l/T) ‖ softmax(z_k/T))}``, the KL summed over classes and
    averaged over the batch, the other peers' logits detached
    (:func:`~lightning_kd.losses.online.mutual_learning_losses`). T=1 is the paper's.

    Args:
        temperature: softening temperature T, with the T² factor.
        weight, warmup_epochs, standardize: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    def __init__(self, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        terms = mutual_learning_losses(self.peer_logits(student_out), self.temperature)
        return {f"kl_peer{index}": term for index, term in enumerate(terms)}


class KDCLTerm(PeerTerm):
    """Online distillation from the peers' ensemble (Guo et al., "Online Knowledge Distillation via Collaborative
    Learning", CVPR 2020): for each peer ``k``, ``{"kd_peer<k>": T² · KL(softmax(t/T) ‖ softmax(z_k/T))}``, the KL
    summed over classes and averaged over the batch (:func:`~lightning_kd.losses.kd_loss`), ``t`` the ensemble
    teacher built from the detached logits of all peers: ``"min_logit"``
    (:func:`~lightning_kd.losses.online.min_logit_ensemble`, ``t_c = min_k (z_{k,c} − z_{k,y})``, reads the labels)
    or ``"mean_logit"`` (:func:`~lightning_kd.losses.online.mean_logit_ensemble`, ``t = mean_k z_k``). T=3 is ONE's
    (Lan et al., NeurIPS 2018).

    Args:
        ensemble: ``"min_logit"`` or ``"mean_logit"``.
        temperature: softening temperature T of teacher and peers.
        weight, warmup_epochs, standardize: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    def __init__(self, ensemble: str = "min_logit", temperature: float = 3.0, **kwargs):
        super().__init__(**kwargs)
        if ensemble not in ENSEMBLES:
            raise ValueError(f"unknown ensemble {ensemble!r}: use one of {', '.join(map(repr, ENSEMBLES))}")
        self.ensemble, self.temperature = ensemble, temperature

    def ensemble_teacher(self, peer_logits: list[Tensor], target: Tensor) -> Tensor:
        """The teacher's logits from the peers' logits (detached)."""
        detached = [logits.detach() for logits in peer_logits]
        if self.ensemble == "min_logit":
            return min_logit_ensemble(detached, target)
        return mean_logit_ensemble(detached)

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        peer_logits = self.peer_logits(student_out)
        teacher = self.ensemble_teacher(peer_logits, batch.target)
        return {f"kd_peer{index}": kd_loss(logits, teacher, self.temperature)
                for index, logits in enumerate(peer_logits)}
