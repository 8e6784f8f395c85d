"""Per-exit training losses of multi-exit networks (docs/models.md, "Losses").

An ``ExitLoss`` maps the model's outputs to one loss term per exit, shallow to deep. The strategies
need the terms separately (BDL routes each exit's gradient on its own, GD projects per-exit
gradients); their sum is the training loss. Exit k's term sends gradient only into exit k's logits
and features: every cross-exit reference (the distillation teacher) goes through a stop-gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class ExitLoss:
    """Base of the losses: ``loss(logits, features, labels)`` -> list of scalar tensors, one per exit.

    Args of ``__call__``:
        logits: one [N, num_classes] tensor per exit, shallow to deep.
        features: the model's distillation features (one [N, ...] tensor per exit, the last being the
            final feature) or None when the model has none.
        labels: [N] class indices.
    """

    def __call__(self, logits: Sequence[torch.Tensor], features: Sequence[torch.Tensor] | None,
                 labels: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError


class DeepSupervisionLoss(ExitLoss):
    """DSN / DFS: exit k's term is CE(z_k, y); the training loss L = CE(z_L) + sum_{i<L} CE(z_i)."""

    def __call__(self, logits, features, labels):
        return [F.cross_entropy(exit_logits, labels) for exit_logits in logits]


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KD = -mean_n sum_c softmax(teacher / T) * log_softmax(student / T), without the T^2 factor.
    Both [N, num_classes]; the teacher is used as given (callers pass it detached)."""
    teacher = F.softmax(teacher_logits / temperature, dim=1)
    return -(teacher * F.log_softmax(student_logits / temperature, dim=1)).sum(dim=1).mean()


class SelfDistillationLoss(ExitLoss):
    """BYOT-style self-distillation; combinable with DFS (the loss does not depend on the flavour).

    The final exit's term is CE(z_L, y). Early exit i's term is
    ``(1 - gamma) * CE(z_i, y) + gamma * KD(z_i, sg(z_L)) + feature_weight * ||h_i - sg(h_L)||_2``,
    the feature term only when the model returns features (ResNet-18's adaptation outputs); the norm is
    the Euclidean norm of the whole [N, D] difference, neither squared nor averaged.

    Args:
        gamma: weight of the distillation term against the label term (0.9 by default; the ResNet-18
            recipe uses 0.3).
        temperature: softmax temperature T of the distillation term.
        feature_weight: lambda of the feature term; 0 switches it off.
    """

    def __init__(self, gamma: float = 0.9, temperature: float = 3.0, feature_weight: float = 0.03) -> None:
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if feature_weight < 0:
            raise ValueError(f"feature_weight must be non-negative, got {feature_weight}")
        self.gamma, self.temperature, self.feature_weight = gamma, temperature, feature_weight

    def __call__(self, logits, features, labels):
        teacher_logits = logits[-1].detach()
        use_features = features is not None and self.feature_weight > 0
        if use_features and len(features) != len(logits):
            raise ValueError(f"expected one feature per exit ({len(logits)}), got {len(features)}")
        teacher_feature = features[-1].detach() if use_features else None
        terms = []
        for index, exit_logits in enumerate(logits[:-1]):
            term = (1.0 - self.gamma) * F.cross_entropy(exit_logits, labels)
            term = term + self.gamma * distillation_kl(exit_logits, teacher_logits, self.temperature)
            if use_features:
                term = term + self.feature_weight * torch.linalg.vector_norm(features[index] - teacher_feature)
            terms.append(term)
        terms.append(F.cross_entropy(logits[-1], labels))
        return terms
