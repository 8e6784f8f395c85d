"""The simulated evaluation: every exit on every sample, and the anytime accuracy of each exit.

``collect_exit_outputs`` runs the model's full forward over a dataset and keeps, per exit and sample,
the confidence (max softmax probability) and the predicted class. Budgeted evaluation
(``dfs_kernels.inference.budgeted``) then decides after the fact where each sample would have left;
the early-exit runner (``dfs_kernels.inference.early_exit``) makes the same decisions while running.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..multi_exit import final_logits


def exit_confidences(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max softmax probability as float64, argmax) per row of ``logits`` [N, classes].

    The softmax runs in float64: in float32 a confident exit saturates at exactly 1.0 for many samples,
    and those ties would make thresholds unable to separate them."""
    confidence, prediction = torch.softmax(logits.double(), dim=1).max(dim=1)
    return confidence, prediction


def check_eval_mode(model: nn.Module) -> None:
    """ValueError unless ``model`` is in eval mode (BatchNorm must use its running statistics)."""
    if model.training:
        raise ValueError("inference needs the model in eval mode: call model.eval() first")


@dataclass
class ExitOutputs:
    """Per exit and sample: ``confidences`` [K, N] float64, ``predictions`` [K, N]; ``labels`` [N]."""

    confidences: torch.Tensor
    predictions: torch.Tensor
    labels: torch.Tensor

    @property
    def num_exits(self) -> int:
        return self.confidences.shape[0]

    def correct(self) -> torch.Tensor:
        """[K, N] bool: exit k classifies sample n correctly."""
        return self.predictions == self.labels


@torch.inference_mode()
def collect_exit_outputs(model: nn.Module, dataset: Dataset, *, batch_size: int = 256,
                         progress: bool = False) -> ExitOutputs:
    """Runs ``model`` (in eval mode) on every (image, label) of ``dataset`` in batches, on the device
    of its parameters; the outputs are on the CPU. The last output may be a library model's own
    (``MultiExitModel``): its logits are read with ``final_logits``."""
    check_eval_mode(model)
    device = next(model.parameters()).device
    confidences, predictions, labels = [], [], []
    for images, batch_labels in tqdm(DataLoader(dataset, batch_size=batch_size), desc="all exits",
                                     disable=not progress, leave=False):
        outputs = model(images.to(device))
        pairs = [exit_confidences(logits) for logits in [*outputs[:-1], final_logits(outputs[-1])]]
        confidences.append(torch.stack([confidence for confidence, _ in pairs]).cpu())
        predictions.append(torch.stack([prediction for _, prediction in pairs]).cpu())
        labels.append(batch_labels)
    return ExitOutputs(torch.cat(confidences, dim=1), torch.cat(predictions, dim=1), torch.cat(labels))


def anytime_accuracy(outputs: ExitOutputs) -> list[float]:
    """Accuracy (%) of every exit when all samples leave there."""
    return (outputs.correct().double().mean(dim=1) * 100).tolist()
