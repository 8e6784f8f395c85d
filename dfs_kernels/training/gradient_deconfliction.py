"""Gradient deconfliction (Wang & Li, ICIP 2020) with the PCGrad rule.

Per step: g_k, exit k's gradient on the *shared* parameters, as one flat vector over all of them.
A parameter is shared when at least two exits' gradients on it are non-zero: walking the autograd
graph alone would also count fused DFS ops, whose single node links an exit to the next conv's
weight with an exactly-zero gradient. For each exit i, in an order over the other exits j, whenever
g_i . g_j < 0: ``g_i <- g_i - (g_i . g_j / ||g_j||^2) g_j`` (g_i the running, projected vector;
g_j the original). The shared gradient is the sum of the projected g_i; parameters that one exit
alone reaches keep that exit's plain gradient.

Memory: the forward graph exists once and is retained across the K per-exit
``torch.autograd.grad`` calls (released by the last); gradients on parameters that the graph lets
only one exit reach go straight into ``.grad``. The extra storage is the [K, P_candidates] matrix of
per-exit gradients on the parameters that at least two exits reach in the graph (which the rule
needs), a copy of its truly shared columns, and one projected [P_shared] row at a time.

AMP: gradients are those of the scaled losses. The rule is positively homogeneous (scaling every
g_k by s scales the result by s), so projecting the scaled gradients gives exactly the scaled
projected gradient, and ``scaler.step`` unscales it as usual; a non-finite gradient makes the
result non-finite and the scaler skips the step.

DDP: the matrix of per-exit shared gradients is averaged across ranks *before* projecting, so the
rule sees the global batch's per-exit gradients (projecting per rank and averaging would not be the
same); the random order comes from the strategy's own generator, seeded identically on every rank.
"""

from __future__ import annotations

import torch

from .losses import ExitLoss
from .strategies import StepResult, Strategy, accumulate_grad, average_across_ranks, scaled, unwrap

ORDERS = ("random", "fixed")


def project_conflicting(gradients: torch.Tensor, order: str = "random",
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """The PCGrad combination of per-exit gradients [K, P] -> [P].

    ``order``: "fixed" visits the other exits j in index order; "random" draws a fresh permutation for
    every exit i (as PCGrad does), from ``generator``.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    num_exits = gradients.shape[0]
    squared_norms = (gradients * gradients).sum(dim=1)
    combined = torch.zeros_like(gradients[0])
    for i in range(num_exits):
        projected = gradients[i].clone()
        visit = range(num_exits) if order == "fixed" else torch.randperm(num_exits, generator=generator).tolist()
        for j in visit:
            if j == i:
                continue
            dot = projected @ gradients[j]
            if dot < 0:  # a conflict implies g_j != 0, so the division is safe
                projected -= (dot / squared_norms[j]) * gradients[j]
        combined += projected
    return combined


def reached_parameters(loss: torch.Tensor, parameters: list[torch.Tensor]) -> set[int]:
    """Indices into ``parameters`` of those the autograd graph of ``loss`` reaches (walks grad_fn)."""
    index_of = {id(parameter): index for index, parameter in enumerate(parameters)}
    reached, seen, pending = set(), set(), [loss.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None and id(variable) in index_of:
            reached.add(index_of[id(variable)])
        pending.extend(next_node for next_node, _ in node.next_functions)
    return reached


class GradientDeconfliction(Strategy):
    """GD strategy (see the module docstring).

    Args:
        order: "random" (default, a fresh order per step and exit, as PCGrad) or "fixed" (index order).
        seed: seed of the random order's generator (identical on every rank under DDP).
        loss: per-exit terms (``DeepSupervisionLoss`` by default).
    """

    name = "gd"

    def __init__(self, order: str = "random", *, seed: int = 0, loss: ExitLoss | None = None) -> None:
        super().__init__(loss)
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.order = order
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def backward(self, model, images, labels, *, scaler=None):
        network = unwrap(model)
        logits, features = network(images, return_features=True)
        exit_losses = self.loss(logits, features, labels)
        parameters = [parameter for parameter in network.parameters() if parameter.requires_grad]
        reached = [reached_parameters(term, parameters) for term in exit_losses]
        reach_counts = [sum(index in exit_reached for exit_reached in reached) for index in range(len(parameters))]
        candidates = [index for index, count in enumerate(reach_counts) if count >= 2]
        segments, size = {}, 0
        for index in candidates:
            segments[index] = slice(size, size + parameters[index].numel())
            size += parameters[index].numel()
        per_exit = parameters[0].new_zeros((len(exit_losses), size))

        for k, term in enumerate(exit_losses):
            targets = sorted(reached[k])
            gradients = torch.autograd.grad(scaled(term, scaler), [parameters[i] for i in targets],
                                            retain_graph=k < len(exit_losses) - 1, allow_unused=True)
            for index, gradient in zip(targets, gradients):
                if index in segments:
                    if gradient is not None:
                        per_exit[k, segments[index]] = gradient.reshape(-1)
                else:
                    accumulate_grad(parameters[index], gradient)

        private = [p.grad for i, p in enumerate(parameters) if reach_counts[i] == 1 and p.grad is not None]
        average_across_ranks(model, [per_exit, *private])  # before deciding: every rank then agrees
        shared = []
        for index in candidates:
            exits_with_gradient = int(per_exit[:, segments[index]].ne(0).any(dim=1).sum())
            if exits_with_gradient >= 2:
                shared.append(index)
            else:  # one exit's plain gradient (the other rows are zero)
                accumulate_grad(parameters[index], per_exit[:, segments[index]].sum(0).view_as(parameters[index]))
        if shared:
            shared_gradients = torch.cat([per_exit[:, segments[index]] for index in shared], dim=1)
            del per_exit
            combined = project_conflicting(shared_gradients, self.order, self.generator)
            offset = 0
            for index in shared:
                parameter = parameters[index]
                accumulate_grad(parameter, combined[offset: offset + parameter.numel()].view_as(parameter))
                offset += parameter.numel()
        return StepResult.from_terms(exit_losses, logits)
