from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import CRDTerm, KDTerm
from lightning_kd.terms.contrastive import NEGATIVE_SAMPLING  # noqa: F401  (imported from here before)


class CRD(DistillationModule):
    """Contrastive representation distillation (Tian et al., "Contrastive Representation Distillation", ICLR 2020).

    ``loss = ce_weight · CE + crd_weight · [nce(s, M_t) + nce(t, M_s)] + kd_weight · T² · KL``: the contrastive term
    :class:`~lightning_kd.terms.CRDTerm` (trainable linear heads on the pooled embeddings, one memory bank per side
    with one row per training sample, NCE against ``num_negatives`` negatives; see there) plus, with ``kd_weight``,
    a :class:`~lightning_kd.terms.KDTerm`.

    Defaults: the CIFAR-100 setting of the paper's RepDistiller code (``train_student.py --distill crd -r 1 -a 0
    -b 0.8``: CE 1, no KD, CRD 0.8; ``feat_dim=128``, ``nce_k=16384``, ``nce_t=0.07``, ``nce_m=0.5``,
    ``mode='exact'``: the positive is the sample itself). CRD+KD is ``kd_weight=1`` (``-a 1``, KD temperature 4).
    Negatives are drawn as the reference's CIFAR-100 sampler does (``negatives="other_class"``): uniformly among
    the training samples of the other classes, distinct when there are enough, with replacement otherwise;
    ``"uniform"`` draws among all other samples instead.

    CRD needs each training sample's index: batches ``(input, target, index)``. With ``index_data`` (default) and
    a data module that keeps its splits in ``datasets`` (every :class:`~lightning_kd.data.SplitDataModule`), the
    training split gets its indices at ``setup`` (:func:`~lightning_kd.data.indexed.index_training_split`);
    otherwise wrap the data yourself (:class:`~lightning_kd.data.IndexedDataModule`,
    :class:`~lightning_kd.data.IndexedDataset`). The heads are built from one dry forward pass on ``input_shape``
    (see :class:`~lightning_kd.methods.DistillationModule`).

    Args:
        crd_weight: weight of the contrastive loss.
        ce_weight: weight of the cross-entropy with the labels.
        kd_weight: weight of a KD term on the logits (0: plain CRD; 1: CRD+KD).
        kd_temperature: temperature of the KD term.
        embedding_dim: size of the embedding heads' output and of the memory rows.
        num_negatives: negatives per sample (``K``).
        nce_temperature: temperature of the contrast scores.
        memory_momentum: weight of the stored row in the memory update.
        negatives: ``"other_class"`` or ``"uniform"``, see above.
        student_layer: module name of the student's feature, instead of its embedding.
        teacher_layer: module name of the teacher's feature, instead of its embedding.
        num_samples: size N of the training set, the memory banks' rows: here when given, else in ``setup`` from
            the training data (then stored in the hyper-parameters).
        index_data: give the training split of a ``datasets``-keeping data module the sample indices at ``setup``.
    """

    def __init__(self, *args, crd_weight: float = 0.8, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 kd_temperature: float = 4.0, embedding_dim: int = 128, num_negatives: int = 16384,
                 nce_temperature: float = 0.07, memory_momentum: float = 0.5, negatives: str = "other_class",
                 student_layer: str | None = None, teacher_layer: str | None = None, num_samples: int | None = None,
                 index_data: bool = True, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("crd", CRDTerm(embedding_dim, num_negatives, nce_temperature, memory_momentum, negatives,
                                     student_layer, teacher_layer, num_samples, index_data, weight=crd_weight))
        if kd_weight:
            self.add_term("kd", KDTerm(kd_temperature, weight=kd_weight))

    @property
    def contrastive(self) -> CRDTerm:
        """The contrastive term: heads, memory banks, NCE constants and negatives sampling."""
        return self.terms["crd"]


def _from_term(name: str) -> property:
    return property(lambda self: getattr(self.terms["crd"], name),
                    doc=f"The contrastive term's ``{name}`` (:class:`~lightning_kd.terms.CRDTerm`).")


for _name in ("student_head", "teacher_head", "student_memory", "teacher_memory", "nce_normalizers", "train_targets",
              "embed", "contrast_index", "update_memory", "build_memory"):
    setattr(CRD, _name, _from_term(_name))
