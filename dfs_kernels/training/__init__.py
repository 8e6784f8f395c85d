"""Training strategies for multi-exit networks.

A strategy turns a batch into populated ``.grad``s (``strategy.backward(model, images, labels,
scaler=None) -> StepResult``); the trainer does the rest (see ``strategies``). Registered names:

- ``"dsn"``: joint training, the sum of the exit losses (``JointTraining``).
- ``"dfs"``: the same loss on a model built with a DFS flavour (``DeepFeatureSurgery``).
- ``"byot"``: joint training with BYOT self-distillation (``SelfDistillationLoss``); pass
  ``loss=SelfDistillationLoss(...)`` to ``"dfs"``, ``"bdl"`` or ``"gd"`` to combine it with them.
- ``"bdl"``: block-dependent losses (``BlockDependentLosses``).
- ``"gd"``: gradient deconfliction with the PCGrad rule (``GradientDeconfliction``).
"""

from __future__ import annotations

from .block_dependent import BlockDependentLosses, blockwise_view, window_starts
from .gradient_deconfliction import GradientDeconfliction, project_conflicting
from .losses import DeepSupervisionLoss, ExitLoss, SelfDistillationLoss, distillation_kl
from .strategies import DeepFeatureSurgery, JointTraining, StepResult, Strategy


def _byot(*, gamma: float = 0.9, temperature: float = 3.0, feature_weight: float = 0.03) -> JointTraining:
    return JointTraining(SelfDistillationLoss(gamma, temperature, feature_weight))


STRATEGIES = {
    "dsn": JointTraining,
    "dfs": DeepFeatureSurgery,
    "byot": _byot,
    "bdl": BlockDependentLosses,
    "gd": GradientDeconfliction,
}
"""Registry of ``build_strategy`` names."""


def build_strategy(name: str, **kwargs) -> Strategy:
    """The strategy registered as ``name`` (see ``STRATEGIES``), built with its keyword arguments."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](**kwargs)


__all__ = [
    "STRATEGIES",
    "BlockDependentLosses",
    "DeepFeatureSurgery",
    "DeepSupervisionLoss",
    "ExitLoss",
    "GradientDeconfliction",
    "JointTraining",
    "SelfDistillationLoss",
    "StepResult",
    "Strategy",
    "blockwise_view",
    "build_strategy",
    "distillation_kl",
    "project_conflicting",
    "window_starts",
]
