"""``dfs_kernels.multi_exit`` and ``convert(exits=...)`` on models written here: exactness against the
literal oracle and against our hand-built DFS VGG7, the API's promises (parameters shared, state_dict keys,
remove, copies), and a clear error for every bad input."""

from __future__ import annotations

import collections
import copy
import pickle

import pytest
import torch
from torch import nn

import dfs_kernels
from dfs_kernels import PartitionedConv2d, multi_exit
from dfs_kernels.models import vgg7_64
from dfs_kernels.models._common import PooledLinearExit
from dfs_kernels.models.vgg import VGG7_64, VGGLayer
from dfs_kernels.testing import assert_close
from multi_exit_oracle import assert_matches_literal_dfs

BACKENDS = [b for b in ("aten", "reference") if b in dfs_kernels.available_backends("cpu")]
IMAGES = (2, 3, 8, 8)


def small_cnn() -> nn.Sequential:
    """Three 3x3 convolutions with ReLUs, a global pool and a linear layer: no exits of its own."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


class Residual(nn.Module):
    """A block whose output is read by a convolution, a residual add and a norm: only the convolution can be
    partitioned, the others read the rerouted view."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        y = self.stem(x)
        z = self.norm(self.conv(y) + y)
        return self.head(z.mean((2, 3)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("exit_grad", ["partitioned", "all"])
def test_small_models_match_the_literal_oracle(backend, beta, exit_grad):
    for build, exits in ((small_cnn, ["1", "3"]), (Residual, ["stem"])):
        model = build().double()
        original = copy.deepcopy(model)
        x = torch.randn(*IMAGES, dtype=torch.float64)
        wrapped = multi_exit(model, exits, num_classes=3, beta=beta, exit_grad=exit_grad, backend=backend,
                             example_input=x)
        assert_matches_literal_dfs(wrapped, original, (x,))


def test_the_oracle_comparison_can_fail():
    """DSN gradients are not DFS ones: comparing a DSN wrapper with the DFS oracle must fail."""
    model = Residual().double()
    original = copy.deepcopy(model)
    x = torch.randn(*IMAGES, dtype=torch.float64)
    dsn = multi_exit(model, ["stem"], num_classes=3, flavour="dsn", example_input=x)
    dsn.shared_channels, dsn.exit_grad = [3], "partitioned"  # what the oracle will apply
    with pytest.raises(AssertionError, match="grad of"):
        assert_matches_literal_dfs(dsn, original, (x,))


def test_only_the_layers_that_read_an_exit_point_are_partitioned():
    wrapped = multi_exit(Residual(), ["stem"], num_classes=3, example_input=torch.randn(*IMAGES))
    assert wrapped.partitioned == [["conv"]]
    assert isinstance(wrapped.model.conv, PartitionedConv2d) and wrapped.model.conv.shared_channels == 3
    assert type(wrapped.model.stem) is nn.Conv2d and type(wrapped.model.head) is nn.Linear
    text = wrapped.describe()
    assert "'stem'" in text and "Cp=3" in text and "C=6" in text and "partitioned: conv" in text


def test_every_filter_learns():
    """The failure the old ``convert`` had: with exits where the model has them, every output channel of
    every convolution gets gradient (from the exits or from deeper layers)."""
    wrapped = multi_exit(small_cnn(), ["1", "3"], num_classes=3, example_input=torch.randn(*IMAGES))
    sum(out.sum() for out in wrapped(torch.randn(*IMAGES))).backward()
    for index in (0, 2, 4):
        norms = wrapped.model[index].weight.grad.flatten(1).norm(dim=1)
        assert (norms > 0).all(), f"conv {index}: output channels without gradient: {norms.tolist()}"


def test_beta_one_with_exit_grad_all_is_dsn_and_dfs_eager_is_dfs():
    x = torch.randn(*IMAGES, dtype=torch.float64)

    def grads(**options):
        torch.manual_seed(0)
        wrapped = multi_exit(Residual().double(), ["stem"], num_classes=3, example_input=x, **options)
        sum(out.square().sum() for out in wrapped(x)).backward()
        return {name: p.grad for name, p in wrapped.named_parameters()}

    dsn, all_shared = grads(flavour="dsn"), grads(beta=1.0, exit_grad="all")
    eager, fused, half_dsn = grads(flavour="dfs_eager"), grads(), grads(beta=0.5, exit_grad="all")
    for name in dsn:
        assert_close(all_shared[name], dsn[name], name=name)
        assert_close(fused[name], eager[name], name=name)
    assert not torch.allclose(half_dsn["model.stem.weight"], dsn["model.stem.weight"])


def _vgg7_backbone(num_classes: int) -> nn.Module:
    """Our VGG7-64 without its early exits: the layers and the final exit, as a user's own model."""
    backbone = nn.Module()
    widths = [width for stage in VGG7_64 for width in stage]
    backbone.layers = nn.ModuleList(
        VGGLayer(nn.Conv2d(3 if i == 0 else widths[i - 1], width, 3, padding=1, bias=i == 0), pool=i % 2 == 1)
        for i, width in enumerate(widths))
    backbone.head = PooledLinearExit(widths[-1], num_classes)

    def forward(x):
        for layer in backbone.layers:
            x = layer(x)
        return backbone.head(x)
    backbone.forward = forward
    return backbone


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_exit_on_our_vgg7_backbone_equals_our_dfs_vgg7(backend):
    ours = vgg7_64(num_classes=10, flavour="dfs", backend=backend).double()
    backbone = _vgg7_backbone(10).double()
    exits = [f"layers.{k}" for k in range(5)]
    heads = {name: PooledLinearExit(width, 10).double()
             for name, width in zip(exits, [64, 64, 128, 128, 256])}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    wrapped = multi_exit(backbone, exits, heads=heads, backend=backend, example_input=x)
    assert wrapped.partitioned == [[f"layers.{k + 1}.conv"] for k in range(5)]
    state = {f"model.{key}": value for key, value in ours.state_dict().items() if key.startswith("layers.")}
    state.update({f"heads.{k}.fc.weight": ours.state_dict()[f"exits.{k}.fc.weight"] for k in range(5)})
    state["model.head.fc.weight"] = ours.state_dict()["exits.5.fc.weight"]
    wrapped.load_state_dict(state)

    def run(model, parameters):
        outputs = model(x)
        sum((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
            for out in outputs).backward()
        return outputs, {name: parameters[name].grad for name in parameters}

    ours_out, ours_grads = run(ours, dict(ours.named_parameters()))
    out, grads = run(wrapped, dict(wrapped.named_parameters()))
    for k, (a, e) in enumerate(zip(out, ours_out)):
        assert_close(a, e, name=f"exit {k + 1}")
    renamed = {f"model.{n}" if n.startswith("layers.") else
               ("model.head.fc.weight" if n == "exits.5.fc.weight" else n.replace("exits.", "heads.")): g
               for n, g in ours_grads.items()}
    assert sorted(renamed) == sorted(grads)
    for name, expected in renamed.items():
        assert_close(grads[name], expected, name=f"grad of {name}")


def test_parameters_are_the_models_and_state_dict_keys_are_model_and_heads():
    model = small_cnn()
    parameters = {name: p for name, p in model.named_parameters()}
    wrapped = multi_exit(model, ["1", "3"], num_classes=3, example_input=torch.randn(*IMAGES))
    assert wrapped.model is model
    for name, parameter in parameters.items():
        assert wrapped.get_parameter(f"model.{name}") is parameter
    keys = list(wrapped.state_dict())
    assert all(key.startswith(("model.", "heads.")) for key in keys)
    assert [k for k in keys if k.startswith("heads.")] == ["heads.0.fc.weight", "heads.0.fc.bias",
                                                           "heads.1.fc.weight", "heads.1.fc.bias"]


def test_remove_gives_back_the_model_as_it_was():
    model = small_cnn()
    modules = dict(model.named_modules())
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(*IMAGES)
    expected = model(x)
    wrapped = multi_exit(model, ["1", "3"], num_classes=3, example_input=x)
    assert isinstance(model[2], PartitionedConv2d)
    assert wrapped.remove() is model
    assert dict(model.named_modules()) == modules
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(model(x), expected)
    with pytest.raises(RuntimeError, match="removed"):
        wrapped(x)
    multi_exit(model, ["1"], num_classes=3, example_input=x)  # it can be wrapped again


def test_copies_and_pickles_carry_their_own_hooks():
    x = torch.randn(*IMAGES)
    wrapped = multi_exit(small_cnn(), ["1", "3"], num_classes=3, example_input=x)
    for twin in (copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))):
        outputs = twin(x)
        assert len(outputs) == 3
        for a, e in zip(outputs, wrapped(x)):
            assert torch.equal(a, e)
        sum(out.sum() for out in outputs).backward()
        assert twin.heads[0].fc.weight.grad is not None and wrapped.heads[0].fc.weight.grad is None


Pair = collections.namedtuple("Pair", "features aux")


class TupleBlock(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        aux = y.sum()
        return {"tuple": (y, aux), "list": [y, aux], "namedtuple": Pair(y, aux), "dict": {"features": y, "aux": aux}
                }[self.kind]


class TupleModel(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.block = TupleBlock(kind)
        self.conv = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        out = self.block(x)
        y = out["features"] if isinstance(out, dict) else out[0]
        return self.conv(y).mean((2, 3))


@pytest.mark.parametrize("kind", ["tuple", "list", "namedtuple", "dict"])
def test_exit_points_that_return_several_values_hand_on_their_first(kind):
    model = TupleModel(kind).double()
    original = copy.deepcopy(model)
    x = torch.randn(*IMAGES, dtype=torch.float64)
    wrapped = multi_exit(model, ["block"], num_classes=3, example_input=x)
    assert wrapped.partitioned == [["conv"]]
    assert_matches_literal_dfs(wrapped, original, (x,))


def test_tokens_use_the_last_axis_and_partition_linear_readers():
    model = nn.Sequential(nn.Linear(5, 8), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3)).double()
    original = copy.deepcopy(model)
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    wrapped = multi_exit(model, ["0"], num_classes=4, example_input=x)
    assert wrapped.dims == [-1] and wrapped.partitioned == [["1"]]
    assert_matches_literal_dfs(wrapped, original, (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_exit_point_modified_in_place_downstream_is_handed_on_as_a_copy(backend):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    original = copy.deepcopy(model)
    x = torch.randn(*IMAGES, dtype=torch.float64)
    wrapped = multi_exit(model, ["1", "2"], num_classes=3, example_input=x, backend=backend)
    assert wrapped.copied == [True, False] and "in place" in wrapped.describe()
    assert_matches_literal_dfs(wrapped, original, (x,))


def test_run_exits_stops_the_forward():
    x = torch.randn(*IMAGES)
    wrapped = multi_exit(small_cnn(), ["1", "3"], num_classes=3, example_input=x)
    ran = []
    wrapped.model[4].register_forward_hook(lambda *args: ran.append(True))
    logits = wrapped.run_exits(x, until=lambda k, out: k == 0)
    assert len(logits) == 1 and not ran
    assert len(wrapped.run_exits(x, until=lambda k, out: False)) == 3 and ran
    assert len(wrapped(x)) == 3  # a stopped forward leaves nothing behind


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_autocast(backend):
    model = Residual()
    original = copy.deepcopy(model)
    x = torch.randn(*IMAGES).contiguous(memory_format=torch.channels_last)
    wrapped = multi_exit(model, ["stem"], num_classes=3, example_input=x, backend=backend)
    assert_matches_literal_dfs(wrapped, original, (x,), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = wrapped(x)
    assert all(out.dtype == torch.bfloat16 for out in outputs)
    sum(out.float().sum() for out in outputs).backward()
    assert all(p.grad is not None for p in wrapped.parameters())


@pytest.mark.slow
def test_compiled_fullgraph_equals_eager():
    x = torch.randn(*IMAGES)
    wrapped = multi_exit(Residual(), ["stem"], num_classes=3, example_input=x, backend=BACKENDS[0])
    compiled = torch.compile(wrapped, fullgraph=True)

    def run(module):
        wrapped.zero_grad()
        outputs = module(x)
        sum(out.square().sum() for out in outputs).backward()
        return outputs, [p.grad.clone() for p in wrapped.parameters()]

    (expected, expected_grads), (actual, grads) = run(wrapped), run(compiled)
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, name=f"output {k}")
    for k, (a, e) in enumerate(zip(grads, expected_grads)):
        assert_close(a, e, name=f"grad {k}")


# --- convert ---------------------------------------------------------------------------------------


def test_convert_without_exits_refuses_and_points_to_multi_exit():
    with pytest.raises(ValueError, match=r"convert needs exits=.*never learn.*multi_exit.*every_conv=True"):
        dfs_kernels.convert(small_cnn())
    with pytest.raises(ValueError, match="not both"):
        dfs_kernels.convert(small_cnn(), exits=["1"], every_conv=True)


def test_convert_with_exits_partitions_their_readers_and_nothing_else():
    model = small_cnn()
    assert dfs_kernels.convert(model, exits=["1"], beta=0.25, example_input=torch.randn(*IMAGES)) is model
    assert isinstance(model[2], PartitionedConv2d) and model[2].shared_channels == 2
    assert type(model[0]) is nn.Conv2d and type(model[4]) is nn.Conv2d and type(model[7]) is nn.Linear
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# --- bad input -------------------------------------------------------------------------------------


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 4, 1)
        self.unused = nn.Conv2d(4, 4, 1)
        self.flat = nn.Flatten()

    def forward(self, x):
        return self.flat(self.b(self.b(self.c(self.a(x)))))


@pytest.mark.parametrize("exits, options, error, match", [
    (["unsed"], {}, ValueError, r"'unsed' is not a module of the model; closest names: \['unused'\]"),
    (["a", "a"], {}, ValueError, r"each exit point once, got \['a'\]"),
    (["c", "a"], {}, ValueError, r"in the order they run: the forward ran them as \['a', 'c'\]"),
    (["a", "unused"], {}, ValueError, r"never reached \['unused'\]"),
    (["b"], {}, ValueError, r"run once per forward.*\('b', 2\)"),
    (["flat"], {}, ValueError, r"outputs a tensor of shape \(2, 256\).*3-D \[N, T, D\] or 4-D"),
    ("a", {}, TypeError, "exits must be a non-empty list"),
    ([], {}, TypeError, "exits must be a non-empty list"),
    (["a"], {"beta": 1.5}, ValueError, r"beta must be in \[0, 1\]"),
    (["a"], {"shared_channels": 5}, ValueError, r"shared_channels must be in \[0, 4\]"),
    (["a"], {"shared_channels": [1, 2]}, ValueError, "one int per exit"),
    (["a"], {"num_classes": None}, ValueError, r"num_classes must be a positive int for the default heads of exits \['a'\]"),
    (["a"], {"heads": {"b": nn.Identity()}}, ValueError, r"heads has keys \['b'\] that are not in exits"),
    (["a"], {"heads": {"a": nn.Identity()}}, ValueError, r"heads\['a'\] must return logits \[N, K\]"),
    (["a"], {"flavour": "fast"}, ValueError, "flavour must be one of"),
    (["a"], {"exit_grad": "some"}, ValueError, "exit_grad must be one of"),
    (["a"], {"backend": "fast"}, ValueError, "backend must be"),
    (["a"], {"dim": 0}, ValueError, "dim must be a channel axis"),
    (["a"], {"example_input": [1]}, TypeError, "example_input must be a tensor"),
])
def test_bad_input_is_refused_naming_the_argument(exits, options, error, match):
    options = {"num_classes": 3, "example_input": torch.randn(*IMAGES), **options}
    with pytest.raises(error, match=match):
        multi_exit(Branchy(), exits, **options)


def test_wrapping_twice_is_refused():
    model = small_cnn()
    wrapped = multi_exit(model, ["1"], num_classes=3, example_input=torch.randn(*IMAGES))
    with pytest.raises(ValueError, match=r"already wrapped by multi_exit \(exit points \['1'\]\)"):
        multi_exit(model, ["3"], num_classes=3, example_input=torch.randn(*IMAGES))
    with pytest.raises(ValueError, match="already a MultiExitModel"):
        multi_exit(wrapped, ["model.3"], num_classes=3, example_input=torch.randn(*IMAGES))


def test_a_model_whose_input_cannot_be_told_needs_example_input():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    with pytest.raises(ValueError, match="example_input is needed"):
        multi_exit(model, ["1"], num_classes=3)
    # a model whose first layer is a convolution gets 224 x 224 images
    assert multi_exit(small_cnn(), ["1"], num_classes=3).channels == [8]


@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_checkpointing_around_an_exit_point_keeps_the_gradients(backend):
    """torch.utils.checkpoint recomputes the block holding an exit point in the backward: the exit hook must
    compute the same there, or the recomputed saved tensors would not match the forward's."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 6, 3, padding=1))
            self.head = nn.Linear(6, 2)

        def forward(self, x, use_checkpoint: bool = False):
            y = checkpoint(self.block, x, use_reentrant=False) if use_checkpoint else self.block(x)
            return self.head(y.mean((2, 3)))

    x = torch.randn(*IMAGES, dtype=torch.float64)
    wrapped = multi_exit(Checkpointed().double(), ["block.1"], num_classes=3, example_input=x, backend=backend)

    def grads(use_checkpoint):
        wrapped.zero_grad()
        sum(out.square().sum() for out in wrapped(x, use_checkpoint=use_checkpoint)).backward()
        return {name: p.grad.clone() for name, p in wrapped.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name, expected in plain.items():
        assert_close(checkpointed[name], expected, name=f"grad of {name}")
