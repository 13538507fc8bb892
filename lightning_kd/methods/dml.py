"""Online distillation: peers trained together from scratch that teach each other, and Deep Mutual Learning."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_kd.methods.base import Batch, DistillationModule, ModelOutput
from lightning_kd.terms.online import DMLTerm


@dataclass
class PeerOutput(ModelOutput):
    """The student's output (peer 0) plus every peer's logits, in order, in ``peer_logits``."""

    peer_logits: list[Tensor] = field(default_factory=list)


class OnlineDistillationModule(DistillationModule):
    """Peers trained together from scratch, each with cross-entropy plus what it learns from the others; no
    pre-trained teacher. A method adds terms that read every peer's logits (``student_out.peer_logits``, e.g.
    :class:`~lightning_kd.terms.online.DMLTerm`), or overrides :meth:`peer_losses`.

    Peer 0 is ``student`` (so ``forward``, ``predict`` and the base's ``val/acc``, ``val/ece`` ... are peer 0's);
    peers 1 … N-1 are ``peers`` (``self.peers[i - 1]``, ``peers.<i - 1>.*`` in checkpoints). Every peer has the same
    ``ce_weight`` and gets its cross-entropy logged as ``train/loss_ce`` (peer 0) and ``train/loss_ce_peer<i>``. All
    peers are optimized by the one optimizer in one step. Validation logs ``val/acc_peer<i>`` for each peer and
    ``val/acc_ensemble`` for the mean of their softmax probabilities (likewise ``test/``); each validation epoch
    stores the peers' accuracies in the ``peer_val_acc`` buffer (saved in checkpoints, NaN before the first
    validation), and :meth:`best_peer` / :meth:`export_student` use it. ``channels_last`` and ``compile`` apply to
    every peer. A teacher, if given, is only measured against (agreement, KL), as with
    :class:`~lightning_kd.methods.supervised.Supervised`.

    Args:
        student: peer 0, an ``nn.Module`` or a model name.
        peers: the other peers, model names or ``nn.Module`` s (at least one; they must be distinct modules).
            ``None``: one more model of the student's name, i.e. the usual pair of identical, differently
            initialised networks. Peers given as modules are not hyper-parameters: pass them again to
            ``load_from_checkpoint``.
    """

    requires_teacher = False

    def __init__(self, student: str | nn.Module, teacher: str | nn.Module | None = None, *,
                 peers: list[str | nn.Module] | None = None, **kwargs):
        super().__init__(student, teacher, **kwargs)
        name = type(self).__name__
        if peers is None:
            if not isinstance(student, str):
                raise ValueError(f"{name} was given the student as an nn.Module and no peers: pass "
                                 "peers=[<model name or nn.Module>, ...] (at least one more peer)")
            peers = [student]
        if isinstance(peers, (str, nn.Module)):
            raise ValueError(f"{name} takes the peers as a list: pass peers=[{peers!r}]")
        if len(peers) < 1:
            raise ValueError(f"{name} trains at least 2 peers, but got the student alone (peers=[]): pass one or "
                             "more model names or nn.Modules besides the student, e.g. peers=['resnet32']")
        if any(isinstance(peer, nn.Module) for peer in peers):
            for hparams in (self._hparams, self._hparams_initial):  # modules go into the state_dict only
                hparams.pop("peers", None)
        self.peers = nn.ModuleList(self._build(peer, self.num_classes, self.hparams.in_chans) for peer in peers)
        if len({id(model) for model in self.peer_models()}) < self.num_peers:
            raise ValueError(f"{name} got the same nn.Module as two peers: the peers must be distinct models "
                             "(build each one separately)")
        self.register_buffer("peer_val_acc", torch.full((self.num_peers,), float("nan")))
        self.peer_metrics = nn.ModuleDict({stage: self._make_peer_metrics() for stage in ("val", "test")})
        self._peers_checked = False
        self._eval_peer_logits: list[Tensor] | None = None

    def _make_peer_metrics(self) -> nn.ModuleDict:
        names = [f"acc_peer{i}" for i in range(self.num_peers)] + ["acc_ensemble"]
        return nn.ModuleDict({name: MulticlassAccuracy(self.num_classes, average="micro") for name in names})

    # ------------------------------------------------------------------------------------------------- peers
    @property
    def num_peers(self) -> int:
        """N, the student included."""
        return 1 + len(self.peers)

    def peer_models(self) -> list[nn.Module]:
        """All N peers in order, the student first."""
        return [self.student, *self.peers]

    def peer(self, index: int) -> nn.Module:
        """Peer ``index``: 0 is the student, ``i >= 1`` is ``self.peers[i - 1]``."""
        if not 0 <= index < self.num_peers:
            raise IndexError(f"peer {index} does not exist: the peers are 0 to {self.num_peers - 1}")
        return self.peer_models()[index]

    def best_peer(self) -> int:
        """The peer with the highest accuracy of the last validation epoch (the lowest index on ties); 0 before
        any validation."""
        accuracy = torch.nan_to_num(self.peer_val_acc, nan=-1.0)
        return int(accuracy.argmax())

    def export_peer(self, index: int, path: str | os.PathLike) -> None:
        """Save peer ``index``'s ``state_dict`` alone."""
        torch.save(self.peer(index).state_dict(), path)

    def export_student(self, path: str | os.PathLike) -> None:
        """Save the best peer's ``state_dict`` (:meth:`best_peer`, by the last validation accuracy; the student,
        peer 0, before any validation). Use :meth:`export_peer` for a given peer."""
        self.export_peer(self.best_peer(), path)

    def _check_peer_outputs(self, peer_logits: list[Tensor]) -> None:
        if self._peers_checked:
            return
        for index, logits in enumerate(peer_logits):
            if logits.dim() != 2 or logits.shape[-1] != self.num_classes:
                raise ValueError(f"peer {index} of {type(self).__name__} gives logits of shape {tuple(logits.shape)} "
                                 f"but num_classes is {self.num_classes}: every peer must output (batch, "
                                 f"{self.num_classes}) logits; build the peers with num_classes={self.num_classes}")
        self._peers_checked = True

    def forward_student(self, batch: Batch) -> PeerOutput:
        """Every peer's forward pass: the student's output, with all N peers' logits in ``peer_logits``."""
        out = super().forward_student(batch)
        x = self._input(batch.input)
        peers = [self._compiled.get(f"peer{i}", peer) for i, peer in enumerate(self.peers, start=1)]
        peer_logits = [out.logits, *(peer(x) for peer in peers)]
        self._check_peer_outputs(peer_logits)
        if not self.training:
            self._eval_peer_logits = peer_logits  # read by the evaluation step right after
        return PeerOutput(out.logits, out.features, peer_logits)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.get("channels_last"):
            for peer in self.peers:
                peer.to(memory_format=torch.channels_last)
        if self.hparams.get("compile"):
            for i, peer in enumerate(self.peers, start=1):
                self._compiled.setdefault(f"peer{i}", torch.compile(peer))

    # ------------------------------------------------------------------------------------------------ method
    def peer_losses(self, batch: Batch, peer_logits: list[Tensor]) -> dict[str, Tensor]:
        """Weighted losses by name from all N peers' logits, besides the terms' (none by default)."""
        return {}

    def distillation_losses(self, batch: Batch, student_out: PeerOutput,
                            teacher_out: ModelOutput | None) -> dict[str, Tensor]:
        """The other peers' cross-entropies (``ce_peer<i>``), the terms' losses and :meth:`peer_losses`."""
        peer_logits = student_out.peer_logits
        losses = {f"ce_peer{i}": self.hparams.ce_weight * self.cross_entropy(logits, batch.target)
                  for i, logits in enumerate(peer_logits) if i > 0}
        return {**losses, **super().distillation_losses(batch, student_out, teacher_out),
                **self.peer_losses(batch, peer_logits)}

    # ------------------------------------------------------------------------------------------- evaluation
    def _peer_evaluation_step(self, batch: Any, stage: str) -> None:
        peer_logits, self._eval_peer_logits = self._eval_peer_logits, None
        target = self.unpack_batch(batch).target
        metrics = self.peer_metrics[stage]
        for index, logits in enumerate(peer_logits):
            metrics[f"acc_peer{index}"].update(logits, target)
        metrics["acc_ensemble"].update(torch.stack([z.float().softmax(-1) for z in peer_logits]).mean(0), target)
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}", metric)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self._peer_evaluation_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self._peer_evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        metrics = self.peer_metrics["val"]
        if self.trainer.sanity_checking or not metrics["acc_peer0"].update_called:
            return
        # compute() gathers over all processes, so every process stores the same accuracies
        accuracy = [metrics[f"acc_peer{i}"].compute() for i in range(self.num_peers)]
        self.peer_val_acc.copy_(torch.stack(accuracy).to(self.peer_val_acc))


class DML(OnlineDistillationModule):
    """Deep Mutual Learning (Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018): N ≥ 2 peers trained
    from scratch together, each with its cross-entropy and the mean KL from the other peers' predictions.

    ``loss_k = CE(z_k, y) + kl_weight · 1/(N-1) · Σ_{l≠k} T² · KL(softmax(z_l/T) ‖ softmax(z_k/T))``, the KL
    summed over classes and averaged over the batch ("batchmean"), logged as ``train/loss_kl_peer<k>``. The other
    peers' logits are detached, so each peer is trained only by its own cross-entropy and its own KL terms
    (:func:`~lightning_kd.losses.online.mutual_learning_losses`). Defaults T=1 and weight 1 are the paper's (its
    objective for a cohort of K students).

    The paper updates the peers in turn, recomputing the predictions after each update (its Algorithm 1); here all
    peers are updated at once from the same forward pass by one optimizer step. With detached targets each peer
    still gets exactly the gradient of its own objective; only the targets are one update older for the later
    peers. This keeps one optimizer and one forward pass per peer and step, so learning-rate schedules, gradient
    accumulation and clipping, mixed precision and DDP work as for every other method; alternating updates would
    need an optimizer per peer, manual optimization and extra forward passes. All peers share the optimizer's
    settings; the paper's CIFAR-100 recipe (SGD with Nesterov momentum 0.9, lr 0.1 ÷10 every 60 epochs, 200
    epochs, batch 64) is a config away.

    The loss is the term :class:`~lightning_kd.terms.online.DMLTerm` (``terms.kl``).

    Args:
        kl_weight: weight of each peer's mutual-learning term.
        temperature: softening temperature T of the KL, with the T² factor (1 in the paper).
    """

    def __init__(self, *args, kl_weight: float = 1.0, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_term("kl", DMLTerm(temperature, weight=kl_weight))
