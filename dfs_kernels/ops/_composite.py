"""The DFS gradients written with differentiable ATen ops.

The kernels compute each backward once, fast, and are not themselves differentiable. When a
backward is recorded (``create_graph=True``: double backward, gradient penalties, Hessian-vector
products) or an op is called inside a ``torch.func`` transform, the same values come from these
formulas instead, which autograd differentiates to any order. They do the full input-gradient work
(the saving DFS makes is a first-order one) and are used only there.
"""

from __future__ import annotations

import torch


def shared_mask(channels: int, split: int, device: torch.device, dims: int) -> torch.Tensor:
    """[1, C, 1, ...] (``dims`` dimensions) boolean: channel index < ``split``."""
    mask = torch.arange(channels, device=device) < split
    return mask.view(1, channels, *([1] * (dims - 2)))


def merge_channels(head: torch.Tensor | None, tail: torch.Tensor | None, split: int) -> torch.Tensor:
    """Channels [0, split) of ``head`` and [split, C) of ``tail``, a missing one read as zeros."""
    like = head if head is not None else tail
    mask = shared_mask(like.shape[1], split, like.device, like.dim())
    if head is None:
        return torch.where(mask, torch.zeros((), dtype=tail.dtype, device=tail.device), tail)
    if tail is None:
        return torch.where(mask, head, torch.zeros((), dtype=head.dtype, device=head.device))
    return torch.where(mask, head, tail)


def exit_avg_pool_backward(grad_pooled: torch.Tensor, input_size, shared_channels: int) -> torch.Tensor:
    """``grad_pooled`` [N, C] / (H * W) spread over H, W on channels [Cp, C); zeros on [0, Cp)."""
    n, c, h, w = input_size
    spread = (grad_pooled / (h * w))[:, :, None, None].expand(n, c, h, w)
    return merge_channels(None, spread, shared_channels)


def referenced_mean(grad: torch.Tensor, shared_channels: int) -> torch.Tensor:
    """The adjoint of ``exit_avg_pool_backward``: mean of ``grad`` over H, W on [Cp, C), zeros on [0, Cp)."""
    return merge_channels(None, grad.mean(dim=(2, 3)), shared_channels)


def conv_grads(grad_output, grad_pooled, input, weight, bias_sizes, stride, padding, dilation, groups,
               shared_channels, needs_input, needs_weight, needs_bias):
    """(grad_input, grad_weight, grad_bias) of a partitioned convolution (and, with ``grad_pooled``, of
    the exit of a DFS stage): the convolution's input gradient kept on [0, Cp) only."""
    conv_input_grad = grad_weight = grad_bias = None
    if grad_output is not None and (needs_input or needs_weight or needs_bias):
        # The weight gradient reads [x+, sg(x-)]: no derivative of any order reaches x- through it.
        partitioned = merge_channels(input, input.detach(), shared_channels)
        conv_input_grad, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_output, partitioned, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups,
            [needs_input, needs_weight, needs_bias],
        )
    grad_input = None
    if needs_input:  # at least one of the two is given (the caller returns early when neither output was used)
        exit_grad = None if grad_pooled is None else exit_avg_pool_backward(grad_pooled, input.shape, shared_channels)
        grad_input = merge_channels(conv_input_grad, exit_grad, shared_channels)
    return grad_input, grad_weight, grad_bias


def input_grad_adjoint(grad, grad_output, weight, stride, padding, dilation, groups, shared_channels,
                       needs_grad_output, needs_weight, needs_grad_pooled):
    """The gradients of ``partitioned_conv2d_input_grad``'s output (``grad``, shaped like the input) with
    respect to its grad_output, weight and grad_pooled: the op is ``mask * conv_transpose(grad_output,
    weight) + (1 - mask) * broadcast(grad_pooled)``, linear in grad_output and grad_pooled."""
    masked = merge_channels(grad, None, shared_channels)
    grad_grad_output = grad_weight = grad_grad_pooled = None
    if needs_grad_output:
        grad_grad_output = torch.ops.aten.convolution(
            masked, weight, None, stride, padding, dilation, False, [0, 0], groups
        )
    if needs_weight:
        grad_weight = torch.ops.aten.convolution_backward(
            grad_output, masked, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [False, True, False],
        )[1]
    if needs_grad_pooled:
        grad_grad_pooled = referenced_mean(grad, shared_channels)
    return grad_grad_output, grad_weight, grad_grad_pooled


def merge_features(tensor: torch.Tensor, split: int, head, tail) -> torch.Tensor:
    """``head`` on features [0, split) of ``tensor``'s last axis, ``tail`` on the others (broadcast)."""
    mask = torch.arange(tensor.shape[-1], device=tensor.device) < split
    return torch.where(mask, head, tail)


def linear_grads(grad_output, input, weight, shared_features, needs_input, needs_weight, needs_bias):
    """(grad_input, grad_weight, grad_bias) of a partitioned linear layer: the input gradient kept on
    features [0, Cp) only, the weight gradient read from ``[x+, sg(x-)]``."""
    zero = torch.zeros((), dtype=grad_output.dtype, device=grad_output.device)
    grad_input = grad_weight = grad_bias = None
    if needs_input:
        grad_input = merge_features(input, shared_features, grad_output.matmul(weight), zero)
    if needs_weight:
        partitioned = merge_features(input, shared_features, input, input.detach())
        grad_weight = grad_output.reshape(-1, weight.shape[0]).t().mm(partitioned.reshape(-1, weight.shape[1]))
    if needs_bias:
        grad_bias = grad_output.reshape(-1, weight.shape[0]).sum(0)
    return grad_input, grad_weight, grad_bias


def linear_input_grad_adjoint(grad, grad_output, weight, shared_features, needs_grad_output, needs_weight):
    """The gradients of ``partitioned_linear_input_grad``'s output (``grad``, shaped like the input) with
    respect to its grad_output and weight: the op is ``mask * (grad_output @ weight)``, linear in both."""
    masked = merge_features(grad, shared_features, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    grad_grad_output = masked.matmul(weight.t()) if needs_grad_output else None
    grad_weight = None
    if needs_weight:
        grad_weight = grad_output.reshape(-1, weight.shape[0]).t().mm(masked.reshape(-1, weight.shape[1]))
    return grad_grad_output, grad_weight
