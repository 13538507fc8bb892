"""The feature-access interface every registered model implements."""

from __future__ import annotations

from torch import nn


class ZooModel(nn.Module):
    """Base of the registered models: names the modules a feature method hooks, and the classifier.

    * :meth:`stage_names` gives the names (as in ``named_modules()``) of the modules whose forward outputs are the
      stage features, stem first, in the order of RepDistiller's ``is_feat=True`` list (without the pooled
      embedding); ``stage_names(preact=True)`` those of its ``preact=True`` list.
    * ``embedding_name`` names the module whose output is the pooled ``(N, C)`` embedding fed to the classifier.
    * ``classifier_name`` names the final ``nn.Linear``; :meth:`get_classifier` returns it.

    Subclasses fill ``_stages`` and ``_preact_stages`` in ``__init__``.
    """

    classifier_name = "fc"
    embedding_name = "avgpool"

    def __init__(self) -> None:
        super().__init__()
        self._stages: list[str] = []
        self._preact_stages: list[str] = []

    def stage_names(self, preact: bool = False) -> list[str]:
        """Module names whose outputs are the stage features (pre-activation ones with ``preact``)."""
        return list(self._preact_stages if preact else self._stages)

    def get_classifier(self) -> nn.Linear:
        """The final linear layer."""
        return self.get_submodule(self.classifier_name)
