"""The literal oracle for ``dfs_kernels.multi_exit``: forward hooks that split, detach and concatenate,
written independently of the package (no dfs_kernels op), and a comparison of outputs and of every
parameter's gradient between a ``MultiExitModel`` and that oracle on a copy of the same model."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from dfs_kernels.testing import assert_close


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output, lambda tensor: tensor
    if isinstance(output, dict):
        key = next(iter(output))

        def rebuild(tensor):
            rebuilt = dict(output) if type(output) is dict else output.__class__(**output)
            rebuilt[key] = tensor
            return rebuilt
        return output[key], rebuild
    if hasattr(output, "_make"):  # a namedtuple
        return output[0], lambda tensor: output._make([tensor, *output[1:]])
    return output[0], lambda tensor: type(output)([tensor, *output[1:]])


def literal_forward(model: nn.Module, exits: list[str], heads: list[nn.Module], shared: list[int], dims: list[int],
                    *, exit_grad: str = "partitioned"):
    """``run(*args, **kwargs) -> [exit logits..., model output]`` with DFS at each exit point written
    literally: downstream reads cat(y+, sg(y-)), head k reads cat(sg(y+), y-) (y itself under "all")."""
    collected = []

    def hook_for(k):
        def hook(module, args, output):
            y, rebuild = _first_tensor(output)
            cp, dim = shared[k], dims[k]
            plus, minus = y.split([cp, y.shape[dim] - cp], dim=dim)
            backbone = torch.cat([plus, minus.detach()], dim=dim)
            view = y if exit_grad == "all" else torch.cat([plus.detach(), minus], dim=dim)
            collected.append(heads[k](view))
            return rebuild(backbone)
        return hook

    modules = dict(model.named_modules())
    for k, name in enumerate(exits):
        modules[name].register_forward_hook(hook_for(k))

    def run(*args, **kwargs):
        collected.clear()
        output = model(*args, **kwargs)
        return [*collected, output]
    return run


def _loss(outputs) -> torch.Tensor:
    """A scalar that depends on every output element with a different weight, so that no gradient
    can be right by symmetry."""
    total = 0
    for leaf in tree_leaves(outputs):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            weights = torch.linspace(-1, 2, leaf.numel(), dtype=leaf.dtype, device=leaf.device).view_as(leaf)
            total = total + (leaf * weights).sum()
    return total


def _outputs_and_grads(run, parameters: dict[str, nn.Parameter], args, kwargs, seed: int):
    for parameter in parameters.values():
        parameter.grad = None
    torch.manual_seed(seed)
    outputs = run(*args, **kwargs)
    _loss(outputs).backward()
    return outputs, {name: parameter.grad for name, parameter in parameters.items()}


def assert_matches_literal_dfs(wrapped, original: nn.Module, args=(), kwargs=None, *, dtype=torch.float64,
                               seed: int = 0) -> None:
    """Runs ``wrapped`` (a MultiExitModel of a model equal to ``original``) and the literal oracle on
    ``original`` with copies of the wrapper's heads, and asserts outputs and every gradient of the model's
    and the heads' parameters are equal (to ``dtype``'s tolerance; a None gradient compares as zeros)."""
    kwargs = kwargs or {}
    heads = copy.deepcopy(wrapped.heads)
    oracle = literal_forward(original, wrapped.exits, list(heads), wrapped.shared_channels, wrapped.dims,
                             exit_grad=wrapped.exit_grad)
    ours = dict(wrapped.named_parameters())
    theirs = {f"model.{name}": parameter for name, parameter in original.named_parameters()}
    theirs.update({f"heads.{name}": parameter for name, parameter in heads.named_parameters()})
    assert sorted(ours) == sorted(theirs), "the wrapper's parameter names differ from the model's and the heads'"
    actual_out, actual_grads = _outputs_and_grads(wrapped, ours, args, kwargs, seed)
    expected_out, expected_grads = _outputs_and_grads(oracle, theirs, args, kwargs, seed)
    actual_leaves, expected_leaves = tree_leaves(actual_out), tree_leaves(expected_out)
    assert len(actual_leaves) == len(expected_leaves)
    for i, (a, e) in enumerate(zip(actual_leaves, expected_leaves)):
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            assert_close(a, e, name=f"output leaf {i}", dtype=dtype)
    reached = 0
    for name, parameter in ours.items():
        assert_close(actual_grads[name], expected_grads[name], name=f"grad of {name}", dtype=dtype, like=parameter)
        reached += expected_grads[name] is not None
    assert reached > 0, "no parameter received a gradient: the comparison would prove nothing"
