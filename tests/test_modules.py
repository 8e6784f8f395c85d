"""PartitionedConv2d as a drop-in nn.Conv2d, its conversions, and convert() on a whole model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfs_kernels
from dfs_kernels import ExitHead, FeatureReroute, PartitionedConv2d, reference
from dfs_kernels.testing import assert_close


def test_shared_channels_from_beta_uses_bankers_rounding():
    assert PartitionedConv2d(5, 2, 1, beta=0.5).shared_channels == 2  # round(2.5) == 2
    assert PartitionedConv2d(7, 2, 1, beta=0.5).shared_channels == 4  # round(3.5) == 4
    assert PartitionedConv2d(64, 2, 1, beta=0.3).shared_channels == 19
    assert PartitionedConv2d(64, 2, 1, beta=0.3, shared_channels=7).shared_channels == 7


def test_same_parameters_init_and_state_dict_as_conv2d():
    torch.manual_seed(3)
    plain = nn.Conv2d(6, 4, 3, padding=1, groups=2)
    torch.manual_seed(3)
    partitioned = PartitionedConv2d(6, 4, 3, padding=1, groups=2, beta=0.25)
    assert isinstance(partitioned, nn.Conv2d)
    assert list(plain.state_dict()) == list(partitioned.state_dict())
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(partitioned.state_dict()[key], value, rtol=0, atol=0)
    # Checkpoints move both ways.
    other = nn.Conv2d(6, 4, 3, padding=1, groups=2)
    other.load_state_dict(partitioned.state_dict())
    partitioned.load_state_dict(nn.Conv2d(6, 4, 3, padding=1, groups=2).state_dict())


def test_forward_equals_conv2d():
    conv = PartitionedConv2d(6, 4, 3, stride=2, padding=1, dilation=2, shared_channels=1)
    x = torch.randn(2, 6, 11, 9)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, 2, 1, 2))


def test_from_conv_and_to_conv_share_parameters():
    plain = nn.Conv2d(6, 4, (3, 5), stride=(2, 1), padding=(1, 2), bias=False, padding_mode="reflect")
    partitioned = PartitionedConv2d.from_conv(plain, beta=0.5)
    assert partitioned.weight is plain.weight and partitioned.bias is None
    assert (partitioned.kernel_size, partitioned.stride, partitioned.padding, partitioned.padding_mode) == (
        (3, 5), (2, 1), (1, 2), "reflect")
    back = partitioned.to_conv()
    assert type(back) is nn.Conv2d and back.weight is plain.weight
    x = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(back(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(partitioned(x), plain(x))


def test_extra_repr_shows_partition_and_backend():
    text = repr(PartitionedConv2d(8, 4, 3, beta=0.25, backend="reference"))
    assert "shared_channels=2" in text and "backend='reference'" in text


class SmallVGG(nn.Module):
    """A three-conv multi-exit network written with plain modules (the model a user converts)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1, bias=False),
                                       nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=False)])
        self.norms = nn.ModuleList([nn.BatchNorm2d(c) for c in (8, 6, 5)])
        self.exits = nn.ModuleList([nn.Linear(c, 4, bias=False) for c in (8, 6, 5)])

    def forward(self, x, exit_view=lambda x: x, conv=None):
        logits = []
        for index, (layer, norm, fc) in enumerate(zip(self.features, self.norms, self.exits)):
            x = norm(torch.relu(layer(x) if conv is None or index == 0 else conv(layer, x)))
            last = index == len(self.features) - 1
            logits.append(fc((x if last else exit_view(x)).mean(dim=(2, 3))))
        return logits


def _loss_and_grads(model, forward):
    model.zero_grad()
    torch.manual_seed(11)
    x = torch.randn(3, 3, 9, 9, dtype=torch.float64)
    target = torch.randint(0, 4, (3,))
    loss = sum(F.cross_entropy(logits, target) for logits in forward(x))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("backend", dfs_kernels.available_backends("cpu"))
def test_convert_matches_model_written_with_reference_ops(backend, beta):
    torch.manual_seed(0)
    written = SmallVGG().double()
    converted = SmallVGG().double()
    converted.load_state_dict(written.state_dict())
    dfs_kernels.convert(converted.features, beta=beta, backend=backend, every_conv=True)
    assert type(converted.features[0]) is nn.Conv2d
    assert all(isinstance(layer, PartitionedConv2d) for layer in converted.features[1:])

    def reference_conv(layer, x):
        cp = round(beta * layer.in_channels)
        return reference.partitioned_conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, shared_channels=cp)

    def reference_exit(x):
        return reference.exit_reference(x, round(beta * x.shape[1]))

    expected_loss, expected_grads = _loss_and_grads(written, lambda x: written(x, reference_exit, reference_conv))

    def package_exit(x):  # the converted model references its exits with the package op
        return dfs_kernels.functional.exit_reference(x, round(beta * x.shape[1]), backend=backend)

    loss, grads = _loss_and_grads(converted, lambda x: converted(x, package_exit))
    assert_close(loss, expected_loss, name="loss")
    for name, grad in expected_grads.items():
        assert_close(grads[name], grad, name=f"grad of {name}")


def test_dfs_gradients_differ_from_dsn():
    """The comparison above can fail: at beta=0.5 the DFS gradients are not the DSN ones."""
    torch.manual_seed(0)
    dsn = SmallVGG().double()
    dfs = SmallVGG().double()
    dfs.load_state_dict(dsn.state_dict())
    dfs_kernels.convert(dfs, beta=0.5, every_conv=True)
    _, dsn_grads = _loss_and_grads(dsn, dsn)
    _, dfs_grads = _loss_and_grads(dfs, dfs)
    assert not torch.allclose(dsn_grads["features.0.weight"], dfs_grads["features.0.weight"])


def test_convert_skip_first_and_subclasses():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 1)),
                          PartitionedConv2d(4, 4, 1, shared_channels=1))
    existing = model[2]
    assert dfs_kernels.convert(model, beta=0.25, every_conv=True) is model
    assert type(model[0]) is nn.Conv2d
    assert isinstance(model[1][0], PartitionedConv2d) and model[1][0].shared_channels == 1
    assert model[2] is existing
    dfs_kernels.convert(model, skip_first=False, backend="reference", every_conv=True)
    assert isinstance(model[0], PartitionedConv2d) and model[0].backend == "reference"
    alone = dfs_kernels.convert(nn.Conv2d(4, 2, 1), skip_first=False, every_conv=True)
    assert isinstance(alone, PartitionedConv2d)


def test_converted_optimizer_keeps_working():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[1].weight.detach().clone()
    dfs_kernels.convert(model, every_conv=True)
    model(torch.randn(1, 3, 8, 8)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[1].weight, before)


def test_convert_replaces_every_use_of_a_shared_conv():
    shared = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), shared, nn.ReLU(), shared)
    outer = nn.Sequential(model, nn.Sequential(shared))  # also held by another parent
    dfs_kernels.convert(outer, beta=0.25, every_conv=True)
    assert isinstance(model[1], PartitionedConv2d)
    assert model[3] is model[1] and outer[1][0] is model[1]
    assert model[1].weight is shared.weight and model[1].bias is shared.bias
    assert len(list(outer.parameters())) == 4  # still one conv's weight and bias shared by its three uses
    # Every use has the DFS gradient: the second use's input gets none on the referenced channels.
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    model[3](x).sum().backward()
    assert x.grad[:, 2:].abs().max() == 0 and x.grad[:, :2].abs().max() > 0


def test_unconvert_inverts_convert_keeping_shared_parameters():
    shared = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), shared, nn.ReLU(), shared, nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    parameters = list(model.parameters())
    dfs_kernels.convert(model, every_conv=True)
    assert isinstance(model[1], PartitionedConv2d) and isinstance(model[4], PartitionedConv2d)
    assert dfs_kernels.unconvert(model) is model
    assert all(type(model[i]) is nn.Conv2d for i in (0, 1, 3, 4))
    assert model[3] is model[1] and model[1].weight is shared.weight
    assert [a is b for a, b in zip(model.parameters(), parameters)] == [True] * len(parameters)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    alone = dfs_kernels.unconvert(PartitionedConv2d(4, 2, 1))
    assert type(alone) is nn.Conv2d


def _input_grad(module, x):
    """The gradient of x through ``module``'s output (the backbone view of a FeatureReroute)."""
    x = x.detach().requires_grad_()
    output = module(x)
    (output[0] if isinstance(output, tuple) else output).sum().backward()
    return x.grad


@pytest.mark.parametrize("assign", ["beta", "shared_channels"])
@pytest.mark.parametrize("kind", ["conv", "exit_head", "reroute"])
def test_partition_assigned_after_construction_takes_effect(kind, assign):
    module = {
        "conv": lambda: PartitionedConv2d(8, 4, 3, padding=1, beta=0.5),
        "exit_head": lambda: ExitHead(8, 3, beta=0.5),
        "reroute": lambda: FeatureReroute(8, beta=0.5),
    }[kind]()
    keys = list(module.state_dict())
    setattr(module, assign, 0.25 if assign == "beta" else 2)
    assert module.shared_channels == 2 and module.beta == 0.25
    assert list(module.state_dict()) == keys
    grad = _input_grad(module, torch.randn(2, 8, 5, 5))
    if kind == "exit_head":  # an exit's gradient reaches the referenced channels [Cp, C) only
        assert grad[:, :2].abs().max() == 0 and grad[:, 2:].abs().min() > 0
    else:  # the backbone's reaches the shared channels [0, Cp) only
        assert grad[:, 2:].abs().max() == 0 and grad[:, :2].abs().max() > 0


@pytest.mark.parametrize("module", [PartitionedConv2d(8, 4, 3), ExitHead(8, 3), FeatureReroute(8)],
                         ids=["conv", "exit_head", "reroute"])
def test_invalid_partition_assignment_raises_and_keeps_the_old_value(module):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        module.beta = 1.5
    with pytest.raises(ValueError, match=r"shared_channels must be in \[0, 8\].*got 9"):
        module.shared_channels = 9
    with pytest.raises(TypeError, match=r"shared_channels must be an int in \[0, 8\]"):
        module.shared_channels = 2.0
    assert module.shared_channels == 4


def test_from_conv_and_convert_refuse_uninitialized_lazy_convs():
    with pytest.raises(ValueError, match="conv is an uninitialized lazy convolution.*LazyConv2d"):
        PartitionedConv2d.from_conv(nn.LazyConv2d(8, 3))
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.LazyConv2d(8, 3))
    with pytest.raises(ValueError, match=r"model\.1 is an uninitialized lazy convolution"):
        dfs_kernels.convert(model, every_conv=True)
    model(torch.randn(1, 3, 9, 9))  # after the first forward they are plain convolutions
    dfs_kernels.convert(model, every_conv=True)
    assert type(model[0]) is nn.Conv2d and isinstance(model[1], PartitionedConv2d)
    assert model[1].in_channels == 8 and model[1].shared_channels == 4


@pytest.mark.parametrize(
    "make",
    [lambda: PartitionedConv2d(8, 4, 3), lambda: ExitHead(8, 3), lambda: FeatureReroute(8),
     lambda: dfs_kernels.convert(SmallVGG(), every_conv=True)],
    ids=["conv", "exit_head", "reroute", "converted_model"],
)
def test_jit_script_is_refused_with_a_clear_error(make):
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script is not supported .*Use torch\.export"):
        torch.jit.script(make())
