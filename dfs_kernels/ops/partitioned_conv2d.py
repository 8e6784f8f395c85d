"""The partitioned-convolution family, for every backend prefix ("" = aten, "cudnn_", "triton_"):

- ``{prefix}partitioned_conv2d(input, weight, bias, stride, padding, dilation, groups, shared_channels)``:
  ``conv2d([x+, sg(x-)], weight, bias)``, whose forward is one convolution over every input channel.
- ``{prefix}partitioned_conv2d_with_exit_pool(...)`` (the same arguments): a DFS stage, one feature map
  feeding that convolution and an exit's pooled read ``mean([sg(x+), x-], (2, 3))``.
- ``{prefix}partitioned_conv2d_input_grad(grad_output, input, weight, stride, padding, dilation, groups,
  shared_channels, grad_pooled=None)``: the input gradient of channels [0, Cp) only, with channels
  [Cp, C) zero or, in a stage, the exit's pooled gradient spread over H, W: one tensor, one pass.
- ``triton_conv2d_weight_grad(grad_output, input, weight, stride, padding, dilation, groups, bias_grad)``
  (Triton only, the one backend with a weight-gradient kernel of its own): ``(dL/dW, dL/db)``. It has no
  derivative of its own (differentiating it raises an error saying what to differentiate instead).

Backward (one formula for every backend, written in C++ for "aten" and "cudnn": csrc/autograd/): the
weight and bias gradients in full (ATen's, that is oneDNN / cuDNN; Triton's own kernel for ``triton_``)
and the input gradient by the backend's ``..._input_grad``. The referenced channels' input gradient is never computed: that is the saving.
The input gradient is a tensor at every Cp (zeros at Cp = 0). A recorded backward
(``create_graph=True``) uses the differentiable formulas of ``_composite`` instead.
"""

from __future__ import annotations

import functools

import torch
from torch._prims_common import suggest_memory_format

from .. import _library
from . import _composite, _flops

FORWARD = "partitioned_conv2d"
STAGE = "partitioned_conv2d_with_exit_pool"
INPUT_GRAD = "partitioned_conv2d_input_grad"
WEIGHT_GRAD = "conv2d_weight_grad"  # only for the prefixes in _WEIGHT_AND_BIAS_GRADS

# Backends whose kernels give their outputs the input's layout; ATen's convolution chooses its own
# (it also looks at the weight), which its fake reproduces.
_OUTPUT_FOLLOWS_INPUT = ("triton_",)


def _op(prefix: str, name: str):
    return getattr(torch.ops.dfs_kernels, prefix + name)


# --- fakes -------------------------------------------------------------------------------------------


def _conv_fake(follows_input, input, weight, bias, stride, padding, dilation, groups, shared_channels):
    out = torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, False, [0, 0], groups)
    if follows_input:
        return out.contiguous(memory_format=suggest_memory_format(input))
    return out


def _stage_fake(follows_input, input, weight, bias, stride, padding, dilation, groups, shared_channels):
    conv = _conv_fake(follows_input, input, weight, bias, stride, padding, dilation, groups, shared_channels)
    return conv, input.new_empty((input.shape[0], input.shape[1]))


def _input_grad_fake(grad_output, input, weight, stride, padding, dilation, groups, shared_channels,
                     grad_pooled=None):
    return torch.empty_like(input, memory_format=suggest_memory_format(input))


def _weight_grad_fake(grad_output, input, weight, stride, padding, dilation, groups, bias_grad):
    return torch.empty_like(weight), weight.new_empty((weight.shape[0],) if bias_grad else (0,))


# --- autograd ------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, stride, padding, dilation, groups, shared_channels = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.shared_channels = shared_channels
    ctx.bias_sizes = None if bias is None else list(bias.shape)
    ctx.set_materialize_grads(False)  # a stage output that is not used sends None: never read, never made


def _weight_and_bias_grads_aten(grad_output, input, weight, bias_sizes, conv_args, needs_weight, needs_bias):
    stride, padding, dilation, groups = conv_args
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_output, input, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups,
        [False, needs_weight, needs_bias],
    )
    return grad_weight, grad_bias


def _weight_and_bias_grads_triton(grad_output, input, weight, bias_sizes, conv_args, needs_weight, needs_bias):
    if not needs_weight:
        return None, grad_output.sum(dim=(0, 2, 3))
    grad_weight, grad_bias = torch.ops.dfs_kernels.triton_conv2d_weight_grad(
        grad_output, input, weight, *conv_args, needs_bias
    )
    return grad_weight, grad_bias if needs_bias else None


_WEIGHT_AND_BIAS_GRADS = {"triton_": _weight_and_bias_grads_triton}


def _grads(conv_prefix, glue_prefix, ctx, grad_output, grad_pooled):
    if grad_output is None and grad_pooled is None:  # no output was used
        return None, None, None
    input, weight = ctx.saved_tensors
    cp = ctx.shared_channels
    needs_input, needs_weight = ctx.needs_input_grad[:2]
    needs_bias = ctx.needs_input_grad[2] and ctx.bias_sizes is not None
    if torch.is_grad_enabled():  # create_graph: a backward that can itself be differentiated
        return _composite.conv_grads(
            grad_output, grad_pooled, input, weight, ctx.bias_sizes, *ctx.conv_args, cp,
            needs_input, needs_weight, needs_bias,
        )
    grad_input = grad_weight = grad_bias = None
    if needs_input:
        if grad_output is not None:
            grad_input = _op(conv_prefix, INPUT_GRAD)(grad_output, input, weight, *ctx.conv_args, cp, grad_pooled)
        else:  # only the exit of a stage was used
            grad_input = _op(glue_prefix, "exit_avg_pool_backward")(
                grad_pooled, list(input.shape), cp, suggest_memory_format(input) == torch.channels_last
            )
    if grad_output is not None and (needs_weight or needs_bias):
        weight_and_bias_grads = _WEIGHT_AND_BIAS_GRADS.get(conv_prefix, _weight_and_bias_grads_aten)
        grad_weight, grad_bias = weight_and_bias_grads(
            grad_output, input, weight, ctx.bias_sizes, ctx.conv_args, needs_weight, needs_bias
        )
    return grad_input, grad_weight, grad_bias


def _conv_backward(conv_prefix, glue_prefix, ctx, grad_output):
    return (*_grads(conv_prefix, glue_prefix, ctx, grad_output, None), None, None, None, None, None)


def _stage_backward(conv_prefix, glue_prefix, ctx, grad_output, grad_pooled):
    return (*_grads(conv_prefix, glue_prefix, ctx, grad_output, grad_pooled), None, None, None, None, None)


def _input_grad_setup_context(ctx, inputs, output) -> None:
    grad_output, input, weight, stride, padding, dilation, groups, shared_channels, grad_pooled = inputs
    ctx.save_for_backward(grad_output, weight)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.shared_channels = shared_channels


def _input_grad_backward(ctx, grad):
    grad_output, weight = ctx.saved_tensors
    needs_grad_output, _, needs_weight = ctx.needs_input_grad[:3]
    # The dispatcher drops an argument equal to its default: without grad_pooled there are 8 inputs.
    needs_grad_pooled = len(ctx.needs_input_grad) > 8 and ctx.needs_input_grad[8]
    grad_grad_output, grad_weight, grad_grad_pooled = _composite.input_grad_adjoint(
        grad, grad_output, weight, *ctx.conv_args, ctx.shared_channels,
        needs_grad_output, needs_weight, needs_grad_pooled,
    )
    grads = (grad_grad_output, None, grad_weight, None, None, None, None, None, grad_grad_pooled)
    return grads[:len(ctx.needs_input_grad)]


def _weight_grad_backward(conv_prefix, ctx, *grads):
    raise NotImplementedError(
        f"dfs_kernels::{conv_prefix}{WEIGHT_GRAD} has no derivative of its own: differentiate "
        f"dfs_kernels::{conv_prefix}{FORWARD}, whose recorded backward (create_graph=True) is differentiable"
    )


# --- registration --------------------------------------------------------------------------------


def register(conv_prefix: str, glue_prefix: str) -> None:
    """Fakes, autograd and FLOP formulas of ``dfs_kernels::{conv_prefix}partitioned_conv2d`` and its
    stage and input-gradient ops (and of its weight-gradient op, for a backend that has one); a stage
    whose convolution output is unused takes the exit's gradient from ``{glue_prefix}exit_avg_pool_backward``."""
    follows_input = conv_prefix in _OUTPUT_FOLLOWS_INPUT
    names = {name: f"dfs_kernels::{conv_prefix}{name}" for name in (FORWARD, STAGE, INPUT_GRAD)}
    torch.library.register_fake(names[FORWARD], functools.partial(_conv_fake, follows_input))
    torch.library.register_fake(names[STAGE], functools.partial(_stage_fake, follows_input))
    torch.library.register_fake(names[INPUT_GRAD], _input_grad_fake)
    for name, backward in ((FORWARD, _conv_backward), (STAGE, _stage_backward)):
        if not _library.has_autograd_kernel(names[name]):  # "aten" and "cudnn": C++ (csrc/autograd/)
            torch.library.register_autograd(
                names[name], functools.partial(backward, conv_prefix, glue_prefix), setup_context=_setup_context
            )
    torch.library.register_autograd(names[INPUT_GRAD], _input_grad_backward, setup_context=_input_grad_setup_context)
    if conv_prefix in _WEIGHT_AND_BIAS_GRADS:
        weight_grad = f"dfs_kernels::{conv_prefix}{WEIGHT_GRAD}"
        torch.library.register_fake(weight_grad, _weight_grad_fake)
        torch.library.register_autograd(weight_grad, functools.partial(_weight_grad_backward, conv_prefix))
    _flops.register_conv_flops(
        forward=[_op(conv_prefix, FORWARD), _op(conv_prefix, STAGE)], input_grad=[_op(conv_prefix, INPUT_GRAD)]
    )
