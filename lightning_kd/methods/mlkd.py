from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import MLKDTerm


class MLKD(DistillationModule):
    """Multi-level logit distillation (Jin et al., "Multi-Level Logit Distillation", CVPR 2023).

    One view (the batch the data module gives): ``loss = ce_weight · CE + kd_weight · Σ_T [f_B · (T² · KL +
    batch-correlation term) + f_C · class-correlation term]`` (``"ce"`` and ``"mlkd"``): instance-level KD and the
    alignment of the teacher's and student's sample-by-sample (B × B) and class-by-class (C × C) prediction
    correlations, summed over the temperatures 2–6, with the official confidence masks, which scale the instance and
    batch terms by the kept fraction of samples ``f_B`` and the class term by the kept fraction of classes ``f_C``
    (about 1/2 each; see :func:`lightning_kd.losses.logit_refined.mlkd_loss` for the reductions). This is also the
    single-view variant that the RLD authors use as their MLKD baseline without augmentation (``MLKD_NOAUG`` in
    ``zju-SWJ/RLD``).

    Two views, the official method (``KD_ours.forward_train`` of ``Jin-Ying/Multi-Level-Logit-Distillation``), when
    ``batch.views`` holds a ``"strong"`` (RandAugment) view of the same samples, as
    :class:`~lightning_kd.data.views.StrongViewDataModule` gives: teacher and student also run on the strong view
    (the teacher frozen, through :meth:`forward_teacher`), and two terms join the weak-view ones above:
    ``"mlkd_strong" = kd_weight · Σ_T T² · KL``, an unmasked instance KD, and ``"ce_strong" = ce_weight ·
    CE(strong)``. The official code takes the ``T²·KL`` of the temperatures 3, 4 and 5 on the strong view and those of
    2 and 6 on the weak view (``strong_temperatures``); it computes correlation terms on the strong view but leaves
    them out of the loss, so they are not computed here. The masks come from the teacher's weak-view predictions.
    KL is summed over classes and averaged over the batch, the CE terms are batch means.

    Defaults temperatures (2, 3, 4, 5, 6), kd_weight 0.9 for every level and view and CE 0.1 are the official
    CIFAR-100 setting (``CFG.KD`` of the official code: temperature 4 plus 2, 3, 5, 6; ``KD_WEIGHT`` 0.9,
    ``CE_WEIGHT`` 0.1).

    Args:
        temperatures: the temperatures the losses are summed over.
        kd_weight: weight of the multi-level term (each level alike, as in the official code).
        ce_weight: weight of the cross-entropy with the labels (on each view).
        strong_temperatures: with a strong view, the temperatures (among ``temperatures``) whose unmasked instance
            KD reads the strong view; the others read the weak view. ``temperatures`` puts every one on the strong
            view.
    """

    def __init__(self, *args, temperatures: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0), kd_weight: float = 0.9,
                 ce_weight: float = 0.1, strong_temperatures: tuple[float, ...] = (3.0, 4.0, 5.0), **kwargs):
        term = MLKDTerm(temperatures, strong_temperatures, weight=kd_weight)  # checks the temperatures first
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("mlkd", term)
