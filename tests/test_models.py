"""The multi-exit models: one state_dict for all flavours, equal forwards, "dfs" gradients equal to
"dfs_eager" (the literal reference) for every parameter, DFS gradients different from DSN's, and
``beta=1, exit_grad="all"`` reducing DFS to DSN. Float64 on tiny batches so equality is tight.
MSDNet's classifiers drop out in training mode: training-mode forwards that are compared run from
the same RNG seed, so every flavour draws the same dropout masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dfs_kernels
from dfs_kernels import models
from dfs_kernels.models import summary

BACKENDS = dfs_kernels.available_backends("cpu")
BATCH = 2

# (registry name, factory kwargs, input H = W). VGG16 pools globally, so 32x32 suffices; ImageNet
# MSDNet needs a coarsest scale of at least 5 for its classifiers' two stride-2 convs and 2x2 pool,
# which 129 is the smallest input to give (129 -> 65 -> 33 -> 17 -> 9 -> 5).
CASES = {
    "vgg7": ("vgg7", {}, 32),
    "vgg16": ("vgg16", {"num_classes": 10}, 32),
    "resnet18": ("resnet18", {}, 32),
    "msdnet": ("msdnet", {}, 32),
    "msdnet_partitioned_exits": ("msdnet", {"exit_grad": "partitioned"}, 32),
    "msdnet_imagenet": ("msdnet_imagenet", {"num_classes": 10}, 129),
}


def build_flavours(name: str, *, beta: float, **kwargs) -> dict[str, torch.nn.Module]:
    """The flavours "dsn", "dfs_eager" and "dfs:<backend>" for every CPU backend, float64, all holding the
    parameters of the first one built."""
    torch.manual_seed(0)
    built = {"dsn": models.build_model(name, flavour="dsn", beta=beta, **kwargs)}
    built["dfs_eager"] = models.build_model(name, flavour="dfs_eager", beta=beta, **kwargs)
    for backend in BACKENDS:
        built[f"dfs:{backend}"] = models.build_model(name, flavour="dfs", beta=beta, backend=backend, **kwargs)
    state = built["dsn"].state_dict()
    for model in built.values():
        model.load_state_dict(state)
        model.double().train()
    return built


def train_step_outputs(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """Logits of every exit and the gradient of every parameter for the summed exit losses."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same dropout masks (MSDNet) in every flavour
    logits = model(images)
    sum(F.cross_entropy(exit_logits, labels) for exit_logits in logits).backward()
    grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}
    return [exit_logits.detach() for exit_logits in logits], grads


def run_flavours(case: str, beta: float, **overrides):
    name, kwargs, size = CASES[case]
    built = build_flavours(name, beta=beta, **{**kwargs, **overrides})
    classes = kwargs.get("num_classes", 100)  # the cases without num_classes are CIFAR-100 models
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, size, size, generator=generator, dtype=torch.float64)
    labels = torch.randint(classes, (BATCH,), generator=generator)
    return {flavour: train_step_outputs(model, images, labels) for flavour, model in built.items()}


def assert_grads_close(actual: dict, expected: dict, label: str) -> None:
    assert actual.keys() == expected.keys(), label
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{label} {name}: {m}")


def grads_differ(first: dict, second: dict) -> bool:
    return any(
        (first[name] - second.get(name, torch.zeros_like(first[name]))).abs().max() > 1e-6 * first[name].abs().max()
        for name in first
    )


@pytest.mark.parametrize("case", list(CASES))
def test_flavours_agree_and_dfs_matches_reference(case):
    results = run_flavours(case, beta=0.5)
    dsn_logits, dsn_grads = results["dsn"]
    eager_logits, eager_grads = results["dfs_eager"]
    for flavour, (logits, grads) in results.items():
        assert len(logits) == len(dsn_logits)
        for index, (exit_logits, expected) in enumerate(zip(logits, dsn_logits)):
            torch.testing.assert_close(exit_logits, expected, rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"{flavour} exit {index}: {m}")
        if flavour.startswith("dfs:"):
            assert_grads_close(grads, eager_grads, flavour)
    # the stop-gradients must matter at beta = 0.5, or the comparison above proves nothing
    assert grads_differ(eager_grads, dsn_grads)


# exit_grad is set here, which makes "msdnet_partitioned_exits" the same as "msdnet"
@pytest.mark.parametrize("case", [case for case in CASES if case != "msdnet_partitioned_exits"])
def test_beta_one_with_full_exit_gradient_is_dsn(case):
    # At beta = 1 every channel is shared: the backbone gets its full gradient, but partitioned exits
    # reference no channel and send none back, so DFS reduces to DSN only with exit_grad="all".
    results = run_flavours(case, beta=1.0, exit_grad="all")
    _, dsn_grads = results["dsn"]
    for flavour, (_, grads) in results.items():
        assert_grads_close(grads, dsn_grads, flavour)


def test_state_dict_is_shared_across_flavours():
    for name in ("vgg7", "resnet18", "msdnet"):
        built = [models.build_model(name, flavour=flavour) for flavour in models.FLAVOURS]
        keys = list(built[0].state_dict())
        for model in built[1:]:
            assert list(model.state_dict()) == keys
            model.load_state_dict(built[0].state_dict())


def test_exit_counts_and_features():
    images = torch.randn(BATCH, 3, 32, 32)
    expected_exits = {"vgg7": 6, "vgg16": 13, "resnet18": 4, "msdnet": 7}
    for name, count in expected_exits.items():
        model = models.build_model(name, num_classes=10, flavour="dfs")
        logits, features = model(images, return_features=True)
        assert [tuple(z.shape) for z in logits] == [(BATCH, 10)] * count
        if name == "resnet18":
            assert [tuple(h.shape) for h in features] == [(BATCH, 512)] * 4
        else:
            assert features is None


def test_build_model_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("vgg11")
    with pytest.raises(ValueError, match="flavour"):
        models.build_model("vgg7", flavour="fast")
    with pytest.raises(ValueError, match="exit_grad"):
        models.build_model("msdnet", exit_grad="some")


def test_summary_costs_are_cumulative(capsys):
    model = models.build_model("vgg7", flavour="dsn")
    costs = summary.exit_costs(model)
    assert len(costs) == 6
    for earlier, later in zip(costs, costs[1:]):
        assert later["params"] > earlier["params"] and later["flops"] > earlier["flops"]
    assert costs[-1]["params"] == sum(p.numel() for p in model.parameters())
    # conv 3->64 at 32x32 with 3x3 kernels, plus the first exit's Linear(64, 100): 2 FLOPs per multiply-add
    assert costs[0]["flops"] == 2 * (32 * 32 * 64 * 3 * 9 + 64 * 100)

    summary.main(["--model", "msdnet"])
    printed = capsys.readouterr().out
    assert "msdnet: 7 exits" in printed and "GFLOPs" in printed and "training only" not in printed


def test_summary_says_why_resnet18_total_exceeds_the_last_exit(capsys):
    model = models.build_model("resnet18", flavour="dsn")
    total = sum(p.numel() for p in model.parameters())
    unused = summary.unused_at_inference(model)
    assert sorted(unused) == [f"exits.{k}.adaptation" for k in range(3)]
    assert sum(unused.values()) == total - summary.exit_costs(model)[-1]["params"] == 3 * (512 * 512 + 512)
    summary.main(["--model", "resnet18"])
    printed = capsys.readouterr().out
    assert f"of which {sum(unused.values()) / 1e6:.3f} M are used in training only" in printed
    assert "exits.0.adaptation" in printed


def test_msdnet_classifiers_drop_out_before_the_linear_layer_as_the_reference():
    torch.manual_seed(0)
    model = models.build_model("msdnet", num_classes=10, growth_rate=2, flavour="dsn")
    for classifier in model.classifier:
        dropout, linear = classifier.linear
        assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.5 and isinstance(linear, torch.nn.Linear)
    keys = model.state_dict().keys()
    assert "classifier.0.linear.1.weight" in keys and "classifier.0.linear.weight" not in keys
    images = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert_all_equal(model(images), model(images))  # eval: no dropout
        model.train()
        first, second = model(images), model(images)
    assert not any(torch.equal(a, b) for a, b in zip(first, second))  # training: dropout is active
    # classifiers saved without the dropout (keys linear.weight / linear.bias) load into linear.1
    legacy = {key.replace("linear.1.", "linear."): value for key, value in model.state_dict().items()}
    other = models.build_model("msdnet", num_classes=10, growth_rate=2, flavour="dfs")
    other.load_state_dict(legacy)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))


def _conv_std_ratio(conv: torch.nn.Conv2d, fan: str) -> float:
    """std(weight) over the std of an init: "fan_out" sqrt(2 / (kH * kW * out_channels)) (ResNet-18's
    kaiming_normal_ and the reference MSDNet's _init_weights), "default" PyTorch's kaiming_uniform_(a=sqrt(5)),
    1 / sqrt(3 * fan_in)."""
    k = conv.kernel_size[0] * conv.kernel_size[1]
    expected = (2.0 / (k * conv.out_channels)) ** 0.5 if fan == "fan_out" else (
        3.0 * k * conv.in_channels // conv.groups) ** -0.5
    return conv.weight.std().item() / expected


def _big_convs(model: torch.nn.Module) -> list[torch.nn.Conv2d]:
    """The convs with enough weights (>= 20000) for their std to be within 5% of the init's."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.numel() >= 20000]


def test_resnet18_initializes_as_the_reference_code():
    torch.manual_seed(0)
    for flavour in models.FLAVOURS:
        model = models.build_model("resnet18", flavour=flavour)
        convs = _big_convs(model)
        assert len(convs) >= 5 and all(abs(_conv_std_ratio(conv, "fan_out") - 1) < 0.05 for conv in convs)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                assert torch.equal(module.weight, torch.ones_like(module.weight))
                assert torch.equal(module.bias, torch.zeros_like(module.bias))
    vgg = models.build_model("vgg7", flavour="dsn")  # other models keep PyTorch's defaults
    assert _big_convs(vgg) and all(abs(_conv_std_ratio(conv, "default") - 1) < 0.05 for conv in _big_convs(vgg))


def _reference_msdnet_init_targets(model) -> list[torch.nn.Module]:
    """The modules the reference MSDNet passes to ``_init_weights``: for ``m`` in blocks and in classifier,
    the items of ``m`` where ``hasattr(m, '__iter__')`` (a block's nn.Sequential), else ``m`` itself."""
    targets = []
    for container in (model.blocks, model.classifier):
        for m in container:
            targets.extend(m if hasattr(m, "__iter__") else [m])
    return targets


@pytest.mark.parametrize("name", ["msdnet", "msdnet_imagenet"])
def test_msdnet_keeps_pytorch_defaults_as_the_reference_code_does(name):
    """The reference's MSDNet init loop never reaches a Conv2d, BatchNorm2d or Linear (it visits the
    blocks' MSDNFirstLayer / MSDNLayer / ParallelModule and the ClassifierModules), so it trains from
    PyTorch's defaults: a recursive N(0, 2 / fan_out) conv init and zero Linear biases would not be faithful."""
    torch.manual_seed(0)
    kwargs = {"num_classes": 10} if name == "msdnet_imagenet" else {}
    for flavour in models.FLAVOURS:
        model = models.build_model(name, flavour=flavour, **kwargs)
        targets = _reference_msdnet_init_targets(model)
        assert {type(m).__name__ for m in targets} == {"MSDNFirstLayer", "MSDNLayer", "ParallelModule",
                                                       "ClassifierModule"}
        assert not any(isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear)) for m in targets)
        convs = _big_convs(model)
        assert len(convs) >= 5 and all(abs(_conv_std_ratio(conv, "default") - 1) < 0.05 for conv in convs)
        assert not any(abs(_conv_std_ratio(conv, "fan_out") - 1) < 0.05 for conv in convs)
        biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert biases and all(bias.abs().min() > 0 for bias in biases)  # PyTorch's uniform, not zeros


def test_dfs_flavour_is_built_from_the_package_modules():
    def count(model, kind):
        return sum(isinstance(module, kind) for module in model.modules())

    vgg = models.build_model("vgg7", flavour="dfs")
    assert count(vgg, dfs_kernels.PartitionedConv2d) == 5 and count(vgg, dfs_kernels.ExitHead) == 6
    resnet = models.build_model("resnet18", flavour="dfs")
    assert count(resnet, dfs_kernels.PartitionedConv2d) == 6  # conv1 and shortcut of stages 2-4's first block
    msdnet = models.build_model("msdnet", flavour="dfs")
    assert count(msdnet, dfs_kernels.FeatureReroute) == 6
    assert count(models.build_model("vgg7", flavour="dsn"), dfs_kernels.PartitionedConv2d) == 0


def run_blockwise(blocks, heads, images):
    state, outputs = (images,), []
    for block, head in zip(blocks, heads):
        state = block(state)
        outputs.append(head(state))
    return outputs


def assert_all_equal(actual, expected):
    assert len(actual) == len(expected)
    assert all(torch.equal(got, want) for got, want in zip(actual, expected))


@pytest.mark.parametrize("flavour", models.FLAVOURS)
@pytest.mark.parametrize("name, kwargs", [("vgg7", {}), ("resnet18", {}), ("msdnet", {"growth_rate": 2})])
def test_blockwise_view_reproduces_the_forward(name, kwargs, flavour):
    model = models.build_model(name, num_classes=10, flavour=flavour, **kwargs).double()
    images = torch.randn(BATCH, 3, 32, 32, dtype=torch.float64)
    view = models.blockwise_view(model)
    for training in (True, False):  # BatchNorm with batch statistics, then with running ones
        model.train(training)
        with torch.no_grad():
            torch.manual_seed(2)  # MSDNet's dropout: the same masks in both runs
            blockwise = run_blockwise(view.blocks, view.heads, images)
            torch.manual_seed(2)
            assert_all_equal(blockwise, model(images))
            if name == "resnet18":
                pairs = run_blockwise(view.blocks, view.feature_heads, images)
                logits, features = model(images, return_features=True)
                assert_all_equal([pair[0] for pair in pairs], logits)
                assert_all_equal([pair[1] for pair in pairs], features)
            else:
                assert view.feature_heads is None
    owned = [id(p) for parameters in view.block_parameters + view.head_parameters for p in parameters]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())  # every parameter owned exactly once
